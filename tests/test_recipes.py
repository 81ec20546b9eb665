"""The paper recipes (examples/paper_recipes/*.yaml): complete, up to date, parsed by the example script, buildable.

Each recipe is parsed as the example script parses its config file and its values are checked against the
paper's settings (Ren & Li, Section 6, Section 6.1, Section 6.2 and Appendix D.2), written out here independently of
``make_recipes.py``. Then its ``BPModifiedTrainer`` is built around a tiny stand-in of the same architecture (wrapped
by the recipe's peft method through the script's ``apply_peft``) on synthetic data: nothing is downloaded.
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch
from helpers import import_file

from hf_bpmod import BPModifiedTrainer, BPModifiedTrainingArguments
from hf_bpmod.config import parse_offset_period
from hf_bpmod.testing import SyntheticImages, tiny_resnet, tiny_vit

ROOT = Path(__file__).resolve().parents[1]
RECIPE_DIR = ROOT / "examples" / "paper_recipes"
RECIPES = sorted(RECIPE_DIR.glob("*.yaml"))

pytestmark = (
    pytest.mark.compat
)  # the recipes' optimizer (SGD with momentum) comes through compat.py before transformers 5

# The paper's settings. Section 6: "batch size B = 64, learning rate 0.001 and epoch 30, and SGD optimizer with
# momentum 0.9 ... B' = 320 and split into mini-batches with size 8 ... the period of the offset update is one
# epoch ... resized to (224,224) ... For the LoRA and LoKr, the rank and alpha are set to be r = 1, alpha = 4".
# Section 6.1 (Tiny-ImageNet): "the total epochs to 10 and period K = 500".
BATCH_SIZE, LEARNING_RATE, MOMENTUM, IMAGE_SIZE = 64, 1e-3, 0.9, 224
OFFSET_BATCH_SIZE, OFFSET_MICRO_BATCH_SIZE = 320, 8
PEFT_RANK, PEFT_ALPHA = 1, 4.0
EPOCHS = {"cifar100": 30, "tinyimagenet": 10}
PERIOD = {"cifar100": (1.0, "epoch"), "tinyimagenet": (500.0, "step")}
DATA = {
    "cifar100": ("uoft-cs/cifar100", "img", "fine_label"),
    "tinyimagenet": ("zh-plus/tiny-imagenet", "image", "label"),
}
TASKS = {
    "resnet50-full": ("microsoft/resnet-50", "none"),
    "resnet50-lokr": ("microsoft/resnet-50", "lokr"),
    "vit-b16-lora": ("google/vit-base-patch16-224-in21k", "lora"),
}
HORIZON = {"ff": 1, "loco": 2, "mpc": 5}
# Blocks of the real models (one per residual layer of ResNet-50: 3+4+6+3; one per encoder layer of ViT-B/16): BP's
# horizon must cover them, the local methods' must not.
REAL_BLOCKS = {"resnet50": 16, "vit-b16": 12}
# Rows of Tables 3, 6 and 7 that are not a repeat of a Table 1 experiment, and how they differ from FF BP-modified.
ABLATIONS: dict[tuple[str, str], dict[str, Any]] = {
    ("table3", "ff-bpmod-lambda0"): {"offset_scaling": "bias_only"},  # Section 6.2: lambda = 0, a = a*_bias
    ("table6", "ff-bpmod-bprime32"): {"offset_batch_size": 32},  # Appendix D.2: B' in {32, 320, 3200}
    ("table6", "ff-bpmod-bprime3200"): {"offset_batch_size": 3200},
    ("table7", "ff-bpmod-k0.1epoch"): {"offset_period": (0.1, "epoch")},  # Appendix D.2: K in {0.1, 0.3, 1} epoch
    ("table7", "ff-bpmod-k0.3epoch"): {"offset_period": (0.3, "epoch")},
}


def expected_cells() -> dict[str, dict[str, Any]]:
    """``{recipe name: the settings the paper gives that cell}`` for every cell of Tables 1, 2, 3, 6 and 7."""
    cells: dict[str, dict[str, Any]] = {}
    rows = ["bp"] + [f"{m}-{v}" for m in HORIZON for v in ("original", "bpmod")]
    for (table, data), task, row in itertools.product(
        (("table1", "cifar100"), ("table2", "tinyimagenet")), TASKS, rows
    ):
        method, _, variant = row.partition("-")
        cells[f"{table}_{data}_{task}_{row}"] = {
            "data": data,
            "task": task,
            "horizon": HORIZON.get(method),  # None: BP
            "bp_modified": variant == "bpmod",
            "offset_scaling": "optimal",
            "offset_batch_size": OFFSET_BATCH_SIZE,
            "offset_period": PERIOD[data],
        }
    for (table, row), changes in ABLATIONS.items():
        for task in TASKS:
            cells[f"{table}_cifar100_{task}_{row}"] = {
                "data": "cifar100",
                "task": task,
                "horizon": 1,
                "bp_modified": True,
                "offset_scaling": "optimal",
                "offset_batch_size": OFFSET_BATCH_SIZE,
                "offset_period": PERIOD["cifar100"],
                **changes,
            }
    return cells


def _parse(script: ModuleType, recipe: Path) -> tuple[Any, Any, BPModifiedTrainingArguments]:
    """The recipe's arguments, read as the script reads its one config file."""
    return script.parse_arguments([str(recipe)])


def test_every_cell_has_a_recipe_and_nothing_else():
    assert sorted(p.stem for p in RECIPES) == sorted(expected_cells())


def test_recipes_match_their_generator():
    make_recipes = import_file("make_recipes", RECIPE_DIR / "make_recipes.py")
    rendered = make_recipes.render_all()
    assert sorted(rendered) == sorted(p.name for p in RECIPES)
    stale = [name for name, text in rendered.items() if (RECIPE_DIR / name).read_text() != text]
    assert not stale, f"run `python examples/paper_recipes/make_recipes.py`: stale {stale}"
    assert make_recipes.main(["--check"]) == 0


@pytest.mark.parametrize("recipe", RECIPES, ids=[p.stem for p in RECIPES])
def test_recipe_has_the_papers_settings(script, recipe):
    cell = expected_cells()[recipe.stem]
    model_args, data_args, args = _parse(script, recipe)

    model_name, peft = TASKS[cell["task"]]
    assert model_args.model_name_or_path == model_name and model_args.model_type is None
    assert model_args.ignore_mismatched_sizes is True  # a new head for the data's classes
    assert model_args.image_size == IMAGE_SIZE
    assert model_args.peft == peft
    if peft != "none":
        assert (model_args.peft_rank, model_args.peft_alpha) == (PEFT_RANK, PEFT_ALPHA)
    assert (data_args.dataset_name, data_args.image_column_name, data_args.label_column_name) == DATA[cell["data"]]

    if cell["horizon"] is None:  # BP: the horizon covers every block of the real model, so gradients are exact
        assert args.local_horizon >= max(REAL_BLOCKS.values())
    else:
        assert args.local_horizon == cell["horizon"] < min(REAL_BLOCKS.values())
    assert args.block_granularity == "layer"
    assert args.bp_modified is cell["bp_modified"]
    if cell["bp_modified"]:
        assert args.offset_scaling == cell["offset_scaling"]
        assert args.offset_batch_size == cell["offset_batch_size"]
        assert args.offset_micro_batch_size == OFFSET_MICRO_BATCH_SIZE
        assert parse_offset_period(args.offset_period) == cell["offset_period"]
        assert not args.offset_bias_correction and not args.offset_reliability  # the paper's estimator, as is

    assert args.per_device_train_batch_size == BATCH_SIZE and args.gradient_accumulation_steps == 1
    assert args.learning_rate == LEARNING_RATE
    assert args.num_train_epochs == EPOCHS[cell["data"]] and args.max_steps == -1
    assert args.optim == "sgd" and args.optim_args == "momentum=0.9"
    assert args.lr_scheduler_type == "constant" and args.warmup_steps == 0
    assert args.weight_decay == 0.0 and args.max_grad_norm == 0.0

    assert args.do_train is True and args.do_eval is True
    assert args.output_dir == f"runs/paper/{recipe.stem}"
    assert args.eval_strategy == "epoch" and args.save_strategy == "epoch"
    assert args.remove_unused_columns is False


def _stand_in(task: str) -> tuple[torch.nn.Module, int]:
    """A tiny model of the recipe's architecture, with more blocks than MPC's horizon 5, and its input size."""
    if task.startswith("resnet50"):
        return tiny_resnet(depths=(2, 2, 2), layer_type="bottleneck", num_labels=5), 16
    return tiny_vit(num_layers=6, image_size=16, num_labels=5), 16


@pytest.mark.parametrize("recipe", RECIPES, ids=[p.stem for p in RECIPES])
def test_recipe_builds_its_trainer(script, recipe, tmp_path):
    cell = expected_cells()[recipe.stem]
    model_args, _, args = _parse(script, recipe)
    args.output_dir = str(tmp_path)  # keep runs/ out of the repository
    model, size = _stand_in(cell["task"])
    if model_args.peft != "none":
        model = script.apply_peft(model, model_args)
        adapters = [n for n, p in model.named_parameters() if p.requires_grad and model_args.peft in n]
        assert adapters, f"no trainable {model_args.peft} parameters"
        modules = [m for m in model.modules() if hasattr(m, "r") and isinstance(m.r, dict)]
        assert modules and all(m.r["default"] == PEFT_RANK for m in modules)
        alphas = [(m.lora_alpha if model_args.peft == "lora" else m.alpha)["default"] for m in modules]
        assert alphas == [PEFT_ALPHA] * len(modules)
    n_train = max(args.offset_batch_size or 0, 3 * BATCH_SIZE)  # unset (no offset): chosen from the data
    trainer = BPModifiedTrainer(
        model=model,
        args=args,
        train_dataset=SyntheticImages(n_train, image_size=size, num_labels=5),
        eval_dataset=SyntheticImages(8, image_size=size, num_labels=5, seed=1),
    )
    blocks = trainer.block_chain.num_blocks
    assert blocks == 6
    assert trainer.offset.settings.batch_size == BATCH_SIZE
    if cell["horizon"] is None:
        assert args.local_horizon >= blocks and len(trainer.aux_heads) == 0 and not trainer.uses_offset
    else:
        assert args.local_horizon < blocks and len(trainer.aux_heads) > 0
        assert trainer.uses_offset is cell["bp_modified"]
    if cell["bp_modified"]:
        value, unit = cell["offset_period"]
        steps_per_epoch = math.ceil(n_train / BATCH_SIZE)
        assert trainer._offset_data().steps_per_epoch == steps_per_epoch
        assert trainer.offset.settings.period_steps(steps_per_epoch) == (
            max(1, round(value * steps_per_epoch)) if unit == "epoch" else value
        )

    optimizer = trainer.create_optimizer()
    assert type(optimizer) is torch.optim.SGD
    for group in optimizer.param_groups:
        assert group["lr"] == LEARNING_RATE and group["momentum"] == MOMENTUM
        assert group["dampening"] == 0 and group["nesterov"] is False and group["weight_decay"] == 0.0
    owned = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert all(id(p) in owned for p in trainer.model.parameters() if p.requires_grad)
