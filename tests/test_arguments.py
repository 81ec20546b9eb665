"""Every argument ``BPModifiedTrainingArguments`` adds is checked when the arguments are built: a value is either
refused there, with an error that names the argument, or it trains. Plain tests for the known cases, then a
property-based test that throws values of every type at every field."""

from __future__ import annotations

import copy
import dataclasses
import io
import json
import os
import pickle
import re
import tempfile
import typing

import pytest
import torch
import transformers
from helpers import training_args
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import HfArgumentParser, TrainingArguments

from hf_bpmod import BPModifiedTrainer, BPModifiedTrainingArguments, config
from hf_bpmod.adapters import BlockGranularity
from hf_bpmod.config import ARGUMENT_CHECKS, GRANULARITIES, MAX_COUNT, SCALING_MODES, SEED_RANGE
from hf_bpmod.config_file import parse_config_file
from hf_bpmod.offset_pass import offset_sample
from hf_bpmod.testing import SyntheticImages, tiny_resnet

pytestmark = pytest.mark.compat  # HfArgumentParser and TrainingArguments' own checks vary across releases

# One optimizer step of a tiny ResNet with the offset on: the first refresh (two micro-batches) runs before it.
TRAIN = dict(
    max_steps=1,
    per_device_train_batch_size=8,
    bp_modified=True,
    offset_batch_size=16,
    offset_micro_batch_size=8,
    offset_period="1",
    logging_strategy="no",
)
MODEL = tiny_resnet(depths=(1, 1))
DATA = SyntheticImages(32)


def _args(output_dir, **kw) -> BPModifiedTrainingArguments:
    return training_args(output_dir, **{**TRAIN, **kw})


def _train_one_step(args: BPModifiedTrainingArguments) -> BPModifiedTrainer:
    trainer = BPModifiedTrainer(model=copy.deepcopy(MODEL), args=args, train_dataset=DATA)
    trainer.train()
    assert trainer.state.global_step == 1
    return trainer


# ---------------------------------------------------------------------------------------------- the known cases
@pytest.mark.parametrize("value", [float("nan"), "nan", float("inf"), -float("inf"), "-inf", 10**400])
def test_non_finite_fixed_a_is_refused(tmp_path, value):
    """A NaN ``a`` used to be accepted, and every refresh was then skipped under a warning blaming the data."""
    with pytest.raises(ValueError, match=r"`offset_fixed_a` \(.*\) must be a finite number.*e\.g\. 1\.0"):
        _args(tmp_path, offset_scaling="fixed", offset_fixed_a=value)


@pytest.mark.parametrize("value", [3.4028234663852886e38, -1e7, "1e300"])
def test_a_fixed_a_that_would_overflow_the_gradients_is_refused(tmp_path, value):
    """A finite but huge ``a`` multiplies every gradient out of float32's range at the first step."""
    with pytest.raises(ValueError, match=r"`offset_fixed_a` \(.*\) must lie in \[-1e\+06, 1e\+06\]"):
        _args(tmp_path, offset_scaling="fixed", offset_fixed_a=value)


@pytest.mark.parametrize(
    "field",
    ["offset_reliability", "offset_bias_correction", "rebuild_bpmod_state", "bp_modified", "eval_block_accuracy"],
)
@pytest.mark.parametrize(
    "text, expected",
    [("false", False), ("False", False), ("NO", False), ("0", False), ("true", True), ("Yes", True), ("1", True)],
)
def test_booleans_given_as_strings_are_read_as_the_command_line_reads_them(tmp_path, field, text, expected):
    """``"false"`` from a YAML or JSON file used to count as true (a non-empty string)."""
    args = _args(tmp_path, **{field: text})
    assert getattr(args, field) is expected


def test_boolean_strings_reach_the_offset_settings_as_booleans(tmp_path):
    settings_ = _args(tmp_path, offset_reliability="false", offset_bias_correction="False").offset_settings()
    assert settings_.check_reliability is False and settings_.bias_correction is False


@pytest.mark.parametrize(
    "field",
    ["offset_reliability", "offset_bias_correction", "rebuild_bpmod_state", "bp_modified", "eval_block_accuracy"],
)
@pytest.mark.parametrize("value", ["maybe", "", 2, 0.0, [True]])
def test_other_booleans_are_refused(tmp_path, field, value):
    with pytest.raises(ValueError, match=rf"`{field}` \(.*\) must be True, False.*yes/y/true/t/on/1 for True"):
        _args(tmp_path, **{field: value})


def test_none_is_refused_where_a_boolean_has_no_default_of_its_own(tmp_path):
    with pytest.raises(ValueError, match=r"`offset_bias_correction` \(None\) must be True, False;"):
        _args(tmp_path, offset_bias_correction=None)
    assert _args(tmp_path, offset_reliability=None, offset_scaling="fixed").offset_reliability is False


@pytest.mark.parametrize(
    "value, message",
    [
        ("abc", r"must be an integer from -9223372036854775808 to 18446744073709551615; .*e\.g\. 42"),
        (10**30, r"must be at most 18446744073709551615"),
        (SEED_RANGE[0] - 1, r"must be an integer from -9223372036854775808"),
        (1.5, r"must be an integer from .*e\.g\. 42"),
        (42.0, r"must be an integer .*; write `offset_seed=42`"),
        (True, r"must be an integer"),
    ],
)
def test_bad_seeds_are_refused(tmp_path, value, message):
    """``"abc"`` and ``10**30`` used to crash at step 0 without naming the argument; ``1.5`` was truncated."""
    with pytest.raises(ValueError, match=rf"`offset_seed` \({re.escape(repr(value))}\) {message}"):
        _args(tmp_path, offset_seed=value)


@pytest.mark.parametrize("seed", [SEED_RANGE[0], -1, 2**63, SEED_RANGE[1]])
def test_every_seed_torch_accepts_trains(tmp_path, seed):
    """The sampler's own seed, ``seed * 1_000_003 + period_index``, is reduced to a range torch accepts."""
    _train_one_step(_args(tmp_path, offset_seed=seed))
    assert _args(tmp_path, offset_seed=str(seed)).offset_seed == seed  # as from the command line


def test_the_sampler_draws_what_it_drew_before_for_every_seed_that_worked():
    """Reducing the generator's seed modulo ``2**64`` changes no draw that torch accepted unreduced (torch reads a
    negative seed as its two's complement): runs resumed across the change redraw the same samples."""

    def unreduced(size, count, seed, index):
        generator = torch.Generator().manual_seed(seed * 1_000_003 + index)
        return torch.randperm(size, generator=generator)[:count].tolist()

    largest = (2**64 - 1 - 1000) // 1_000_003
    smallest = -(2**63) // 1_000_003 + 1
    for seed in (0, 1, 42, 12345, -1, -42, 2**32, largest, smallest):
        for index in (0, 1, 7, 1000):
            assert offset_sample(50, 10, seed, index) == unreduced(50, 10, seed, index)
    # seeds whose product overflowed torch's range now draw too, differently per refresh
    draws = [offset_sample(50, 10, SEED_RANGE[1], index) for index in (0, 1, 10**9)]
    assert all(sorted(set(d)) == sorted(d) and all(0 <= i < 50 for i in d) for d in draws)
    assert draws[0] != draws[1] != draws[2]


@pytest.mark.parametrize(
    "value, message",
    [
        ("", "must be a non-empty file name"),
        ("  ", "must be a non-empty file name"),
        (3, "must be a non-empty file name"),
        (None, "must be a non-empty file name"),
        ("a\0b", "must be a non-empty file name"),
        ("/tmp/bpmod_offsets.jsonl", "must be relative"),
        ("../../bpmod_offsets.jsonl", r"must stay inside `output_dir`"),
        ("logs/../../bpmod_offsets.jsonl", r"must stay inside `output_dir`"),
        ("..", r"must stay inside `output_dir`"),
        (".", "names a folder, not a file"),
        ("logs/", "names a folder, not a file"),
    ],
)
def test_the_log_file_must_be_a_file_inside_the_output_dir(tmp_path, value, message):
    """``""`` and ``3`` used to crash at step 0; an absolute or ``..`` path wrote outside ``output_dir``."""
    with pytest.raises(ValueError, match=rf"`offset_log_file` \(.*\) {message}.*; give a file name relative to"):
        _args(tmp_path / "out", offset_log_file=value)
    assert not os.path.exists(tmp_path / "out")


@pytest.mark.parametrize(
    "value, why",
    [
        ("_bpmod_training.lock", "the run's lock"),
        ("checkpoint-999/log.jsonl", "a checkpoint folder"),
        ("checkpoint-2/bpmod_state.json", "a checkpoint folder"),
        ("tmp-checkpoint-3/log.jsonl", "a checkpoint folder"),
        ("model.safetensors", "a file `save_model` writes"),
        ("model-00001-of-00002.safetensors", "a file `save_model` writes"),
        ("model.safetensors.index.json", "a file `save_model` writes"),
        ("pytorch_model.bin", "a file `save_model` writes"),
        ("config.json", "a file `save_model` writes"),
        ("Config.JSON", "a file `save_model` writes"),  # one file on macOS and Windows file systems
        ("preprocessor_config.json", "a file `save_model` writes"),
        ("adapter_model.safetensors", "a file `save_model` writes"),
        ("adapter_config.json", "a file `save_model` writes"),
        ("tokenizer.json", "a file `save_model` writes"),
        ("training_args.bin", "a file or folder the Trainer writes"),
        ("trainer_state.json", "a file or folder the Trainer writes"),
        ("README.md", "a file or folder the Trainer writes"),
        ("eval_results.json", "a file or folder the Trainer writes"),
        ("all_results.json", "a file or folder the Trainer writes"),
        ("runs/offsets.jsonl", "a file or folder the Trainer writes"),
        ("emissions.csv", "a file or folder the Trainer writes"),
        ("predictions.csv", "a file or folder the example script writes"),
        ("block_accuracy.png", "a file or folder the example script writes"),
        ("_base_model/offsets.jsonl", "a file or folder the example script writes"),
    ],
)
def test_a_log_file_that_is_or_lies_inside_one_of_the_runs_own_files_is_refused(tmp_path, value, why):
    """Such names used to be accepted: the lock was deleted (a second run was let in), checkpoint rotation deleted
    every real checkpoint, ``save_model`` overwrote the log or the log ruined the model or a checkpoint."""
    pattern = rf"`offset_log_file` \({re.escape(repr(value))}\) is or lies inside {re.escape(why)} in `output_dir`"
    with pytest.raises(ValueError, match=pattern + r".*; give .*e\.g\. `'[^']+'`") as error:
        _args(tmp_path / "out", offset_log_file=value)
    assert not os.path.exists(tmp_path / "out")
    suggested = re.search(r"e\.g\. `'([^']+)'`", str(error.value))[1]
    assert _args(tmp_path / "out", offset_log_file=suggested).offset_log_file == suggested  # the name given works


@pytest.mark.parametrize(
    "value",
    ["logs/config.json", "checkpoints.jsonl", "logs/checkpoint-1.jsonl", "my_README.md", "runs.jsonl", "lock"],
)
def test_names_near_the_runs_own_files_are_accepted(tmp_path, value):
    assert _args(tmp_path, offset_log_file=value).offset_log_file == value


@pytest.mark.parametrize(
    "value, message",
    [
        ("a" * 300, "has a component of 300 bytes"),
        ("logs/" + "a" * 256, "has a component of 256 bytes"),
        ("\u00e9" * 128, "has a component of 256 bytes"),  # 128 characters, 256 bytes in UTF-8
        ("/".join(["b" * 200] * 6), "would be a path of"),
    ],
)
def test_a_log_file_name_longer_than_file_systems_take_is_refused(tmp_path, value, message):
    """A 300-character name used to be accepted, and training failed with an ``OSError`` at step 0."""
    with pytest.raises(ValueError, match=rf"`offset_log_file` \(.*\) {message}.*; give .*e\.g\. `'bpmod_offsets"):
        _args(tmp_path / "out", offset_log_file=value)
    assert not os.path.exists(tmp_path / "out")


def test_a_log_file_in_a_subfolder_is_written_there(tmp_path):
    args = _args(tmp_path / "out", offset_log_file="logs/./runs/../offsets.jsonl")
    assert args.offset_log_file == os.path.join("logs", "offsets.jsonl")
    _train_one_step(args)
    (record,) = [json.loads(line) for line in open(tmp_path / "out" / "logs" / "offsets.jsonl")]
    assert record["period_index"] == 0


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("offset_fixed_lambda", "abc", r"must be a number in \[0, 1\]; .*e\.g\. 0\.5"),
        ("offset_fixed_lambda", float("nan"), r"must be a number in \[0, 1\]"),
        ("offset_fixed_lambda", 2.0, r"must lie in \[0, 1\]"),
        ("offset_fixed_lambda", None, r"must be a number in \[0, 1\]"),
        ("offset_max_ratio", "nan", "must be a positive number"),
        ("offset_max_ratio", 0, "must be positive"),
        ("offset_max_ratio", [0.1], "must be a positive number"),
        ("local_horizon", 1.5, r"must be an integer >= 1; use 1 \(Forward-Forward\)"),
        ("local_horizon", 2.0, r"must be an integer >= 1; write `local_horizon=2`"),
        ("local_horizon", "two", "must be an integer >= 1"),
        ("local_horizon", True, "must be an integer >= 1"),
        ("local_horizon", MAX_COUNT + 1, f"must be at most {MAX_COUNT}"),
        ("max_nonfinite_steps", -1, "must be an integer >= 0"),
        ("max_nonfinite_steps", None, "must be an integer >= 0"),
        ("offset_batch_size", "1e3", "must be an integer >= 2"),
        ("offset_micro_batch_size", 0, "must be an integer >= 1"),
        ("offset_period", None, "must be a string such as"),
        ("offset_period", True, "must be a string such as"),
        ("offset_period", "9" * 400, f"must be at most {MAX_COUNT} steps"),
        ("offset_period", f"{MAX_COUNT + 1}epochs", f"must be at most {MAX_COUNT} epochs"),
        ("offset_period", "nan", "is not understood"),
        ("offset_scaling", ["fixed"], "must be one of"),
        ("block_granularity", {}, "must be 'layer'"),
    ],
)
def test_each_error_names_the_argument_and_its_value(tmp_path, field, value, message):
    """``offset_fixed_lambda="abc"`` used to raise a ``TypeError`` naming no argument."""
    shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:45]
    with pytest.raises(ValueError, match=rf"`{field}` \({re.escape(shown)}.*\) {message}"):
        _args(tmp_path, **{field: value})


def test_numbers_given_as_strings_are_read_as_the_command_line_reads_them(tmp_path):
    args = _args(
        tmp_path,
        local_horizon="2",
        offset_batch_size=" 32 ",
        offset_micro_batch_size="8",
        max_nonfinite_steps="0",
        offset_scaling="fixed",
        offset_fixed_a="-0.5",
        offset_fixed_lambda="1",
        offset_max_ratio="inf",
    )
    assert (args.local_horizon, args.offset_batch_size, args.offset_micro_batch_size) == (2, 32, 8)
    assert args.max_nonfinite_steps == 0
    assert (args.offset_fixed_a, args.offset_fixed_lambda, args.offset_max_ratio) == (-0.5, 1.0, float("inf"))
    assert all(type(v) is float for v in (args.offset_fixed_a, args.offset_fixed_lambda, args.offset_max_ratio))
    assert args.offset_settings().max_ratio is None  # inf: no cap


def test_the_divisor_hint_always_suggests_a_value_that_works(tmp_path):
    """The hint used to suggest ``offset_batch_size`` itself (one micro-batch: refused) as the nearest divisor."""
    hints = 0
    for size in range(2, 41):
        for micro in range(1, 46):
            try:
                _args(tmp_path, offset_batch_size=size, offset_micro_batch_size=micro)
            except ValueError as error:
                hint = re.search(r"e\.g\. use `offset_micro_batch_size=(\d+)`", str(error))
                assert hint is not None, str(error)
                _args(tmp_path, offset_batch_size=size, offset_micro_batch_size=int(hint[1]))
                hints += 1
    assert hints > 1000
    with pytest.raises(ValueError, match=r"e\.g\. use `offset_micro_batch_size=5`"):
        _args(tmp_path, offset_batch_size=10, offset_micro_batch_size=9)  # once `=10`, itself refused
    with pytest.raises(ValueError, match=r"`offset_micro_batch_size=1`"):
        _args(tmp_path, offset_batch_size=MAX_COUNT, offset_micro_batch_size=MAX_COUNT)  # a prime: quickly found


def test_the_command_line_and_config_files_are_read_the_same_way(tmp_path):
    """``HfArgumentParser`` (the example script's parser) reads flags from the command line and dicts from YAML or
    JSON files; both end up as typed values."""
    parser = HfArgumentParser(BPModifiedTrainingArguments)
    (args,) = parser.parse_args_into_dataclasses(
        [
            "--output_dir", str(tmp_path), "--report_to", "none", "--offset_reliability", "false",
            "--offset_bias_correction", "true", "--rebuild_bpmod_state", "--offset_seed", "7",
            "--offset_fixed_a", "0.5", "--offset_log_file", "logs/x.jsonl", "--eval_block_accuracy",
        ]
    )  # fmt: skip
    assert args.offset_reliability is False and args.offset_bias_correction is True and args.eval_block_accuracy
    assert args.rebuild_bpmod_state is True and args.offset_seed == 7 and args.offset_fixed_a == 0.5
    (from_file,) = parser.parse_dict(
        {
            "output_dir": str(tmp_path),
            "report_to": "none",
            "offset_reliability": "false",
            "offset_bias_correction": "False",
            "offset_seed": "7",
        }
    )
    assert from_file.offset_reliability is False and from_file.offset_bias_correction is False
    assert from_file.offset_seed == 7
    for flags, field in ((["--offset_log_file", "../x.jsonl"], "offset_log_file"), (["--offset_fixed_a", "nan"], "")):
        with pytest.raises(ValueError, match=f"`{field or 'offset_fixed_a'}`"):
            parser.parse_args_into_dataclasses(["--output_dir", str(tmp_path), "--report_to", "none", *flags])


BOOLEAN_FIELDS = [
    "bp_modified",
    "offset_reliability",
    "offset_bias_correction",
    "rebuild_bpmod_state",
    "eval_block_accuracy",
]


@pytest.mark.parametrize("field", BOOLEAN_FIELDS)
def test_boolean_flags_take_on_and_off_as_every_spelling_the_checks_read(tmp_path, capsys, field):
    """``--bp_modified off`` used to be refused by ``HfArgumentParser`` (its ``string_to_bool`` has no on/off), though
    a config file's ``off`` was read as False."""
    parser = HfArgumentParser(BPModifiedTrainingArguments)
    base = ["--output_dir", str(tmp_path), "--report_to", "none"]
    for text in ["on", "off", "ON", "Off", "yes", "no", "true", "False", "t", "F", "y", "n", "1", "0"]:
        (args,) = parser.parse_args_into_dataclasses([*base, f"--{field}", text])
        assert getattr(args, field) is (text.lower() in ("on", "yes", "true", "t", "y", "1")), text
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        parser.parse_args_into_dataclasses([*base, f"--{field}", "maybe"])
    assert exit_.value.code == 2
    assert re.search(
        rf"argument --{field}\S*: 'maybe' .*yes/y/true/t/on/1 for True.*no/n/false/f/off/0", capsys.readouterr().err
    )


def test_nested_config_values_follow_yaml_1_2_and_ambiguous_files_are_refused(tmp_path):
    """``parse_config_file``: a list for a flag of several values is read item by item as its flag; a mapping under
    YAML 1.2's core schema (``0o17`` is 15, ``on`` a string); merge keys work; a name given twice, or a file that holds
    no mapping, is refused naming the file."""
    parser = HfArgumentParser(BPModifiedTrainingArguments)
    path = tmp_path / "config.yaml"
    path.write_text(
        f"defaults: &defaults {{report_to: none, seed: 017}}\noutput_dir: {tmp_path}\nlabel_names: [labels, 017]\n"
        "gradient_checkpointing_kwargs: {use_reentrant: false, a: 0o17, b: on, c: 1:30, d: .inf}\noffset_seed: ~\n"
    )
    with pytest.raises(ValueError, match="not used by the HfArgumentParser: \\['defaults'\\]"):
        parse_config_file(parser, path)
    (args,) = parse_config_file(parser, path, allow_extra_keys=True)
    assert args.label_names == ["labels", "017"] and args.offset_seed is None
    kwargs = args.gradient_checkpointing_kwargs
    assert kwargs == {"use_reentrant": False, "a": 15, "b": "on", "c": "1:30", "d": float("inf")}
    path.write_text(f"<<: {{run_name: 1.10, seed: 3}}\noutput_dir: {tmp_path}\nreport_to: none\nseed: 017\n")
    (args,) = parse_config_file(parser, path)
    assert (args.run_name, args.seed) == ("1.10", 17)  # merged, and the file's own key wins
    for text, message in [
        (f"output_dir: {tmp_path}\nseed: 1\nseed: 2\n", r"`seed` is given twice \(line 3\); keep one"),
        ("- a\n- b\n", "must hold a mapping of argument names to values"),
    ]:
        path.write_text(text)
        with pytest.raises(ValueError, match=rf"{re.escape(str(path))}.*{message}"):
            parse_config_file(parser, path)
    path = tmp_path / "config.json"
    path.write_text(f'{{"output_dir": "{tmp_path}", "seed": 1, "seed": 2}}')
    with pytest.raises(ValueError, match=r"`seed` is given twice; keep one"):
        parse_config_file(parser, path)


def test_refused_arguments_leave_the_environment_as_it_was(tmp_path):
    environment = dict(os.environ)
    for kw in (dict(offset_seed="abc", bf16=True), dict(offset_log_file="/x", gradient_checkpointing=True)):
        with pytest.raises(ValueError):
            _args(tmp_path, **kw)
    assert dict(os.environ) == environment


# ---------------------------------------------------------------------------------------------- declared checks
def test_every_added_argument_has_exactly_one_check():
    """``ARGUMENT_CHECKS`` covers the fields this class adds to ``TrainingArguments``, no more and no fewer: a new
    field cannot go unchecked."""
    inherited = {f.name for f in dataclasses.fields(TrainingArguments)}
    added = [f.name for f in dataclasses.fields(BPModifiedTrainingArguments) if f.name not in inherited]
    assert sorted(ARGUMENT_CHECKS) == sorted(added)


@pytest.mark.parametrize(
    "field, choices, outside",
    [("block_granularity", GRANULARITIES, "Layer"), ("offset_scaling", SCALING_MODES, "best")],
)
def test_fields_with_fixed_values_list_them_and_refuse_others(tmp_path, capsys, field, choices, outside):
    """``--help`` lists the choices, argparse refuses another value on the command line, and a value from a file or
    from Python gets the error that names the field, the value and the accepted values."""
    parser = HfArgumentParser(BPModifiedTrainingArguments)
    assert f"--{field} {{{','.join(choices)}}}" in parser.format_help()
    base = ["--output_dir", str(tmp_path), "--report_to", "none"]
    for choice in choices:
        (args,) = parser.parse_args_into_dataclasses([*base, f"--{field}", choice])
        assert getattr(args, field) == choice
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        parser.parse_args_into_dataclasses([*base, f"--{field}", outside])
    assert exit_.value.code == 2 and f"invalid choice: '{outside}'" in capsys.readouterr().err
    (tmp_path / "args.yaml").write_text(f"output_dir: {tmp_path}\nreport_to: none\n{field}: {outside}\n")
    with pytest.raises(ValueError, match=rf"`{field}` \('{outside}'\) must be") as error:
        parser.parse_yaml_file(str(tmp_path / "args.yaml"))
    assert all(repr(choice) in str(error.value) for choice in choices)


def test_the_granularities_are_the_adapters_literal():
    assert GRANULARITIES == typing.get_args(BlockGranularity) and len(GRANULARITIES) == 3


def test_offset_period_is_parsed_once_when_the_arguments_are_built(tmp_path, monkeypatch):
    calls = []

    def counted(period):
        calls.append(period)
        return parse(period)

    parse = config.parse_offset_period
    monkeypatch.setattr(config, "parse_offset_period", counted)
    args = _args(tmp_path, offset_period="0.5epoch")
    assert calls == ["0.5epoch"]
    assert args.offset_settings().period == (0.5, "epoch") and args.offset_settings().period_steps(10) == 5
    assert calls == ["0.5epoch"]  # offset_settings() reads the parsed value
    args.offset_period = "3"  # set after the arguments were built: parsed when read, as before
    assert args.offset_settings().period == (3.0, "step")
    args.offset_period = "often"
    with pytest.raises(ValueError, match=r"`offset_period` \('often'\) is not understood"):
        args.offset_settings()


def test_the_parsed_period_is_no_argument(tmp_path):
    """The parsed ``offset_period`` is kept beside the fields: ``to_dict()``, the JSON, copies, pickles (the
    Trainer's ``training_args.bin``) and ``dataclasses.replace`` see the arguments as given."""
    args = _args(tmp_path, offset_period="2steps")
    fields = {f.name for f in dataclasses.fields(args) if f.init}
    assert set(args.to_dict()) == fields and json.loads(args.to_json_string())["offset_period"] == "2steps"
    assert "_checked_offset_period" not in str(args)
    buffer = io.BytesIO()
    torch.save(args, buffer)
    buffer.seek(0)
    copies = [copy.deepcopy(args), pickle.loads(pickle.dumps(args)), torch.load(buffer, weights_only=False)]
    for copied in copies:
        assert copied.to_dict() == args.to_dict() and copied.offset_settings() == args.offset_settings()
    assert args.offset_settings().period == (2.0, "step")
    replaced = dataclasses.replace(args, offset_period="0.25epoch")
    assert replaced.offset_period == "0.25epoch" and replaced.offset_settings().period == (0.25, "epoch")
    assert args.offset_settings().period == (2.0, "step")
    older = copy.deepcopy(args)
    del older._checked_offset_period  # unpickled from a release that did not keep it
    assert older.offset_settings() == args.offset_settings()


# ---------------------------------------------------------------------------------------------- property-based
_ANY = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-3, 40),
    st.integers(-(2**80), 2**80),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8),
    st.sampled_from(
        [
            "",
            " ",
            "0",
            "1",
            "2",
            "8",
            "16",
            "-1",
            "1.5",
            "nan",
            "inf",
            "-inf",
            "1e3",
            "true",
            "False",
            "YES",
            "n",
            "on",
        ]
    ),
    st.sampled_from(["maybe", "none", "epoch", "0.25epoch", "4steps", "x.jsonl", "/x.jsonl", "../x", "a/../../b"]),
    st.lists(st.integers(0, 3), max_size=2),
    st.dictionaries(st.text(max_size=2), st.integers(), max_size=1),
)
# Values near the valid ones of each field, so that the accepted path is exercised too.
_NEAR = {
    "local_horizon": st.sampled_from([1, 2, 3, 4, 10**6, MAX_COUNT, MAX_COUNT + 1, "2"]),
    "block_granularity": st.sampled_from(["layer", "layer+stem", "stage", "Layer", "stage "]),
    "bp_modified": st.sampled_from([True, False, None, "true", "False", "0", 1, 0]),
    "offset_batch_size": st.sampled_from([None, 2, 8, 16, 24, 32, "16", 33, 10**9]),
    "offset_micro_batch_size": st.sampled_from([None, 1, 2, 4, 8, 16, "4", 3, 10**9]),
    "offset_period": st.sampled_from(["1", "3steps", "epoch", "0.5epoch", 2, 2.0, 2.5, "0", str(MAX_COUNT)]),
    "offset_scaling": st.sampled_from(["aligned", "optimal", "bias_only", "fixed", "Fixed"]),
    "offset_fixed_a": st.one_of(st.floats(-1e6, 1e6), st.sampled_from([0, 1, "0.5", -2])),
    "offset_fixed_lambda": st.one_of(st.floats(-0.5, 1.5), st.sampled_from([0, 1, "0.25"])),
    "offset_bias_correction": st.sampled_from([True, False, "yes", "off", None]),
    "offset_reliability": st.sampled_from([True, False, None, "t", "F"]),
    "offset_max_ratio": st.one_of(st.floats(0, 10), st.sampled_from([float("inf"), "inf", "0.1", 1])),
    "offset_seed": st.one_of(st.integers(SEED_RANGE[0] - 10, SEED_RANGE[1] + 10), st.sampled_from(["42", " -7 "])),
    "offset_log_file": st.sampled_from(["a.jsonl", "logs/a.jsonl", "./a", "a/../b", "a/../../b", "/a", "~"]),
    "max_nonfinite_steps": st.sampled_from([0, 1, 10, "3", -1, MAX_COUNT]),
    "rebuild_bpmod_state": st.sampled_from([True, False, "true", "n", 1, None]),
    "eval_block_accuracy": st.sampled_from([True, False, "true", "off", 0, None]),
}
# What each field holds once accepted, whatever it was given as (a YAML "false" must not stay a truthy string).
_TYPES = {
    **dict.fromkeys(["local_horizon", "max_nonfinite_steps"], int),
    **dict.fromkeys(["offset_batch_size", "offset_micro_batch_size"], (int, type(None))),  # None: from the data
    **dict.fromkeys(["offset_fixed_a", "offset_fixed_lambda", "offset_max_ratio"], float),
    **dict.fromkeys(
        ["offset_bias_correction", "offset_reliability", "rebuild_bpmod_state", "eval_block_accuracy"], bool
    ),
    **dict.fromkeys(["block_granularity", "offset_scaling", "offset_log_file"], str),
    "bp_modified": (bool, type(None)),
    "offset_seed": (int, type(None)),
    "offset_period": (str, int, float),
}
# The settings a field only matters under.
_CONTEXT = {"offset_fixed_a": dict(offset_scaling="fixed"), "offset_fixed_lambda": dict(offset_scaling="fixed")}


@pytest.mark.parametrize("field", sorted(_NEAR))
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_any_value_is_refused_when_built_or_trains(field, data):
    """Each field, given any value: either ``BPModifiedTrainingArguments`` refuses it (``ValueError`` or
    ``TypeError`` naming the field), or ``BPModifiedTrainer`` refuses it when it is built, before any training
    (a check that needs the data, e.g. ``offset_batch_size`` against the training set), or one step trains."""
    value = data.draw(st.one_of(_ANY, _NEAR[field]), label=field)
    environment = dict(os.environ)
    transformers.logging.set_verbosity_error()
    with tempfile.TemporaryDirectory() as output_dir:
        try:
            args = _args(output_dir, **{**_CONTEXT.get(field, {}), field: value})
        except (ValueError, TypeError) as error:
            assert f"`{field}`" in str(error), str(error)
            assert dict(os.environ) == environment
            return
        held = getattr(args, field)
        assert isinstance(held, _TYPES[field]) and not (_TYPES[field] in (int, float) and isinstance(held, bool))
        try:
            trainer = BPModifiedTrainer(model=copy.deepcopy(MODEL), args=args, train_dataset=DATA)
        except ValueError as error:
            assert f"`{field}`" in str(error), str(error)
            return
        trainer.train()
        assert trainer.state.global_step == 1
        log = os.path.realpath(os.path.join(output_dir, args.offset_log_file))
        assert log.startswith(os.path.realpath(output_dir) + os.sep)
    os.environ.clear()
    os.environ.update(environment)
