"""The auxiliary heads and offset state in checkpoints: nothing read from them can run code, and a damaged,
truncated or mismatched state is refused (naming the file, before anything is loaded) unless
``rebuild_bpmod_state=True`` asks for fresh heads and offsets."""

import hashlib
import json
import logging
import os
import pickle
import shutil
import struct
import threading
from types import SimpleNamespace

import pytest
import torch
from helpers import training_args
from transformers import Trainer, TrainerCallback

from hf_bpmod import BPModifiedTrainer, BPModifiedTrainingArguments
from hf_bpmod.adapters import get_adapter
from hf_bpmod.checkpoint import BPModStateError, load_bpmod_state, read_bpmod_state, save_bpmod_state
from hf_bpmod.testing import SyntheticImages, tiny_vit

pytestmark = pytest.mark.compat  # checkpoints and resume go through the Trainer's own saving and loading

JSON, TENSORS, LEGACY = "bpmod_state.json", "bpmod_state.safetensors", "bpmod_state.pt"
#: The offset on and a checkpoint every 3 steps (helpers.COMMON holds the rest).
KW = dict(
    local_horizon=1, bp_modified=True, offset_batch_size=32, offset_period="4", save_strategy="steps", save_steps=3
)
DATA = SyntheticImages(96)


def _args(out, **kw) -> BPModifiedTrainingArguments:
    return training_args(out, **{**KW, **kw})


def _train(out, model=None, max_steps=3, cls=BPModifiedTrainer, **kw):
    trainer = cls(
        model=model or tiny_vit(num_layers=4), args=_args(out, max_steps=max_steps, **kw), train_dataset=DATA
    )
    trainer.train()
    return trainer


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A checkpoint at step 3, mid-period of an offset refreshed at step 0, and one of another (wider) model."""
    root = tmp_path_factory.mktemp("saved")
    _train(root / "run")
    _train(root / "other", model=tiny_vit(num_layers=4, hidden_size=16))
    return root / "run" / "checkpoint-3", root / "other" / "checkpoint-3"


@pytest.fixture
def checkpoint(saved, tmp_path):
    copy = tmp_path / "checkpoint-3"
    shutil.copytree(saved[0], copy)
    return copy


class _Payload:
    """Unpickling it creates the folder ``marker``: proof that a load ran code."""

    def __init__(self, marker) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


class _AtTrainBegin(TrainerCallback):
    """What the resumed trainer holds once the checkpoint is loaded, before its first step."""

    def __init__(self, trainer) -> None:
        self.trainer, self.seen = trainer, {}

    def on_train_begin(self, args, state, control, **kwargs):
        t = self.trainer
        self.seen = {
            "heads": {k: v.clone() for k, v in t.aux_heads.state_dict().items()},
            "offset": (t.offset.state.period_index, t.offset.state.next_refresh_step, len(t.offset.state.blocks)),
            "head_moments": [p for p in t.aux_heads.parameters() if p in t.optimizer.state],
            "model_moments": sum(p in t.optimizer.state for p in t.model.parameters()),
        }


def _resume(checkpoint, tmp_path, **kw):
    args = _args(tmp_path / "resumed", max_steps=5, **kw)
    trainer = BPModifiedTrainer(model=tiny_vit(num_layers=4, seed=123), args=args, train_dataset=DATA)
    probe = _AtTrainBegin(trainer)
    trainer.add_callback(probe)
    trainer.train(resume_from_checkpoint=str(checkpoint))
    return trainer, probe.seen


def _refused(checkpoint, tmp_path, file, match):
    """Resuming fails with an error naming ``file`` and the flag that goes on, before the optimizer is loaded."""
    args = _args(tmp_path / "resumed", max_steps=5)
    trainer = BPModifiedTrainer(model=tiny_vit(num_layers=4, seed=123), args=args, train_dataset=DATA)
    with pytest.raises(BPModStateError, match=match) as error:
        trainer.train(resume_from_checkpoint=str(checkpoint))
    assert str(error.value).startswith(str(checkpoint / file) + ": ")
    assert "`rebuild_bpmod_state=True`" in str(error.value)
    # nothing half-loaded, no step taken (the Trainer restores its step count before the optimizer in transformers 5,
    # after it in 4.52)
    assert not trainer.optimizer.state and trainer.state.global_step in (0, 3)


def _digest(desc) -> str:
    """The SHA-256 a state file records of its own content: its canonical JSON (sorted keys, no spaces) without the
    ``sha256`` field."""
    content = {k: v for k, v in desc.items() if k != "sha256"}
    return hashlib.sha256(json.dumps(content, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _rewrite_json(checkpoint, change, resign=True):
    """Change the JSON; with ``resign``, record the changed content's SHA-256, as a forger would (so that the
    content is what gets checked)."""
    desc = json.loads((checkpoint / JSON).read_text())
    change(desc)
    if resign and "sha256" in desc:
        desc["sha256"] = _digest(desc)
    (checkpoint / JSON).write_text(json.dumps(desc))


def _rechecksum(checkpoint):
    """Record the tensors file's current checksum, as a forger would (so that its content is what gets checked)."""
    digest = hashlib.sha256((checkpoint / TENSORS).read_bytes()).hexdigest()
    _rewrite_json(checkpoint, lambda d: d["tensors"].update(sha256=digest))


def _rewrite_state(checkpoint, change):
    """Write the checkpoint's state anew, consistently (valid checksum), after ``change``."""
    state, _ = read_bpmod_state(str(checkpoint))
    change(state)
    save_bpmod_state(state, str(checkpoint))


def _to_legacy(checkpoint, state=None):
    """The state as an earlier release wrote it: ``torch.save`` of tensors and plain values into ``bpmod_state.pt``."""
    state = state if state is not None else read_bpmod_state(str(checkpoint))[0]
    torch.save(state, checkpoint / LEGACY)
    os.remove(checkpoint / JSON)
    os.remove(checkpoint / TENSORS)


# ------------------------------------------------------------------------------------------------ payloads
@pytest.mark.filterwarnings("ignore:Detected pickle protocol")  # torch's note on the raw pickle
@pytest.mark.parametrize("writer", ["torch.save", "pickle.dumps"])
def test_a_pickle_payload_in_the_legacy_state_file_is_not_run(checkpoint, tmp_path, writer):
    marker = tmp_path / "payload-ran"
    payload = {"aux_heads": _Payload(marker), "offset": {}, "local_horizon": 1, "block_granularity": "layer"}
    _to_legacy(checkpoint, state={})
    if writer == "torch.save":
        torch.save(payload, checkpoint / LEGACY)
    else:
        (checkpoint / LEGACY).write_bytes(pickle.dumps(payload))
    _refused(checkpoint, tmp_path, LEGACY, r"loaded safely .*it was not unpickled")
    assert not marker.exists()


def test_a_payload_in_the_json_file_is_not_run(checkpoint, tmp_path):
    marker = tmp_path / "payload-ran"
    written = (checkpoint / JSON).read_bytes()
    (checkpoint / JSON).write_bytes(pickle.dumps(_Payload(marker)))
    _refused(checkpoint, tmp_path, JSON, r"not valid JSON")
    # JSON that names a callable, as object-restoring JSON libraries read it
    (checkpoint / JSON).write_bytes(written)
    _rewrite_json(checkpoint, lambda d: d.update({"py/reduce": [{"py/function": "os.mkdir"}, [str(marker)]]}))
    _refused(checkpoint, tmp_path, JSON, r"\['py/reduce'\] unknown")
    assert not marker.exists()


def test_a_payload_in_the_safetensors_file_is_not_run(checkpoint, tmp_path):
    marker = tmp_path / "payload-ran"
    torch.save({"aux_heads": _Payload(marker)}, checkpoint / TENSORS)
    _rechecksum(checkpoint)
    _refused(checkpoint, tmp_path, TENSORS, r"not a readable safetensors file")
    # hand-made: a valid header with a pickled payload in its metadata and a tensor we do not read
    header = {
        "__metadata__": {"format": "pt", "payload": pickle.dumps(_Payload(marker)).hex()},
        "evil": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
    }
    raw = json.dumps(header).encode()
    (checkpoint / TENSORS).write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * 4)
    _rechecksum(checkpoint)
    _refused(checkpoint, tmp_path, TENSORS, r"\['evil'\] are unexpected")
    assert not marker.exists()


# ------------------------------------------------------------------------------------------------ damage
def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _flip_offset_bit(checkpoint):
    """Flip one bit inside the offset of block 0 (the JSON and its checksum left as they were)."""
    data = bytearray((checkpoint / TENSORS).read_bytes())
    (n,) = struct.unpack("<Q", data[:8])
    start = json.loads(data[8 : 8 + n])["offset.0.0"]["data_offsets"][0]
    data[8 + n + start + 1] ^= 0x10
    (checkpoint / TENSORS).write_bytes(bytes(data))


def _nan_in_a_head(state):
    key = next(k for k, v in state["aux_heads"].items() if v.is_floating_point())
    state["aux_heads"][key][0] = float("nan")


def _wrong_offset_shape(state):
    block = next(b for b in state["offset"]["blocks"] if b["delta"] is not None)
    block["delta"][0] = torch.zeros(3, 3)


def _changed(state, change):
    change(state)
    return state


CASES = {
    "truncated tensors": (lambda c: _truncate(c / TENSORS), TENSORS, "SHA-256 .* the file was changed"),
    "truncated json": (lambda c: _truncate(c / JSON), JSON, "not valid JSON"),
    "random bytes in tensors": (lambda c: (c / TENSORS).write_bytes(os.urandom(4096)), TENSORS, "SHA-256"),
    "random bytes in json": (lambda c: (c / JSON).write_bytes(os.urandom(4096)), JSON, "not valid JSON"),
    "empty json object": (lambda c: (c / JSON).write_text("{}"), JSON, "fields .*'bp_modified'.* are missing"),
    "flipped bit in the offset": (_flip_offset_bit, TENSORS, "SHA-256 .* the file was changed"),
    "NaN in a head": (lambda c: _rewrite_state(c, _nan_in_a_head), TENSORS, r"`aux_heads\..*` holds non-finite"),
    "NaN offset scalar": (
        lambda c: _rewrite_json(c, lambda d: d["offset"]["blocks"][0].update(scale=float("nan"))),
        JSON,
        "offset block 0's `scale` is nan, not a finite number",
    ),
    "string for a step": (
        lambda c: _rewrite_json(c, lambda d: d["offset"].update(next_refresh_step="4")),
        JSON,
        r"`offset.next_refresh_step` is '4' \(str\), expected int",
    ),
    "offset of another shape": (
        lambda c: _rewrite_state(c, _wrong_offset_shape),
        JSON,
        r"the offset of block \d, tensor 0, is torch.float32 \(3, 3\), the parameter's torch.float32",
    ),
    "json missing": (lambda c: os.remove(c / JSON), JSON, f"the file is missing next to {TENSORS}"),
    "tensors missing": (lambda c: os.remove(c / TENSORS), TENSORS, f"the file is missing \\(described by {JSON}"),
    "both missing": (
        lambda c: (os.remove(c / JSON), os.remove(c / TENSORS)),
        JSON,
        "not written by BPModifiedTrainer, or its state files were lost",
    ),
    "legacy truncated": (lambda c: (_to_legacy(c), _truncate(c / LEGACY)), LEGACY, "loaded safely"),
    "legacy random bytes": (
        lambda c: (_to_legacy(c), (c / LEGACY).write_bytes(os.urandom(4096))),
        LEGACY,
        "loaded safely",
    ),
    "legacy empty dict": (lambda c: _to_legacy(c, state={}), LEGACY, "`aux_heads` is missing"),
    "legacy NaN in a head": (
        lambda c: _to_legacy(c, state=_changed(read_bpmod_state(str(c))[0], _nan_in_a_head)),
        LEGACY,
        r"`aux_heads\..*` holds non-finite",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_damaged_state_is_refused_naming_the_file(checkpoint, tmp_path, case):
    damage, file, match = CASES[case]
    damage(checkpoint)
    _refused(checkpoint, tmp_path, file, match)


def test_the_state_of_another_model_is_refused(checkpoint, saved, tmp_path):
    for name in (JSON, TENSORS):
        shutil.copy(saved[1] / name, checkpoint / name)
    want = r"auxiliary head `.*` is torch.float32 \(16,\), this model's is torch.float32 \(32,\): another model"
    _refused(checkpoint, tmp_path, JSON, want)


# ------------------------------------------------------------------------------------------------ values
@pytest.mark.parametrize(
    "before, after",
    [
        ('"scale": 1.0', '"scale": 2.0'),
        ('"next_refresh_step": 4', '"next_refresh_step": 5'),
        ('"bias": 4', '"bias": 5'),
    ],
)
def test_one_changed_digit_in_the_json_is_refused(checkpoint, tmp_path, before, after):
    text = (checkpoint / JSON).read_text()
    assert before in text
    (checkpoint / JSON).write_text(text.replace(before, after, 1))
    _refused(
        checkpoint, tmp_path, JSON, r"its content's SHA-256 is not the one recorded in it .* the file was changed"
    )


def _block0(**values):
    return lambda state: state["offset"]["blocks"][0].update(values)


def _offset(**values):
    return lambda state: state["offset"].update(values)


def _counters(**values):
    return lambda state: state.setdefault("nonfinite", {}).update(values)


#: Values training cannot produce, each written with a valid checksum (block 0 holds scale = a = c = 1, lam = weight
#: = 0, delta_factor = 1; the checkpoint is of step 3, one refresh done, the next due at step 4).
IMPOSSIBLE = {
    "scale 1e308": (
        _block0(scale=1e308),
        r"offset block 0's `scale` is 1e\+308, beyond what a float32 gradient holds",
    ),
    "scale -1": (_block0(scale=-1.0), r"offset block 0's `scale` is -1.0, not `c \* a` = 1.0"),
    "weight 1e300": (_block0(weight=1e300), r"`weight` is 1e\+300, beyond what a float32 gradient holds"),
    "weight without lambda": (_block0(weight=0.5), r"`weight` is 0.5, not `c \* lam` = 0.0"),
    "lambda above 1": (_block0(lam=1.5, weight=1.5), r"`lam` is 1.5, outside \[0, 1\]"),
    "negative c": (_block0(c=-1.0, scale=-1.0, weight=-0.0), r"`c` is -1.0, below 0"),
    "delta_factor 0": (_block0(delta_factor=0.0), r"`delta_factor` is 0.0, neither 1.0 nor `weight / \(1 - scale\)`"),
    "reliability 2": (_block0(reliability=2.0), r"`reliability` is 2.0, outside \[0, 1\]"),
    "negative bias": (_block0(bias=-1.0), r"`bias` is -1.0, below 0"),
    "cosine 3": (_block0(cosine=3.0), r"`cosine` is 3.0, outside \[-1, 1\]"),
    "refresh far ahead": (
        _offset(next_refresh_step=10**18),
        r"`offset.next_refresh_step` is 1000000000000000000, more than one offset period \(at most \d+ steps\) "
        r"after the checkpoint's step 3",
    ),
    "refresh before the last": (
        _offset(period_index=2, next_refresh_step=1),
        r"`offset.next_refresh_step` is 1, but after 2 refreshes the next is due at step 2 or later",
    ),
    "more refreshes than steps": (
        _offset(period_index=99),
        r"`offset.period_index` is 99, more refreshes than the checkpoint's 3 steps",
    ),
    "offsets before any refresh": (
        _offset(period_index=0),
        r"`offset.period_index` is 0 \(no refresh yet\), but `offset.next_refresh_step` is 4 and 4 blocks hold "
        "offsets",
    ),
    "more skipped steps than steps": (
        _counters(skipped_steps_in_a_row=4),
        r"`nonfinite.skipped_steps_in_a_row` is 4, more than the checkpoint's 3 steps",
    ),
    "more failed refreshes than refreshes": (
        _counters(failed_refreshes_in_a_row=2),
        r"`nonfinite.failed_refreshes_in_a_row` is 2, more than the 1 refreshes",
    ),
}


@pytest.mark.parametrize("case", list(IMPOSSIBLE))
def test_values_training_cannot_produce_are_refused(checkpoint, tmp_path, case):
    change, match = IMPOSSIBLE[case]
    _rewrite_state(checkpoint, change)
    _refused(checkpoint, tmp_path, JSON, match)


@pytest.mark.parametrize("scaling", ["aligned", "optimal", "bias_only", "fixed"])
def test_every_state_training_writes_passes_the_checks(tmp_path, scaling):
    """Offsets refreshed at steps 0 and 2 (the second with a non-zero weight, its vector prepared for the lerp
    path, ``delta_factor = weight / (1 - scale)``): the checkpoint of step 3 is read as written."""
    kw = dict(offset_period="2", offset_scaling=scaling, offset_fixed_a=0.8, offset_fixed_lambda=0.3)
    if scaling != "fixed":
        kw = dict(offset_period="2", offset_scaling=scaling)
    trainer = _train(tmp_path / "run", **kw)
    state, _ = read_bpmod_state(str(tmp_path / "run" / "checkpoint-3"))
    assert (state["offset"]["period_index"], state["offset"]["next_refresh_step"]) == (2, 4)
    blocks = state["offset"]["blocks"]
    assert any(b["weight"] != 0 and b["delta_factor"] not in (0.0, 1.0) for b in blocks) or scaling == "bias_only"
    for block, live in zip(blocks, trainer.offset.state.blocks, strict=True):
        assert {k: v for k, v in block.items() if k != "delta"} == {
            k: v for k, v in vars(live).items() if k != "delta"
        }


def _to_format_1(desc):
    """The JSON as the first format wrote it: no checksum of its own, no non-finite counters."""
    desc.pop("sha256", None)
    desc.pop("nonfinite", None)
    desc["version"] = 1


def test_a_format_1_state_resumes_and_its_values_are_still_checked(checkpoint, saved, tmp_path):
    _rewrite_json(checkpoint, _to_format_1)
    _, seen = _resume(checkpoint, tmp_path)
    state, _ = read_bpmod_state(str(saved[0]))
    for key, value in state["aux_heads"].items():
        torch.testing.assert_close(seen["heads"][key], value, rtol=0, atol=0)
    assert seen["offset"] == (1, 4, 4) and seen["head_moments"]
    # its content has no checksum: a changed digit is caught by the range checks
    _rewrite_json(checkpoint, lambda d: d["offset"]["blocks"][0].update(scale=2.0))
    _refused(checkpoint, tmp_path, JSON, r"offset block 0's `scale` is 2.0, not `c \* a` = 1.0")


# ------------------------------------------------------------------------------------------------ special files
def _finishes(fn, seconds=60.0):
    """What ``fn()`` raised (``None`` if it returned); fails unless it is done within ``seconds``."""
    outcome = {}

    def target():
        try:
            fn()
            outcome["error"] = None
        except BaseException as e:  # noqa: BLE001 - handed to the test
            outcome["error"] = e

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"still reading after {seconds:g} s"
    return outcome["error"]


def _release(path):
    """Let a reader blocked on the named pipe ``path`` go (a writer opens it and closes it at once)."""
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
    except OSError:  # nobody reading
        pass


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="named pipes and /dev/zero are POSIX")
@pytest.mark.parametrize("kind", ["named pipe", "link to /dev/zero"])
@pytest.mark.parametrize("file", [JSON, TENSORS, LEGACY])
def test_a_special_file_as_a_state_file_is_refused_without_reading_it(checkpoint, file, kind):
    if file == LEGACY:
        _to_legacy(checkpoint)
    path = checkpoint / file
    os.remove(path)
    if kind == "named pipe":
        os.mkfifo(path)
    else:
        os.symlink("/dev/zero", path)
    try:
        error = _finishes(lambda: read_bpmod_state(str(checkpoint)), seconds=20)
    finally:
        if kind == "named pipe":
            _release(path)
    assert isinstance(error, BPModStateError), error
    assert str(error).startswith(f"{path}: not a regular file (")


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="named pipes are POSIX")
def test_resuming_from_a_named_pipe_is_refused_at_once(checkpoint, tmp_path):
    os.remove(checkpoint / TENSORS)
    os.mkfifo(checkpoint / TENSORS)
    try:
        assert (
            _finishes(lambda: _refused(checkpoint, tmp_path, TENSORS, r"not a regular file \(a named pipe\)")) is None
        )
    finally:
        _release(checkpoint / TENSORS)


@pytest.mark.parametrize("file", [JSON, TENSORS])
def test_a_state_file_larger_than_the_state_can_be_is_refused_before_it_is_read(checkpoint, tmp_path, file):
    """The JSON of a state is at most 8 MiB; the tensors at most twice what this model's heads and offsets take
    (plus the file's header): a larger file is not read."""
    with open(checkpoint / file, "ab") as f:
        f.truncate((checkpoint / file).stat().st_size + 9 * 2**20)
    bound = r"8388608" if file == JSON else r"\d+"
    _refused(checkpoint, tmp_path, file, rf"the file is \d+ bytes, more than the {bound} bytes")


# ------------------------------------------------------------------------------------------------ going on
def test_rebuild_bpmod_state_resumes_with_fresh_heads_and_offsets(checkpoint, tmp_path, caplog):
    """The model and optimizer come from the checkpoint; the heads are those built at init (with no optimizer
    state), the offset is refreshed at the first resumed step, and a warning says so. An intact state is loaded."""
    _flip_offset_bit(checkpoint)
    fresh = BPModifiedTrainer(model=tiny_vit(num_layers=4, seed=123), args=_args(tmp_path / "x"), train_dataset=DATA)
    built = fresh.aux_heads.state_dict()
    with caplog.at_level(logging.WARNING, logger="hf_bpmod.checkpoint"):
        trainer, seen = _resume(checkpoint, tmp_path, rebuild_bpmod_state=True)
    assert f"rebuild_bpmod_state=True: {checkpoint / TENSORS} cannot be resumed from (its SHA-256" in caplog.text
    assert "fresh auxiliary heads" in caplog.text
    for key, value in built.items():
        torch.testing.assert_close(seen["heads"][key], value, rtol=0, atol=0)
    assert seen["offset"] == (0, 0, 0) and not seen["head_moments"] and seen["model_moments"] > 0
    assert trainer.state.global_step == 5 and trainer.offset.state.period_index == 1  # refreshed at step 3
    assert trainer.offset.state.next_refresh_step > 3
    assert all(torch.isfinite(p).all() for p in [*trainer.model.parameters(), *trainer.aux_heads.parameters()])


def test_rebuild_bpmod_state_loads_an_intact_state(saved, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="hf_bpmod.checkpoint"):
        _, seen = _resume(saved[0], tmp_path, rebuild_bpmod_state=True)
    state, _ = read_bpmod_state(str(saved[0]))
    assert "rebuild_bpmod_state" not in caplog.text
    for key, value in state["aux_heads"].items():
        torch.testing.assert_close(seen["heads"][key], value, rtol=0, atol=0)
    assert seen["offset"] == (1, 4, 4) and seen["head_moments"]


def test_load_bpmod_state_checks_against_plain_objects(saved, checkpoint):
    """``load_bpmod_state`` from heads, the blocks' parameters and the arguments alone: an intact state as read, a
    damaged one refused, or ``None`` (the caller starts afresh) with ``rebuild_bpmod_state``, a block split that is
    not the checkpoint's refused."""
    model = tiny_vit(num_layers=4)
    adapter = get_adapter(model)
    aux_heads = adapter.aux_heads(model, 1)
    block_params = adapter.chain(model, aux_heads).block_params
    args = SimpleNamespace(local_horizon=1, block_granularity="layer", rebuild_bpmod_state=False, should_log=True)
    state, _ = read_bpmod_state(str(saved[0]))
    loaded = load_bpmod_state(str(saved[0]), aux_heads, block_params, args)
    assert loaded["aux_heads"].keys() == state["aux_heads"].keys() == aux_heads.state_dict().keys()
    assert all(torch.equal(loaded["aux_heads"][k], v) for k, v in state["aux_heads"].items())
    assert any(block["delta"] is not None for block in loaded["offset"]["blocks"])
    for mine, read, params in zip(loaded["offset"]["blocks"], state["offset"]["blocks"], block_params, strict=True):
        if read["delta"] is None:
            assert mine["delta"] is None
        else:
            assert len(mine["delta"]) == len(params) and all(map(torch.equal, mine["delta"], read["delta"]))
    with pytest.raises(ValueError, match=r"trained with `local_horizon=1`, this run has `local_horizon=2`"):
        load_bpmod_state(str(saved[0]), aux_heads, block_params, SimpleNamespace(**{**vars(args), "local_horizon": 2}))
    _flip_offset_bit(checkpoint)
    with pytest.raises(BPModStateError, match="SHA-256"):
        load_bpmod_state(str(checkpoint), aux_heads, block_params, args)
    args.rebuild_bpmod_state = True
    assert load_bpmod_state(str(checkpoint), aux_heads, block_params, args) is None


class _EarlierRelease(BPModifiedTrainer):
    """Saves its state as releases before safetensors did: ``torch.save`` of tensors and plain values."""

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        Trainer._save_optimizer_and_scheduler(self, output_dir)
        torch.save(self.bpmod_state_dict(), os.path.join(output_dir, LEGACY))


def test_a_legacy_state_file_resumes_to_the_uninterrupted_weights(tmp_path):
    full = tiny_vit(num_layers=4)
    _train(tmp_path / "full", model=full, max_steps=6, save_strategy="no")
    _train(tmp_path / "old", max_steps=6, cls=_EarlierRelease)
    checkpoint = tmp_path / "old" / "checkpoint-3"
    assert sorted(n for n in os.listdir(checkpoint) if n.startswith("bpmod")) == [LEGACY]
    resumed = tiny_vit(num_layers=4, seed=123)
    trainer = BPModifiedTrainer(model=resumed, args=_args(tmp_path / "old", max_steps=6), train_dataset=DATA)
    trainer.train(resume_from_checkpoint=str(checkpoint))
    assert max((a - b).abs().max().item() for a, b in zip(resumed.parameters(), full.parameters())) <= 1e-6
    assert trainer.offset.state.period_index == 2
