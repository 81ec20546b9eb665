"""BPModifiedTrainer under data parallelism, for ``tests/test_distributed.py``.

Launched as ``torchrun --nproc_per_node 2 tests/distributed_script.py --out DIR [--configs a,b]`` (gloo, CPU): every
rank runs each configuration and writes ``DIR/<config>_rank<r>.pt`` with its parameters, buffers, auxiliary heads,
offsets, the examples it trained on and how often the DDP wrapper's forward ran. The test imports :func:`run` to make
the one-process reference with the same global batches in its own process.
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Any

import torch
from torch import nn

from hf_bpmod import BPModifiedTrainer, BPModifiedTrainingArguments
from hf_bpmod.testing import SyntheticImages, tiny_resnet, tiny_vit, weighted_cross_entropy

# Per configuration: the model, the trainer arguments, and {world size: (per-device batch, accumulation steps)} so
# that both runs see the same global batch at every micro-step. ResNet's one-process reference accumulates two
# micro-batches of 16 instead of taking one of 32, so that BatchNorm normalises over the same 16 examples.
CONFIGS: dict[str, dict[str, Any]] = {
    "vit_h1": dict(
        model="vit",
        batches={2: (16, 1), 1: (32, 1)},
        # 3 offset micro-batches over 2 ranks (not divisible); an evaluation in the middle of training, with every
        # head's accuracy, and one more on ODD_EVAL_SIZE examples, which 2 ranks split unevenly
        args=dict(
            bp_modified=True,
            local_horizon=1,
            offset_batch_size=24,
            offset_period="2",
            eval_strategy="steps",
            eval_steps=2,
            eval_block_accuracy=True,
        ),
    ),
    "vit_h2": dict(
        model="vit",
        batches={2: (8, 2), 1: (16, 2)},
        # `seed` differs between ranks (rank 0 has the reference's): the auxiliary heads must still start equal
        rank_seeds=True,
        args=dict(bp_modified=True, local_horizon=2, offset_batch_size=32, offset_period="2", offset_seed=0),
    ),
    "vit_bp": dict(model="vit", batches={2: (16, 1), 1: (32, 1)}, args=dict(local_horizon=99)),
    # a user's `compute_loss_func`, normalised by `num_items_in_batch` (counted over both processes), with accumulation
    "vit_h1_weighted": dict(
        model="vit",
        batches={2: (8, 2), 1: (16, 2)},
        weighted_loss=True,
        args=dict(bp_modified=True, local_horizon=1, offset_batch_size=24, offset_period="2"),
    ),
    "resnet_h1": dict(
        model="resnet",
        batches={2: (16, 1), 1: (16, 2)},
        args=dict(local_horizon=1, offset_batch_size=24, offset_period="2"),
    ),
}
MAX_STEPS = 3
TRAIN_SIZE = 128
EVAL_SIZE = 32
ODD_EVAL_SIZE = 27  # batches of 8 per rank: the last global batch of 11 is padded to 16 across the 2 ranks


class _DDPForwardCounter:
    """Counts calls of ``DistributedDataParallel.forward`` in this process (our training path must make none)."""

    calls = 0

    @classmethod
    def install(cls) -> None:
        original = nn.parallel.DistributedDataParallel.forward
        if getattr(original, "_counted", False):
            return

        def forward(self, *args, **kwargs):
            cls.calls += 1
            return original(self, *args, **kwargs)

        forward._counted = True  # type: ignore[attr-defined]
        nn.parallel.DistributedDataParallel.forward = forward


class RecordingTrainer(BPModifiedTrainer):
    """Records the training examples of every micro-batch, the offset micro-batches and every offset refresh."""

    def __init__(self, *args, example_keys: dict[tuple[float, ...], int], **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.example_keys = example_keys
        self.seen_batches: list[list[int]] = []
        self.offset_micro_batches: list[list[int]] = []
        self.refreshes: list[dict[str, Any]] = []

    def _index_of(self, pixel_values: torch.Tensor) -> list[int]:
        return [self.example_keys[_key(x)] for x in pixel_values]

    def training_step(self, model, inputs, num_items_in_batch=None):
        self.seen_batches.append(self._index_of(inputs["pixel_values"]))
        return super().training_step(model, inputs, num_items_in_batch)

    def _offset_data(self):
        data = super()._offset_data()
        fetch = data.fetch

        def recording_fetch(indices):
            self.offset_micro_batches.append(list(indices))
            return fetch(indices)

        data.fetch = recording_fetch
        return data

    def _refresh_offset(self) -> None:
        super()._refresh_offset()
        self.refreshes.append(
            {
                "step": self.state.global_step,
                "blocks": [
                    {
                        "scale": b.scale,
                        "weight": b.weight,
                        "a": b.a,
                        "lam": b.lam,
                        "delta": None if b.delta is None else [d.detach().clone() for d in b.unscaled_delta()],
                    }
                    for b in self.offset.state.blocks
                ],
            }
        )


def _key(pixels: torch.Tensor) -> tuple[float, ...]:
    return tuple(round(v, 5) for v in pixels.flatten()[:4].tolist())


def _model(kind: str) -> nn.Module:
    return tiny_vit(num_layers=4) if kind == "vit" else tiny_resnet(depths=(2, 2))


def run(name: str, out_dir: str, world_size: int) -> dict[str, Any]:
    """Train configuration ``name`` in this process (one rank of ``world_size``) and return what it recorded."""
    config = CONFIGS[name]
    per_device, accumulation = config["batches"][world_size]
    rank = int(os.environ.get("RANK", "0"))
    train, evaluation = SyntheticImages(TRAIN_SIZE, seed=0), SyntheticImages(EVAL_SIZE, seed=1)
    keys = {_key(train[i]["pixel_values"]): i for i in range(len(train))}
    assert len(keys) == len(train)
    args = BPModifiedTrainingArguments(
        output_dir=os.path.join(out_dir, f"{name}_ws{world_size}"),
        per_device_train_batch_size=per_device,
        gradient_accumulation_steps=accumulation,
        per_device_eval_batch_size=8,
        max_steps=MAX_STEPS,
        learning_rate=0.05,  # SGD with momentum, as the paper: AdamW would amplify float rounding near zero gradients
        optim="sgd",
        optim_args="momentum=0.9",
        max_grad_norm=1.0,
        offset_micro_batch_size=8,
        seed=rank if config.get("rank_seeds") else 0,
        data_seed=0,
        use_cpu=True,
        ddp_find_unused_parameters=False,
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        **({"ddp_backend": "gloo"} if world_size > 1 else {}),
        **config["args"],
    )
    model = _model(config["model"])
    trainer = RecordingTrainer(
        model=model,
        args=args,
        train_dataset=train,
        eval_dataset=evaluation,
        example_keys=keys,
        compute_loss_func=weighted_cross_entropy if config.get("weighted_loss") else None,
    )
    aux_init = {k: v.detach().clone() for k, v in trainer.aux_heads.state_dict().items()}
    _DDPForwardCounter.install()
    start = time.perf_counter()
    calls_before = _DDPForwardCounter.calls
    trainer.train()
    train_calls = _DDPForwardCounter.calls - calls_before
    seconds = time.perf_counter() - start
    final_eval = trainer.evaluate()
    odd_eval = None
    if args.eval_block_accuracy:
        odd_eval = trainer.evaluate(SyntheticImages(ODD_EVAL_SIZE, seed=2), metric_key_prefix="odd")
    return {
        "name": name,
        "world_size": world_size,
        "rank": trainer.args.process_index,
        "wrapped": type(trainer.model_wrapped).__name__,
        "ddp_forward_calls_in_training": train_calls,
        "seconds": seconds,
        "params": {n: p.detach().clone() for n, p in trainer.model.named_parameters()},
        "buffers": {n: b.detach().clone() for n, b in trainer.model.named_buffers()},
        "aux_init": aux_init,
        "aux": {k: v.detach().clone() for k, v in trainer.aux_heads.state_dict().items()},
        "batches": trainer.seen_batches,
        "offset_micro_batches": trainer.offset_micro_batches,
        "refreshes": trainer.refreshes,
        "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h],
        "eval_losses": [h["eval_loss"] for h in trainer.state.log_history if "eval_loss" in h],
        "final_eval_loss": final_eval["eval_loss"],
        "block_losses": [
            {k: v for k, v in h.items() if k.startswith("block_") or k == "loss"}
            for h in trainer.state.log_history
            if "loss" in h
        ],
        "odd_eval": odd_eval,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", required=True)
    parser.add_argument("--configs", default=",".join(CONFIGS))
    cli = parser.parse_args()
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    os.makedirs(cli.out, exist_ok=True)
    for name in cli.configs.split(","):
        result = run(name, cli.out, world_size)
        torch.save(result, os.path.join(cli.out, f"{name}_rank{rank}.pt"))
    if torch.distributed.is_initialized():
        # left to interpreter exit, gloo's threads were sometimes destroyed still joinable: "terminate called
        # without an active exception", exit code -6, after every result had been written
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
