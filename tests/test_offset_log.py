"""The refresh log across runs in one output_dir (run ids, numbered copies, torn lines) and the output_dir lock."""

import json
import logging
import os
import signal
import subprocess
import sys
import threading

import pytest
import torch
from transformers import TrainerCallback

from hf_bpmod import BPModifiedTrainer, BPModifiedTrainingArguments
from hf_bpmod.refresh_log import RefreshLog
from hf_bpmod.run_lock import LOCK_NAME, OutputDirInUseError, RunLock
from hf_bpmod.testing import SyntheticImages, tiny_vit

LOG = "bpmod_offsets.jsonl"


def _trainer(out, model=None, **kw):
    """A tiny ViT with the offset refreshed every step (one record per step)."""
    kw = {
        "max_steps": 2, "per_device_train_batch_size": 16, "learning_rate": 1e-3, "report_to": "none",
        "use_cpu": True, "save_strategy": "no", "seed": 0, "data_seed": 0, "disable_tqdm": True,
        "bp_modified": True, "offset_batch_size": 16, "offset_period": "1", **kw,
    }  # fmt: skip
    args = BPModifiedTrainingArguments(output_dir=str(out), **kw)
    return BPModifiedTrainer(model=model or tiny_vit(num_layers=4), args=args, train_dataset=SyntheticImages(32))


def _records(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def test_three_runs_in_one_folder_keep_every_log_numbered_with_its_run_id(tmp_path):
    for _ in range(3):
        _trainer(tmp_path).train()
    logs = [_records(tmp_path / f"{LOG}.1"), _records(tmp_path / f"{LOG}.2"), _records(tmp_path / LOG)]
    ids = []
    for log in logs:
        assert [r["step"] for r in log] == [0, 1]
        assert len({r["run_id"] for r in log}) == 1 and all(r["resumed_from_step"] is None for r in log)
        ids.append(log[0]["run_id"])
    assert len(set(ids)) == 3  # one id per run, none reused
    assert not (tmp_path / f"{LOG}.3").exists()
    assert not (tmp_path / LOCK_NAME).exists()  # released after each run


def _checkpointed_run(out):
    """Four steps, a refresh at each, checkpoints at steps 2 and 4: records of steps 0-3, all of one run."""
    _trainer(out, max_steps=4, save_strategy="steps", save_steps=2).train()
    log = _records(out / LOG)
    assert [r["step"] for r in log] == [0, 1, 2, 3] and len({r["run_id"] for r in log}) == 1
    return log


def test_resume_keeps_the_records_before_its_checkpoint_and_the_rest_only_in_the_numbered_copy(tmp_path):
    first = _checkpointed_run(tmp_path)
    original = (tmp_path / LOG).read_bytes()
    _trainer(tmp_path, tiny_vit(num_layers=4, seed=1), max_steps=4).train(str(tmp_path / "checkpoint-2"))
    log = _records(tmp_path / LOG)
    assert [r["step"] for r in log] == [0, 1, 2, 3]
    assert log[:2] == first[:2]  # before the checkpoint: the first run's records, as they were
    resumed = log[2:]
    assert all(r["run_id"] == resumed[0]["run_id"] != first[0]["run_id"] for r in resumed)
    assert all(r["resumed_from_step"] == 2 for r in resumed)
    assert (tmp_path / f"{LOG}.1").read_bytes() == original  # the dropped records of steps 2 and 3 are kept
    # a resume that drops nothing appends in place: no copy is made
    _trainer(tmp_path, max_steps=4).train(str(tmp_path / "checkpoint-4"))
    assert _records(tmp_path / LOG) == log and not (tmp_path / f"{LOG}.2").exists()


def test_torn_and_unparsable_lines_are_cut_with_a_warning_and_the_run_resumes(tmp_path, caplog):
    first = _checkpointed_run(tmp_path)
    lines = (tmp_path / LOG).read_bytes().splitlines(keepends=True)
    damaged = lines[0] + b"not json\n" + b"".join(lines[1:]) + b'{"run_id": "abc", "step": 4, "blo'
    (tmp_path / LOG).write_bytes(damaged)
    with caplog.at_level(logging.WARNING, logger="hf_bpmod"):
        _trainer(tmp_path, max_steps=4).train(str(tmp_path / "checkpoint-2"))
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and LOG in r.getMessage()]
    assert len(warned) == 1 and str(tmp_path / LOG) in warned[0] and "2, 6" in warned[0]
    assert f"{LOG}.1" in warned[0]  # says where the original is
    log = _records(tmp_path / LOG)
    assert [r["step"] for r in log] == [0, 1, 2, 3] and log[:2] == first[:2]
    assert (tmp_path / f"{LOG}.1").read_bytes() == damaged
    # a fresh run in the folder of a torn log starts a new log and keeps the torn one as it is
    (tmp_path / LOG).write_bytes(damaged)
    _trainer(tmp_path).train()
    assert [r["step"] for r in _records(tmp_path / LOG)] == [0, 1]
    assert (tmp_path / f"{LOG}.2").read_bytes() == damaged


class _Pause(TrainerCallback):
    """Holds the training thread at its first step until released."""

    def __init__(self):
        self.started, self.release = threading.Event(), threading.Event()

    def on_step_begin(self, args, state, control, **kwargs):
        self.started.set()
        assert self.release.wait(timeout=120)


def test_a_second_trainer_in_the_same_folder_is_refused_while_the_first_trains(tmp_path):
    first = _trainer(tmp_path)
    pause = _Pause()
    first.add_callback(pause)
    errors = []

    def train_first():
        try:
            first.train()
        except BaseException as e:  # reported below, in the test's thread
            errors.append(e)

    thread = threading.Thread(target=train_first)
    thread.start()
    try:
        assert pause.started.wait(timeout=120)
        second_model = tiny_vit(num_layers=4)
        before = [p.detach().clone() for p in second_model.parameters()]
        second = _trainer(tmp_path, second_model)
        with pytest.raises(OutputDirInUseError, match="another `output_dir`") as refused:
            second.train()
        assert str(tmp_path) in str(refused.value) and f"pid {os.getpid()}" in str(refused.value)
        assert all(torch.equal(a, b) for a, b in zip(before, second_model.parameters()))  # refused before any work
    finally:
        pause.release.set()
        thread.join(timeout=300)
    assert not errors and first.state.global_step == 2
    log = _records(tmp_path / LOG)
    assert [r["step"] for r in log] == [0, 1] and len({r["run_id"] for r in log}) == 1  # the first run's alone
    second.train()  # the folder is free again once the first has ended
    assert not (tmp_path / LOCK_NAME).exists()


class _Fail(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        raise RuntimeError("the run fails")


def test_a_failed_run_releases_the_folder(tmp_path):
    failing = _trainer(tmp_path)
    failing.add_callback(_Fail())
    with pytest.raises(RuntimeError, match="the run fails"):
        failing.train()
    assert not (tmp_path / LOCK_NAME).exists()
    _trainer(tmp_path).train()  # the next trainer in the same process trains there


#: Takes the lock of the folder argv[1] as a training run does, says so, and waits to be killed.
HOLDER = """
import sys, time
from hf_bpmod.run_lock import RunLock
lock = RunLock(sys.argv[1])
lock.acquire()
print("locked", flush=True)
time.sleep(600)
"""


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="POSIX kill")
def test_a_killed_run_does_not_leave_the_folder_locked(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(tmp_path)], stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(OutputDirInUseError, match=f"pid {holder.pid}"):
            _trainer(tmp_path).train()
        holder.send_signal(signal.SIGKILL)  # no cleanup runs: the lock file stays, the OS drops the lock
        holder.wait(timeout=60)
        assert (tmp_path / LOCK_NAME).exists()
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
    trainer = _trainer(tmp_path)
    trainer.train()
    assert trainer.state.global_step == 2 and not (tmp_path / LOCK_NAME).exists()


def test_a_whole_last_record_without_its_newline_is_kept_and_appended_after(tmp_path):
    path = tmp_path / LOG
    path.write_bytes(b'{"step": 0, "blocks": []}\n{"step": 1, "blocks": []}')
    log = RefreshLog(str(path))
    log.start(2)  # a resume from step 2 keeps both records
    log.append({"step": 2, "blocks": []})
    assert [r["step"] for r in _records(path)] == [0, 1, 2]
    assert (tmp_path / f"{LOG}.1").read_bytes().endswith(b'"blocks": []}')  # the file as it was


@pytest.mark.skipif(not hasattr(os, "fork"), reason="POSIX fork")
def test_a_forked_child_leaves_its_parents_lock_alone(tmp_path):
    """A data loader worker forked while the lock is held inherits the lock object; its exit must not free it."""
    lock = RunLock(str(tmp_path))
    lock.acquire()
    try:
        pid = os.fork()
        if pid == 0:  # the child: what its interpreter would do with the object, then exit at once
            lock.release()
            os._exit(0)
        os.waitpid(pid, 0)
        assert (tmp_path / LOCK_NAME).exists()
        with pytest.raises(OutputDirInUseError):
            RunLock(str(tmp_path)).acquire()
    finally:
        lock.release()
    assert not (tmp_path / LOCK_NAME).exists()
    with RunLock(str(tmp_path)):  # free again
        pass
