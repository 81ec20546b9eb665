#!/usr/bin/env python
"""Check the lean install: in a virtual environment holding only torch and ``pip install .``, the package imports,
brings none of the examples' dependencies, says which extra a gated part needs, and trains a tiny model.

    make test-lean
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import tempfile

import torch

GATED = ("datasets", "evaluate", "peft", "PIL", "animal_shape_mnist")


def main() -> None:
    present = [name for name in GATED if importlib.util.find_spec(name) is not None]
    assert not present, f"`pip install .` brought the examples' dependencies {present}"

    import hf_bpmod
    from hf_bpmod import BPModifiedTrainer, BPModifiedTrainingArguments
    from hf_bpmod.testing import SyntheticImages, tiny_resnet

    assert hf_bpmod.__file__.find("site-packages") >= 0, f"imported the source tree, not the install: {hf_bpmod}"
    from hf_bpmod.metrics import load_accuracy_metric  # numpy comes with transformers; `evaluate` does not

    for part, use in (
        ("hf_bpmod.data", lambda: importlib.import_module("hf_bpmod.data")),
        ("hf_bpmod.metrics", load_accuracy_metric),
    ):
        try:
            use()
        except ImportError as error:
            assert '"hf_bpmod[examples]"' in str(error), error
        else:
            raise AssertionError(f"{part} worked without the examples extra")

    model = tiny_resnet()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with tempfile.TemporaryDirectory() as out:
        args = BPModifiedTrainingArguments(
            output_dir=out, max_steps=4, per_device_train_batch_size=8, learning_rate=0.05, optim="sgd",
            report_to="none", offset_batch_size=16, offset_micro_batch_size=8, save_strategy="no", use_cpu=True,
        )  # fmt: skip
        trainer = BPModifiedTrainer(model=model, args=args, train_dataset=SyntheticImages(64, num_labels=5))
        trainer.train()
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert trainer.uses_offset and trainer.offset.state.period_index >= 1, "the offset never refreshed"
    assert len(changed) > len(before) // 2, f"only {len(changed)} of {len(before)} tensors changed"
    print(
        f"lean install OK: hf_bpmod {hf_bpmod.__version__}, torch {torch.__version__}, {len(changed)} tensors trained"
    )


if __name__ == "__main__":
    sys.exit(main())
