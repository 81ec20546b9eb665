"""Data parallelism and gradient accumulation.

Two processes (``torchrun``, gloo, CPU) train the same model as one process that sees the same global batches; two
accumulation steps of 32 equal one step of 64; the offset statistics, split round-robin over processes, sum to the
one-process ones; unsupported backends are rejected when the trainer is built.

Tolerances: parameters after 3 steps of SGD with momentum (lr 0.05, the paper's optimizer) within
``PARAM_TOL = 1e-5`` of the one-process run (float summation order; AdamW's per-coordinate normalisation would
amplify it near zero gradients); every process holds bit-identical parameters, auxiliary heads, buffers
and offsets; offsets within ``OFFSET_TOL = 1e-6`` of the one-process ones.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from filelock import FileLock
from torch import nn
from transformers import Trainer

from hf_bpmod import BPModifiedTrainer, BPModifiedTrainingArguments, get_adapter
from hf_bpmod.distributed import reject_unsupported_backends
from hf_bpmod.offset_pass import OffsetSettings, Processes, compute_offsets
from hf_bpmod.testing import SyntheticImages, micro_batch_fetch, tiny_resnet, tiny_vit

sys.path.insert(0, str(Path(__file__).parent))
import distributed_script as script  # noqa: E402

PARAM_TOL = 1e-5
OFFSET_TOL = 1e-6
TORCHRUN_TIMEOUT_S = 420
DDP_ERRORS = ("marked ready twice", "unused parameters", "Expected to have finished reduction", "Traceback")


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(((a[k].double() - b[k].double()).abs().max().item() for k in a), default=0.0)


def _identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="session")
def two_process_runs(tmp_path_factory) -> dict[str, Any]:
    """One ``torchrun --nproc_per_node 2`` for every configuration of ``distributed_script.CONFIGS``, run once per
    test session: pytest-xdist workers share its output folder, and the first to take the lock runs it."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the workers' common folder
    out = root / "two_process_runs"
    with FileLock(str(out) + ".lock"):
        if not (out / "finished").exists():
            out.mkdir(exist_ok=True)
            _torchrun(out)
            (out / "finished").touch()
    runs = {
        name: [torch.load(out / f"{name}_rank{r}.pt", weights_only=False) for r in range(2)] for name in script.CONFIGS
    }
    return {"runs": runs}


def _torchrun(out: Path) -> None:
    """Run ``distributed_script.py`` under ``torchrun`` (2 CPU processes) into ``out``; fail with its output."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    command += [str(Path(script.__file__)), "--out", str(out)]
    try:
        proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=TORCHRUN_TIMEOUT_S)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"torchrun did not finish in {TORCHRUN_TIMEOUT_S} s:\n{(e.stderr or '')[-4000:]}")
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"torchrun failed ({proc.returncode}):\n{output[-6000:]}"
    for message in DDP_ERRORS:
        assert message not in output, f"{message!r} in the torchrun output:\n{output[-6000:]}"


def _per_step(batches: list[list[int]], accumulation: int) -> list[list[int]]:
    return [sorted(i for b in batches[k : k + accumulation] for i in b) for k in range(0, len(batches), accumulation)]


@pytest.mark.distributed
@pytest.mark.parametrize("name", list(script.CONFIGS))
def test_two_processes_train_the_one_process_model(two_process_runs, tmp_path, name):
    ranks = two_process_runs["runs"][name]
    one = script.run(name, str(tmp_path), world_size=1)
    config = script.CONFIGS[name]
    two_accumulation, one_accumulation = config["batches"][2][1], config["batches"][1][1]

    # The Trainer wrapped the model in DDP, and training never ran its forward (local gradients call the blocks).
    for r in ranks:
        assert r["world_size"] == 2 and r["wrapped"] == "DistributedDataParallel"
        assert r["ddp_forward_calls_in_training"] == 0
    assert [r["rank"] for r in ranks] == [0, 1]

    # Same global batches: at every optimizer step the two shards together are the one-process batch.
    shards = [_per_step(r["batches"], two_accumulation) for r in ranks]
    union = [sorted(a + b) for a, b in zip(*shards)]
    assert union == _per_step(one["batches"], one_accumulation)
    assert len(union) == script.MAX_STEPS and all(not set(a) & set(b) for a, b in zip(*shards))

    # Every process holds the same model and auxiliary heads (from the start: rank 0's, whatever the seeds) ...
    assert _identical(ranks[0]["params"], ranks[1]["params"])
    assert _identical(ranks[0]["aux_init"], ranks[1]["aux_init"]) and _identical(ranks[0]["aux"], ranks[1]["aux"])
    assert _identical(ranks[0]["aux_init"], one["aux_init"])
    # ... and it is the one-process model.
    initial = dict(script._model(config["model"]).named_parameters())
    assert _max_diff(one["params"], {k: v.detach() for k, v in initial.items()}) > 1e-3  # it did train
    diff = _max_diff(ranks[0]["params"], one["params"])
    print(f"{name}: max parameter difference, 2 processes vs 1: {diff:.2e}")
    assert diff <= PARAM_TOL
    assert _max_diff(ranks[0]["aux"], one["aux"]) <= PARAM_TOL
    assert ranks[0]["losses"] == pytest.approx(one["losses"], rel=1e-5)

    # Offsets: refreshed at the same steps, identical on every process, equal to the one-process offsets; the B'
    # micro-batches are dealt round-robin (3 of them over 2 processes in `vit_h1`), none repeated.
    refreshes = [r["refreshes"] for r in ranks]
    assert bool(one["refreshes"]) == ("offset_batch_size" in config["args"])  # the configs with an offset refresh
    assert (
        [x["step"] for x in refreshes[0]] == [x["step"] for x in refreshes[1]] == [x["step"] for x in one["refreshes"]]
    )
    for refresh0, refresh1, reference in zip(refreshes[0], refreshes[1], one["refreshes"]):
        for b0, b1, bref in zip(refresh0["blocks"], refresh1["blocks"], reference["blocks"]):
            assert (b0["a"], b0["lam"], b0["scale"], b0["weight"]) == (b1["a"], b1["lam"], b1["scale"], b1["weight"])
            assert b0["a"] == pytest.approx(bref["a"], abs=1e-6) and b0["lam"] == pytest.approx(bref["lam"], abs=1e-6)
            assert (b0["delta"] is None) == (b1["delta"] is None) == (bref["delta"] is None)
            for d0, d1, dref in zip(b0["delta"] or [], b1["delta"] or [], bref["delta"] or []):
                assert torch.equal(d0, d1)
                torch.testing.assert_close(d0, dref, rtol=0, atol=OFFSET_TOL)
    if "offset_batch_size" in config["args"]:
        n = config["args"]["offset_batch_size"] // 8
        micro = one["offset_micro_batches"]
        assert len(micro) == n * len(one["refreshes"])
        for k in range(len(one["refreshes"])):
            for r in range(2):
                mine = ranks[r]["offset_micro_batches"][k * len(range(r, n, 2)) : (k + 1) * len(range(r, n, 2))]
                assert mine == micro[k * n : (k + 1) * n][r::2]
    else:
        assert not refreshes[0] and not one["refreshes"]

    # Evaluation (also in the middle of training for `vit_h1`) reports the one-process numbers. (ResNet's running
    # statistics took 3 updates of 16 + 16 examples here and 6 of 16 there: see the BatchNorm test.)
    if config["model"] == "vit":
        assert len(ranks[0]["eval_losses"]) == len(one["eval_losses"]) >= 1
        assert ranks[0]["eval_losses"] == pytest.approx(one["eval_losses"], rel=1e-5)


@pytest.mark.distributed
def test_batchnorm_statistics_are_shared_and_evaluation_is_of_the_saved_model(two_process_runs):
    """Training never calls DDP's forward, which would broadcast rank 0's buffers; the trainer averages the running
    statistics over processes once per optimizer step instead. Every rank then holds the same buffers, and the
    distributed evaluation is the evaluation of the model that rank 0 saves."""
    ranks = two_process_runs["runs"]["resnet_h1"]
    assert _identical(ranks[0]["buffers"], ranks[1]["buffers"])
    model = tiny_resnet(depths=(2, 2))
    model.load_state_dict({**ranks[0]["params"], **ranks[0]["buffers"]})
    untrained = dict(tiny_resnet(depths=(2, 2)).named_buffers())
    assert _max_diff({k: v for k, v in ranks[0]["buffers"].items() if "running" in k},
                     {k: v for k, v in untrained.items() if "running" in k}) > 1e-2  # fmt: skip
    data = SyntheticImages(script.EVAL_SIZE, seed=1)
    with torch.no_grad():
        loss = F.cross_entropy(model.eval()(pixel_values=data.pixel_values).logits, data.labels).item()
    assert ranks[0]["final_eval_loss"] == pytest.approx(loss, rel=1e-5)
    assert ranks[1]["final_eval_loss"] == ranks[0]["final_eval_loss"]


@pytest.mark.distributed
def test_per_block_metrics_are_those_of_all_processes(two_process_runs, tmp_path):
    """Every head's training loss is averaged over both processes (every rank logs the same numbers, the one-process
    run's), and every head's accuracy on 27 examples, split unevenly over the ranks (the last batch padded with
    repeated examples), is that of the saved model and heads on the 27 examples, computed here in one forward."""
    ranks = two_process_runs["runs"]["vit_h1"]
    one = script.run("vit_h1", str(tmp_path), world_size=1)
    heads = [f"block_{s}_loss" for s in range(1, 5)]
    assert len(ranks[0]["block_losses"]) == script.MAX_STEPS
    for logged in (*ranks, one):
        assert all(sorted(k for k in entry if k != "loss") == heads for entry in logged["block_losses"])
        assert all(entry["block_4_loss"] == pytest.approx(entry["loss"], abs=5e-5) for entry in logged["block_losses"])
    assert ranks[0]["block_losses"] == ranks[1]["block_losses"]
    for two, reference in zip(ranks[0]["block_losses"], one["block_losses"]):
        assert [two[k] for k in heads] == pytest.approx([reference[k] for k in heads], rel=1e-5)

    scores = [{k: v for k, v in r["odd_eval"].items() if "block" in k or k == "odd_loss"} for r in ranks]
    assert scores[0] == scores[1] and len(scores[0]) == 5
    model = tiny_vit(num_layers=4)
    model.load_state_dict({**ranks[0]["params"], **ranks[0]["buffers"]})
    aux_heads = get_adapter(model).aux_heads(model, 1)
    aux_heads.load_state_dict(ranks[0]["aux"])
    data = SyntheticImages(script.ODD_EVAL_SIZE, seed=2)
    with torch.no_grad():
        out = model.eval()(pixel_values=data.pixel_values, output_hidden_states=True)
        logits = {s: aux_heads[str(s)].eval()(out.hidden_states[s]) for s in (1, 2, 3)} | {4: out.logits}
    for s, z in logits.items():
        expected = (z.argmax(-1) == data.labels).sum().item() / len(data)
        assert ranks[0]["odd_eval"][f"odd_block_{s}_accuracy"] == expected
    assert [k for k in ranks[0]["odd_eval"] if "block" in k] == [f"odd_block_{s}_accuracy" for s in range(1, 5)]


def _chain_and_fetch():
    model = tiny_vit(num_layers=4)
    adapter = get_adapter(model)
    chain = adapter.chain(model, adapter.aux_heads(model, 1))
    data = SyntheticImages(64)
    fetch = micro_batch_fetch(data)

    return chain, fetch


class _ThreadAllReduce:
    """``dist.all_reduce`` (sum) among ``world_size`` threads, each standing for a process."""

    def __init__(self, world_size: int) -> None:
        self.barrier = threading.Barrier(world_size)
        self.slots: list[torch.Tensor | None] = [None] * world_size

    def for_rank(self, rank: int):
        def reduce_sum(tensor: torch.Tensor) -> None:
            self.slots[rank] = tensor.clone()
            self.barrier.wait()
            total = sum(self.slots)  # the same order on every rank: bit-identical results, as an all-reduce gives
            self.barrier.wait()
            tensor.copy_(total)

        return reduce_sum


@pytest.mark.parametrize("num_micro, world_size", [(4, 2), (3, 2), (5, 3), (2, 4)])
def test_offset_statistics_split_over_processes_sum_to_one_process(num_micro, world_size):
    """Rank ``r`` takes the micro-batches ``i % world_size == r`` (none when there are fewer micro-batches than
    ranks); after the all-reduce every rank derives the same offsets, those of one process that ran them all."""
    chain, fetch = _chain_and_fetch()
    indices = list(range(8 * num_micro))
    kw = dict(settings=OffsetSettings(horizon=1, batch_size=32, micro_batch_size=8), period=4)
    reference, ref_record = compute_offsets(chain, indices, fetch, **kw)
    reduce = _ThreadAllReduce(world_size)
    fetched: list[list[list[int]]] = [[] for _ in range(world_size)]

    def rank_run(rank: int):
        def counting_fetch(idx: list[int]):
            fetched[rank].append(idx)
            return fetch(idx)

        return compute_offsets(chain, indices, counting_fetch, **kw,
                               processes=Processes(rank, world_size, reduce.for_rank(rank)))  # fmt: skip

    with ThreadPoolExecutor(world_size) as pool:
        results = list(pool.map(rank_run, range(world_size)))
    micro = [indices[i : i + 8] for i in range(0, len(indices), 8)]
    assert fetched == [micro[r::world_size] for r in range(world_size)]  # split, none repeated
    for offsets, record in results:
        assert offsets is not None and reference is not None
        for o, o0, ref in zip(offsets, results[0][0], reference):
            assert (o.a, o.lam) == (o0.a, o0.lam) and (o.a, o.lam) == pytest.approx((ref.a, ref.lam), abs=1e-9)
            for d, d0, dref in zip(o.unscaled_delta() or [], o0.unscaled_delta() or [], ref.unscaled_delta() or []):
                assert torch.equal(d, d0)
                torch.testing.assert_close(d, dref, rtol=0, atol=1e-9)
        assert [b["bias"] for b in record["blocks"]] == pytest.approx([b["bias"] for b in ref_record["blocks"]])


def _train(tmp_path: Path, data, per_device: int, accumulation: int, **kw) -> nn.Module:
    args = BPModifiedTrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=per_device, gradient_accumulation_steps=accumulation,
        learning_rate=3e-3, seed=0, data_seed=0, use_cpu=True, report_to="none", save_strategy="no",
        disable_tqdm=True, **kw,
    )  # fmt: skip
    model = tiny_vit(num_layers=4)
    BPModifiedTrainer(model=model, args=args, train_dataset=data).train()
    return model


@pytest.mark.parametrize("bp_modified", [True, False])
def test_accumulation_of_two_32s_equals_one_64(tmp_path, bp_modified):
    """Parameters after 3 optimizer steps (offset refreshed at steps 0 and 2), AdamW with clipping: within 1e-5."""
    data = SyntheticImages(256)
    kw = dict(max_steps=3, bp_modified=bp_modified, offset_batch_size=32, offset_period="2", max_grad_norm=1.0)
    big = _train(tmp_path / "a", data, 64, 1, **kw)
    accumulated = _train(tmp_path / "b", data, 32, 2, **kw)
    diff = max((a - b).abs().max().item() for a, b in zip(big.parameters(), accumulated.parameters()))
    assert diff <= PARAM_TOL
    assert (
        max((a - b).abs().max().item() for a, b in zip(big.parameters(), tiny_vit(num_layers=4).parameters())) > 1e-3
    )


# ---------------------------------------------------------------------------------------------- unsupported backends
def _args(tmp_path, **kw) -> BPModifiedTrainingArguments:
    return BPModifiedTrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none", **kw)


@pytest.mark.parametrize(
    "flag, message",
    [
        ("fsdp_plugin", "FSDP is not supported by BPModifiedTrainer"),
        ("deepspeed_plugin", "DeepSpeed is not supported by BPModifiedTrainer"),
    ],
)
@pytest.mark.compat  # accelerate and transformers name the backends differently across releases
def test_accelerate_level_fsdp_and_deepspeed_are_rejected(tmp_path, monkeypatch, flag, message):
    """An accelerate config (``accelerate launch`` with FSDP / DeepSpeed) turns these on without any argument."""
    original = Trainer.create_accelerator_and_postprocess

    def create(self):
        original(self)
        monkeypatch.setattr(type(self.accelerator.state), flag, property(lambda state: object()), raising=False)

    monkeypatch.setattr(Trainer, "create_accelerator_and_postprocess", create)
    with pytest.raises(ValueError, match=message):
        BPModifiedTrainer(model=tiny_vit(num_layers=2), args=_args(tmp_path))


def _accelerator(parallelism_config=None, **plugins) -> SimpleNamespace:
    """A stand-in accelerator: its state's DeepSpeed and FSDP plugins (``None`` unless given) and parallelism config."""
    state = SimpleNamespace(**{"deepspeed_plugin": None, "fsdp_plugin": None, **plugins})
    return SimpleNamespace(state=state, parallelism_config=parallelism_config)


@pytest.mark.parametrize(
    "accelerator, n_gpu, model, message",
    [
        (_accelerator(deepspeed_plugin=object()), 1, nn.Linear(2, 2), "DeepSpeed is not supported"),
        (_accelerator(fsdp_plugin=object()), 1, nn.Linear(2, 2), "FSDP is not supported"),
        (_accelerator(), 2, nn.Linear(2, 2), "One process sees 2 GPUs"),
        (_accelerator(parallelism_config=SimpleNamespace(cp_size=2)), 1, nn.Linear(2, 2), r"\['cp_size'\] > 1"),
        (_accelerator(), 1, nn.Sequential(nn.SyncBatchNorm(2)), "SyncBatchNorm is not supported"),
        (_accelerator(), 1, nn.Sequential(nn.BatchNorm2d(2)), None),
    ],
    ids=["deepspeed", "fsdp", "data-parallel", "context-parallel", "sync-batchnorm", "plain"],
)
@pytest.mark.compat  # accelerate and transformers name the backends differently across releases
def test_unsupported_backends_are_read_from_the_accelerator_the_arguments_and_the_model(
    accelerator, n_gpu, model, message
):
    args = SimpleNamespace(n_gpu=n_gpu)
    if message is None:
        reject_unsupported_backends(accelerator, args, model)
        return
    with pytest.raises(ValueError, match=message):
        reject_unsupported_backends(accelerator, args, model)


@pytest.mark.compat  # accelerate and transformers name the backends differently across releases
def test_tensor_parallel_config_is_rejected(tmp_path, monkeypatch):
    from accelerate import Accelerator

    if not hasattr(Accelerator, "parallelism_config"):
        pytest.skip("this accelerate has no parallelism config (tensor, context or sequence parallelism)")
    original = Trainer.create_accelerator_and_postprocess

    def create(self):
        original(self)
        config = SimpleNamespace(tp_size=2, cp_size=1, sp_size=1, sp_backend=None, sp_enabled=False)
        monkeypatch.setattr(self.accelerator.state, "parallelism_config", config, raising=False)

    monkeypatch.setattr(Trainer, "create_accelerator_and_postprocess", create)
    with pytest.raises(ValueError, match=r"Tensor, context and sequence parallelism .*\['tp_size'\]"):
        BPModifiedTrainer(model=tiny_vit(num_layers=2), args=_args(tmp_path))


@pytest.mark.compat  # accelerate and transformers name the backends differently across releases
def test_data_parallel_in_one_process_is_rejected(tmp_path):
    args = _args(tmp_path)
    args._n_gpu = 2  # one process that sees two GPUs: the Trainer would use nn.DataParallel
    with pytest.raises(ValueError, match="does not support `nn.DataParallel`.*torchrun --nproc_per_node N"):
        BPModifiedTrainer(model=tiny_vit(num_layers=2), args=args)


@pytest.mark.compat  # accelerate and transformers name the backends differently across releases
def test_sync_batchnorm_is_rejected(tmp_path):
    model = nn.SyncBatchNorm.convert_sync_batchnorm(tiny_resnet(depths=(1, 1)))
    with pytest.raises(ValueError, match="SyncBatchNorm is not supported"):
        BPModifiedTrainer(model=model, args=_args(tmp_path))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (
            dict(torch_compile=True),
            r"`torch_compile` is not supported by BPModifiedTrainer.*Leave `torch_compile`",
        ),
        (dict(fsdp="full_shard"), r"`fsdp` \(.*\) is not supported by .*Use plain data parallelism \(DDP"),
    ],
)
@pytest.mark.compat  # accelerate and transformers name the backends differently across releases
def test_argument_level_backends_are_rejected(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        _args(tmp_path, **kwargs)


@pytest.mark.compat  # accelerate and transformers name the backends differently across releases
def test_deepspeed_argument_is_rejected(tmp_path):
    """Checked before ``TrainingArguments.__post_init__``, which would first ask for the deepspeed package."""
    with pytest.raises(ValueError, match="`deepspeed` is not supported by BPModifiedTrainer"):
        _args(tmp_path, deepspeed={"train_batch_size": "auto"})
