"""The recipe in docs/adapters.md registers an adapter for a model of the user's own, and it trains right."""

import re
from pathlib import Path

import pytest
import torch
from helpers import assert_local_gradients_match_reference, training_args
from transformers import Trainer, TrainingArguments

from hf_bpmod import BPModifiedTrainer, get_adapter
from hf_bpmod.adapters import ADAPTERS
from hf_bpmod.testing import SyntheticImages

DOC = Path(__file__).resolve().parents[1] / "docs" / "adapters.md"


@pytest.fixture
def recipe(tmp_path, monkeypatch):
    """The namespace after running every Python block of the recipe, in order (in ``tmp_path``)."""
    monkeypatch.chdir(tmp_path)
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
    assert len(blocks) == 3
    namespace: dict = {}
    try:
        for block in blocks:
            exec(compile(block, str(DOC), "exec"), namespace)
        yield namespace
    finally:
        ADAPTERS.pop("tiny_cnn", None)


def test_the_recipe_trains_the_users_model(recipe):
    model, trainer = recipe["model"], recipe["trainer"]
    assert trainer.state.global_step == 20
    assert type(get_adapter(model)).__name__ == "TinyCNNAdapter"
    assert trainer.block_chain.num_blocks == 3 and len(trainer.aux_heads) == 2
    fresh = recipe["TinyCNNForImageClassification"](recipe["TinyCNNConfig"](num_labels=5))
    assert any(not torch.equal(a, b) for a, b in zip(model.state_dict().values(), fresh.state_dict().values()))


def test_the_recipes_adapter_is_the_model_and_matches_autograd(recipe):
    torch.manual_seed(0)
    model = recipe["TinyCNNForImageClassification"](recipe["TinyCNNConfig"](num_labels=5)).double()
    adapter = get_adapter(model)
    chain = adapter.chain(model, adapter.aux_heads(model, 1).double())
    x = torch.randn(4, 3, 16, 16, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 3])
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(chain.heads[-1](chain.block_outputs(x)[-1]), model(pixel_values=x).logits)
    model.train()
    loss_fn = lambda logits: torch.nn.functional.cross_entropy(logits, y)  # noqa: E731
    assert_local_gradients_match_reference(chain, x, loss_fn, 1)  # block t learns from the head on x_{t+1}


def test_the_recipes_model_with_full_horizon_equals_plain_trainer(recipe, tmp_path):
    cls, config = recipe["TinyCNNForImageClassification"], recipe["TinyCNNConfig"]
    data = SyntheticImages(64)
    torch.manual_seed(0)
    reference = cls(config(num_labels=5))
    plain_args = training_args(tmp_path / "a", TrainingArguments, max_steps=3)
    Trainer(model=reference, args=plain_args, train_dataset=data).train()
    torch.manual_seed(0)
    model = cls(config(num_labels=5))
    args = training_args(tmp_path / "b", local_horizon=3, max_steps=3)
    BPModifiedTrainer(model=model, args=args, train_dataset=data).train()
    for a, b in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
