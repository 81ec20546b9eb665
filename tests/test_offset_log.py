"""The refresh log across runs in one output_dir (run ids, numbered copies, torn lines), the output_dir lock, and the
files the package writes there, none of them through a symbolic link."""

import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading

import pytest
import torch
from transformers import TrainerCallback

from hf_bpmod import BPModifiedTrainer, BPModifiedTrainingArguments
from hf_bpmod._files import write_atomically
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


# ---------------------------------------------------------------------------------------------- symbolic links
NOTES = b"the user's notes, which no run may touch\n"


def _refused(link) -> str:
    """The start of the error that refuses writing through the symbolic link ``link``."""
    return rf"{re.escape(str(link))} is a symbolic link .*Remove the link"


def _unchanged(model, before) -> bool:
    return all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


@pytest.mark.parametrize("dangling", [False, True], ids=["to-a-file", "dangling"])
def test_a_symlink_planted_as_the_lock_is_refused_and_what_it_points_to_is_untouched(tmp_path, dangling):
    """The lock used to follow the link: the file it pointed to was truncated to the pid line (or created)."""
    out, notes = tmp_path / "out", tmp_path / "notes.txt"
    out.mkdir()
    if not dangling:
        notes.write_bytes(NOTES)
    (out / LOCK_NAME).symlink_to(notes)
    model = tiny_vit(num_layers=4)
    before = [p.detach().clone() for p in model.parameters()]
    trainer = _trainer(out, model)
    with pytest.raises(OSError, match=_refused(out / LOCK_NAME)):
        trainer.train()
    assert (notes.read_bytes() == NOTES) if not dangling else not os.path.lexists(notes)
    assert (out / LOCK_NAME).is_symlink() and os.listdir(out) == [LOCK_NAME]  # no log, nothing else written
    assert trainer.state.global_step == 0 and _unchanged(model, before)


@pytest.mark.parametrize("planted", ["log", "folder"])
def test_a_refresh_log_through_a_symlink_is_refused_and_what_it_points_to_is_untouched(tmp_path, planted):
    """A linked log used to be read (its target copied into ``output_dir`` as the numbered copy) and then written; a
    linked sub-folder took the log out of ``output_dir`` (the check of the name was lexical)."""
    out, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
    out.mkdir()
    elsewhere.mkdir()
    (elsewhere / "notes.txt").write_bytes(NOTES)
    if planted == "log":
        link, kw, message = out / LOG, {}, _refused(out / LOG)
        link.symlink_to(elsewhere / "notes.txt")
    else:
        link, kw = out / "logs", {"offset_log_file": "logs/offsets.jsonl"}
        message = rf"{re.escape(str(out / 'logs'))} is a symbolic link to .*outside `output_dir`"
        link.symlink_to(elsewhere, target_is_directory=True)
    model = tiny_vit(num_layers=4)
    before = [p.detach().clone() for p in model.parameters()]
    trainer = _trainer(out, model, **kw)
    with pytest.raises(OSError, match=message):
        trainer.train()
    assert os.listdir(elsewhere) == ["notes.txt"] and (elsewhere / "notes.txt").read_bytes() == NOTES
    assert os.listdir(out) == [link.name] and link.is_symlink()  # no copy of the target, no log
    assert trainer.state.global_step == 0 and _unchanged(model, before)


def test_a_symlink_planted_at_the_log_while_a_run_trains_is_not_written_through(tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_bytes(NOTES)
    log = RefreshLog(str(tmp_path / LOG))
    log.start(0)
    log.append({"step": 0, "blocks": []})
    os.remove(tmp_path / LOG)
    (tmp_path / LOG).symlink_to(notes)
    with pytest.raises(OSError, match=_refused(tmp_path / LOG)):
        log.append({"step": 1, "blocks": []})
    assert notes.read_bytes() == NOTES


def test_links_that_stay_inside_the_output_dir_are_followed(tmp_path):
    """An ``output_dir`` that is itself a link (a cluster's scratch space), and a linked folder that resolves inside
    it, are the user's layout: the log is written through them."""
    (tmp_path / "real" / "kept").mkdir(parents=True)
    out = tmp_path / "out"
    out.symlink_to(tmp_path / "real", target_is_directory=True)
    (out / "logs").symlink_to(tmp_path / "real" / "kept", target_is_directory=True)
    log = RefreshLog(str(out / "logs" / LOG), str(out))
    log.start(0)
    log.append({"step": 0, "blocks": []})
    assert [r["step"] for r in _records(tmp_path / "real" / "kept" / LOG)] == [0]


def test_an_atomic_write_never_writes_through_a_symlink(tmp_path):
    """Checkpoint state, the model card, predictions.csv and block_accuracy.png are written through a temporary file
    that replaces the target: a link at either name used to be followed (the temporary) or silently replaced."""
    notes = tmp_path / "notes.txt"
    notes.write_bytes(NOTES)
    target = tmp_path / "predictions.csv"
    temporary = tmp_path / f"predictions.csv.tmp-{os.getpid()}"
    for link in (temporary, target):
        link.symlink_to(notes)
        with pytest.raises(OSError, match=_refused(link)):
            write_atomically(str(target), b"new")
        assert notes.read_bytes() == NOTES and link.is_symlink()
        os.remove(link)
    write_atomically(str(target), b"new")  # no link: written
    assert target.read_bytes() == b"new" and sorted(os.listdir(tmp_path)) == ["notes.txt", "predictions.csv"]


def test_a_numbered_copy_is_never_written_through_a_symlink(tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_bytes(NOTES)
    (tmp_path / LOG).write_bytes(b'{"step": 0, "blocks": []}\n')
    (tmp_path / f"{LOG}.1").symlink_to(notes)
    RefreshLog(str(tmp_path / LOG)).start(0)
    assert notes.read_bytes() == NOTES and (tmp_path / f"{LOG}.2").read_bytes() == b'{"step": 0, "blocks": []}\n'


def test_a_symlink_planted_as_the_model_card_is_refused_and_what_it_points_to_is_untouched(tmp_path):
    """The Trainer writes ``README.md`` with ``open(path, "w")``, which follows a link; the method section was then
    appended to what the link pointed to."""
    out, notes = tmp_path / "out", tmp_path / "notes.txt"
    out.mkdir()
    notes.write_bytes(NOTES)
    (out / "README.md").symlink_to(notes)
    with pytest.raises(OSError, match=_refused(out / "README.md")):
        _trainer(out).create_model_card()
    assert notes.read_bytes() == NOTES and (out / "README.md").is_symlink()
