"""End-to-end runs of ``examples/run_image_classification.py``, offline, on tiny models and data.

As transformers tests its examples, each run calls the script's ``main(argv)`` in this process; one smoke test runs
it in a subprocess as a user does, and one under ``torchrun``. Each test checks the last printed line and the
metrics files, then reloads what the script saved with the plain ``transformers``/``peft`` classes and recomputes the
reported evaluation accuracy and loss from it on the same data.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import sys
from pathlib import Path
from types import ModuleType

import datasets
import pytest
import torch
import torch.nn.functional as F
from helpers import (
    SHAPES,
    TINY_VIT,
    check_outputs,
    make_shape_folder,
    reload_full_model,
    run_script_subprocess,
    save_pretrained_vit,
    script_args,
)
from PIL import Image
from transformers import AutoImageProcessor, HfArgumentParser, ViTForImageClassification

from hf_bpmod import BPModifiedTrainingArguments
from hf_bpmod.data import collate_fn, with_pixel_values


def run(script: ModuleType, argv: list[str], capsys) -> str:
    """The script's ``main(argv)`` in this process; what it printed."""
    script.main(argv)
    return capsys.readouterr().out


def recompute_eval(script: ModuleType, argv: list[str], model: torch.nn.Module, out: Path, image_size: int):
    """Accuracy and mean loss of ``model`` on the script's evaluation data, rebuilt with the script's own loader
    and the image processor it saved in ``out``."""
    parser = HfArgumentParser((script.ModelArguments, script.DataTrainingArguments, BPModifiedTrainingArguments))
    model_args, data_args, training_args = parser.parse_args_into_dataclasses(args=argv)
    data = script.load_data(data_args, model_args, training_args.seed)
    image_column, label_column = data.image_column, data.label_column
    eval_data = data.splits["eval"]
    assert isinstance(eval_data.features[label_column], datasets.ClassLabel)
    if data_args.max_eval_samples is not None:
        n = min(data_args.max_eval_samples, len(eval_data))
        eval_data = eval_data.shuffle(seed=training_args.seed).select(range(n))
    processor = AutoImageProcessor.from_pretrained(out)
    eval_data = with_pixel_values(
        eval_data, image_size, list(processor.image_mean), list(processor.image_std), image_column, label_column
    )
    batch = collate_fn([eval_data[i] for i in range(len(eval_data))])
    with torch.no_grad():
        logits = model.eval()(pixel_values=batch["pixel_values"]).logits
    accuracy = (logits.argmax(-1) == batch["labels"]).sum().item() / len(batch["labels"])
    return accuracy, F.cross_entropy(logits, batch["labels"]).item()


@pytest.mark.parametrize("layout", ["dataset_name", "train_dir"])
def test_tiny_vit_on_an_image_folder(script, tmp_path, layout, capsys, logging_restored):
    if layout == "dataset_name":  # one folder; the script splits 15% off for evaluation
        data = ["--dataset_name", str(make_shape_folder(tmp_path / "images", per_class=14))]
        n_train, n_eval = 35, 7  # datasets rounds the test share up: ceil(0.15 x 42)
    else:
        train = make_shape_folder(tmp_path / "train", per_class=10)
        val = make_shape_folder(tmp_path / "val", per_class=4, seed=1)
        data = ["--train_dir", str(train), "--validation_dir", str(val)]
        n_train, n_eval = 30, 12
    argv = [
        *script_args(tmp_path / "out", tmp_path / "cache"), *TINY_VIT, *data, "--do_train", "--do_eval", "--num_train_epochs", "2",
        "--local_horizon", "1", "--bp_modified", "true", "--offset_batch_size", "16", "--offset_micro_batch_size", "4",
        "--eval_strategy", "epoch", "--save_strategy", "epoch", "--save_total_limit", "1",
    ]  # fmt: skip
    out = tmp_path / "out"
    metrics = check_outputs(run(script, argv, capsys), out, n_eval=n_eval, n_train=n_train)
    assert (out / "bpmod_offsets.jsonl").read_text().strip()  # the offset was refreshed and logged
    last_step = 2 * -(-n_train // 8)  # two epochs of ceil(n_train / 8) steps; save_total_limit 1 keeps the last
    assert [p.name for p in out.glob("checkpoint-*")] == [f"checkpoint-{last_step}"]

    model = reload_full_model(out)
    assert list(model.config.id2label.values()) == list(SHAPES)
    assert model.config.num_hidden_layers == 2 and model.config.hidden_size == 32
    accuracy, loss = recompute_eval(script, argv, model, out, model.config.image_size)
    assert accuracy == pytest.approx(metrics["eval_accuracy"], abs=1e-9)
    assert loss == pytest.approx(metrics["eval_loss"], rel=1e-4, abs=1e-6)


@pytest.mark.slow
def test_embedded_data_default_model_as_a_user_runs_it(script, tmp_path):
    """The smoke test: ``python examples/run_image_classification.py ...`` in a subprocess, on the defaults."""
    argv = [
        *script_args(tmp_path / "out", tmp_path / "cache"), "--max_train_samples", "400", "--max_eval_samples", "100",
        "--max_steps", "5", "--offset_batch_size", "32",
    ]  # fmt: skip
    out = tmp_path / "out"
    metrics = check_outputs(run_script_subprocess(argv, tmp_path / "cache").stdout, out, n_eval=100, n_train=400)
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 5
    # the default model is a ViT, which trains without the offset by default
    assert not (out / "bpmod_offsets.jsonl").exists()
    assert "- bp_modified: False" in (out / "README.md").read_text()

    model = reload_full_model(out)
    assert model.config.image_size == 28 and model.config.num_labels == 10
    accuracy, loss = recompute_eval(script, argv, model, out, model.config.image_size)
    assert accuracy == pytest.approx(metrics["eval_accuracy"], abs=1e-9)
    assert loss == pytest.approx(metrics["eval_loss"], rel=1e-4, abs=1e-6)


@pytest.mark.compat  # peft wraps and saves the pretrained model
def test_lora_on_a_local_pretrained_vit(script, tmp_path, capsys, logging_restored):
    from peft import PeftModel
    from safetensors.torch import load_file

    pretrained = save_pretrained_vit(tmp_path / "tiny-vit", num_labels=5)
    argv = [
        *script_args(tmp_path / "out", tmp_path / "cache"), "--model_name_or_path", str(pretrained),
        "--ignore_mismatched_sizes", "--peft", "lora", "--peft_rank", "2", "--peft_alpha", "4",
        "--dataset_name", str(make_shape_folder(tmp_path / "images", per_class=14)),
        "--max_steps", "4", "--local_horizon", "1", "--bp_modified", "true", "--offset_batch_size", "16",
        "--offset_micro_batch_size", "4",
    ]  # fmt: skip
    out = tmp_path / "out"
    metrics = check_outputs(run(script, argv, capsys), out, n_eval=7, n_train=35)
    assert (out / "bpmod_offsets.jsonl").read_text().strip()  # the offset ran on the LoRA parameters

    # A peft adapter (LoRA weights + the re-initialised 3-class classifier), not a full model.
    assert not (out / "model.safetensors").exists()
    adapter_config = json.loads((out / "adapter_config.json").read_text())
    assert adapter_config["peft_type"] == "LORA" and adapter_config["r"] == 2 and adapter_config["lora_alpha"] == 4
    assert adapter_config["modules_to_save"] == ["classifier"]
    assert adapter_config["base_model_name_or_path"] == str(pretrained)  # the local base, reloadable offline
    weights = load_file(out / "adapter_model.safetensors")
    assert weights and all("lora_" in k or "classifier" in k for k in weights)
    assert any(k.endswith("lora_B.weight") and v.abs().sum() > 0 for k, v in weights.items())  # trained
    assert weights["base_model.model.classifier.weight"].shape == (3, 32)

    base = ViTForImageClassification.from_pretrained(pretrained, num_labels=3, ignore_mismatched_sizes=True)
    model = PeftModel.from_pretrained(base, out)
    accuracy, loss = recompute_eval(script, argv, model, out, image_size=16)
    assert accuracy == pytest.approx(metrics["eval_accuracy"], abs=1e-9)
    assert loss == pytest.approx(metrics["eval_loss"], rel=1e-4, abs=1e-6)


def test_eval_strategy_alone_still_trains(script, tmp_path, capsys, logging_restored):
    """`--eval_strategy` sets `do_eval` by itself; with no mode named the script must still train."""
    argv = [
        *script_args(tmp_path / "out"), *TINY_VIT,
        "--dataset_name", str(make_shape_folder(tmp_path / "images", per_class=6)),
        "--max_steps", "2", "--bp_modified", "false", "--eval_strategy", "epoch",
    ]  # fmt: skip
    run(script, argv, capsys)
    assert (tmp_path / "out" / "train_results.json").exists()


def test_resume_from_checkpoint_last_skips_a_checkpoint_a_kill_tore(
    script, tmp_path, capsys, caplog, logging_restored
):
    """`--resume_from_checkpoint last` with the save of checkpoint-4 cut short (no trainer_state.json) resumes from
    checkpoint-2, warning which one it skipped; with none complete it fails naming the flag and each folder."""
    out = tmp_path / "out"
    argv = [
        *script_args(out), *TINY_VIT, "--dataset_name", str(make_shape_folder(tmp_path / "images", per_class=10)),
        "--do_train", "--max_steps", "4", "--bp_modified", "false", "--save_strategy", "steps", "--save_steps", "2",
    ]  # fmt: skip
    run(script, argv, capsys)
    os.remove(out / "checkpoint-4" / "trainer_state.json")
    with caplog.at_level(logging.WARNING, logger="hf_bpmod"):
        run(script, [*argv, "--resume_from_checkpoint", "last", "--save_strategy", "no"], capsys)
    assert f"{out / 'checkpoint-4'} is not a complete checkpoint (it lacks trainer_state.json" in caplog.text
    assert f"resuming from {out / 'checkpoint-2'}, the newest complete one" in caplog.text
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    assert [entry["step"] for entry in history if "loss" in entry] == [1, 2, 3, 4]  # 1, 2 from the checkpoint
    os.remove(out / "checkpoint-2" / "trainer_state.json")
    with pytest.raises(FileNotFoundError, match=rf"--resume_from_checkpoint last: {re.escape(str(out))} holds no "):
        script.main([*argv, "--resume_from_checkpoint", "last"])


def test_every_heads_accuracy_per_epoch_is_reported_and_plotted(script, tmp_path, capsys, logging_restored):
    """``--eval_block_accuracy`` with ``--eval_strategy epoch``: every head's training loss in the logs, every head's
    accuracy after each epoch and in the final results (the model's own head's is ``eval_accuracy``), and the plot
    ``block_accuracy.png`` (one line per epoch) in the output folder."""
    argv = [
        *script_args(tmp_path / "out"), *TINY_VIT,
        "--dataset_name", str(make_shape_folder(tmp_path / "images", per_class=10)),
        "--num_train_epochs", "2", "--bp_modified", "false", "--eval_strategy", "epoch", "--eval_block_accuracy", "true",
    ]  # fmt: skip
    out = tmp_path / "out"
    metrics = check_outputs(run(script, argv, capsys), out, n_eval=5, n_train=25)
    assert metrics["eval_block_2_accuracy"] == metrics["eval_accuracy"] and "eval_block_1_accuracy" in metrics
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    trained = [entry for entry in history if "loss" in entry]
    assert trained and all({"block_1_loss", "block_2_loss"} <= set(entry) for entry in trained)
    evaluated = [entry["epoch"] for entry in history if "eval_block_1_accuracy" in entry]
    assert evaluated == [1.0, 2.0]
    plot = out / "block_accuracy.png"
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(plot) as image:
        assert image.size == (750, 420) and len(image.convert("RGB").getcolors(maxcolors=1 << 16) or []) > 10


@pytest.mark.slow
@pytest.mark.distributed
def test_two_processes_report_once(tmp_path):
    """Under ``torchrun`` (2 CPU processes, gloo) the summary lines, the note on what was saved and the final line
    come once, from the main process; only the per-process rank line comes from each."""
    argv = [
        *script_args(tmp_path / "out", tmp_path / "cache"), *TINY_VIT,
        "--dataset_name", str(make_shape_folder(tmp_path / "images", per_class=8)),
        "--max_steps", "2", "--per_device_train_batch_size", "4", "--bp_modified", "false", "--peft", "lora",
    ]  # fmt: skip
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    result = run_script_subprocess(argv, tmp_path / "cache", launcher=torchrun)
    output = result.stdout + result.stderr
    assert len(re.findall(r"Process rank: \d", output)) == 2
    for line in (
        "Data:",
        "Built a vit model",
        "Preprocessing: resize",
        "Saved the trained model to",
        "final eval accuracy:",
    ):
        assert output.count(line) == 1, f"{line!r} {output.count(line)} times:\n{output[-5000:]}"
    assert not (tmp_path / "out" / "adapter_config.json").exists()
    assert (tmp_path / "out" / "model.safetensors").exists()  # the merged model, written once by the main process


# ---------------------------------------------------------------------------------------------- config files
#: Values as a user writes them in a config file and on the command line, where YAML 1.1 (PyYAML's ``safe_load``)
#: read something else: ``017`` as 15, ``1:30`` as 90, ``no``/``off`` as False, ``1e-3`` as a string, ``1.10`` as
#: 1.1, ``2024-01-01`` as a date, ``0123`` as 83.
SAME_AS_THE_COMMAND_LINE = [
    ("offset_seed", "017"),
    ("seed", "017"),
    ("offset_period", "1:30"),
    ("offset_period", "200"),
    ("bp_modified", "off"),
    ("bp_modified", "on"),
    ("offset_reliability", "no"),
    ("offset_max_ratio", "inf"),
    ("offset_log_file", "0123"),
    ("offset_batch_size", "0x20"),
    ("learning_rate", "1e-3"),
    ("save_strategy", "no"),
    ("do_train", "no"),
    ("do_train", "on"),
    ("run_name", "1.10"),
    ("model_revision", "2024-01-01"),
    ("peft_alpha", "4"),
    ("train_val_split", "0.5"),
]


def _parsed(script: ModuleType, argv: list[str]) -> dict | str:
    """What ``parse_arguments(argv)`` gives, as plain values (the time-stamped ``logging_dir`` left out), or the
    error it refuses them with (``"exit"`` for argparse's usage error)."""
    try:
        model_args, data_args, training_args = script.parse_arguments(argv)
    except SystemExit:
        return "exit"
    except ValueError as error:
        return str(error)
    values = {**dataclasses.asdict(model_args), **dataclasses.asdict(data_args), **training_args.to_dict()}
    values.pop("logging_dir", None)
    return values


@pytest.mark.compat  # HfArgumentParser's types and TrainingArguments' fields vary across releases
@pytest.mark.parametrize("kind", ["yaml", "json"])
@pytest.mark.parametrize("field, text", SAME_AS_THE_COMMAND_LINE)
def test_a_config_file_means_what_the_same_flags_mean_on_the_command_line(script, tmp_path, capsys, kind, field, text):
    """Each value of a YAML or JSON config file (a JSON string here) is read as the command line reads the same
    text after its flag: the same value, or refused there too (with the same message where a check refuses it)."""
    base = {"output_dir": str(tmp_path / "out"), "report_to": "none"}
    path = tmp_path / f"config.{kind}"
    if kind == "yaml":
        path.write_text("".join(f"{key}: {value}\n" for key, value in {**base, field: text}.items()))
    else:
        path.write_text(json.dumps({**base, field: text}))
    on_the_command_line = _parsed(script, [*(f"--{key}={value}" for key, value in base.items()), f"--{field}", text])
    from_the_file = _parsed(script, [str(path)])
    capsys.readouterr()
    if on_the_command_line == "exit":  # argparse refused the text: the file's value is refused, naming it
        assert isinstance(from_the_file, str) and f"`{field}` ({text!r})" in from_the_file, from_the_file
    else:
        assert from_the_file == on_the_command_line
    assert bool(script._flags_given([str(path)]) & {"do_train", "do_eval", "do_predict"}) is (field == "do_train")


def test_a_resnet_on_66_images_trains_with_the_default_offset_and_its_messages_name_the_flags(
    script, tmp_path, capsys, caplog, logging_restored
):
    """A ResNet gets the offset by default; on a set under 320 images its B' is chosen from the data and logged,
    and a B' the training set cannot hold is refused naming the command-line flags, not Python arguments."""
    train = make_shape_folder(tmp_path / "train", per_class=22)
    val = make_shape_folder(tmp_path / "val", per_class=2, seed=1)
    argv = [
        *script_args(tmp_path / "out"), "--model_type", "resnet", "--train_dir", str(train),
        "--validation_dir", str(val), "--num_train_epochs", "1",
    ]  # fmt: skip
    with caplog.at_level(logging.INFO):
        check_outputs(run(script, argv, capsys), tmp_path / "out", n_eval=6, n_train=66)
    records = [json.loads(line) for line in (tmp_path / "out" / "bpmod_offsets.jsonl").read_text().splitlines()]
    assert [(r["step"], r["offset_batch_size"]) for r in records] == [(0, 16)]  # 2 micro-batches of 8
    assert (
        "`--offset_batch_size` unset: the BP offset draws 16 examples per refresh, at least two micro-batches of 8, "
        "more than 1% of the 72 examples of a refresh period (K steps x batch B); in 2 micro-batches of 8 (on the CPU "
        "a micro-batch costs about a training step whatever its size: the fewest, at least two, of at most "
        "`--per_device_train_batch_size` (8)). Set `--offset_batch_size` and `--offset_micro_batch_size` to choose "
        "others."
    ) in caplog.messages
    assert "Refreshing the BP offset on 16 examples in 2 micro-batches before step 0" in caplog.text
    assert "- offset_batch_size: 16\n" in (tmp_path / "out" / "README.md").read_text()

    argv[1] = str(tmp_path / "out2")
    with pytest.raises(ValueError) as error:
        script.main([*argv, "--offset_batch_size", "320"])
    assert str(error.value) == (
        "`--offset_batch_size` (320) is larger than the training set (66 examples); lower it (e.g. "
        "`--offset_batch_size 16`, the value chosen from the data when it is left unset) or set `--bp_modified false`."
    )
    assert not (tmp_path / "out2" / "bpmod_offsets.jsonl").exists()


def test_predicting_with_a_model_built_from_a_config_needs_training_first(script, tmp_path, logging_restored):
    """``--do_predict`` alone on a model built from a config used to predict with random weights, silently; it is
    refused before the data loads, naming what to do."""
    images = make_shape_folder(tmp_path / "images", per_class=4)
    for model in (TINY_VIT, ["--model_type", "resnet"], []):
        argv = [*script_args(tmp_path / "out"), *model, "--test_file", str(images), "--do_predict"]
        with pytest.raises(ValueError) as error:
            script.main(argv)
        assert str(error.value) == (
            "--do_predict without --do_train would predict with the random weights of a model built from a config "
            f"(--model_type {model[1] if model else 'vit'}). Add --do_train to train it first, or pass "
            "--model_name_or_path with the --output_dir of a trained run to predict with its weights."
        )
        assert not (tmp_path / "out").exists()


def test_predicting_with_a_saved_run_writes_predictions_without_a_word_on_evaluation(
    script, tmp_path, capsys, caplog, logging_restored
):
    """``--model_name_or_path <a trained run> --do_predict`` predicts with its weights; it used to warn that there was
    no validation split, for an evaluation it does not run."""
    train = make_shape_folder(tmp_path / "train", per_class=6)
    test = make_shape_folder(tmp_path / "test", per_class=3, seed=1)
    trained = tmp_path / "trained"
    run(
        script, [*script_args(trained), *TINY_VIT, "--train_dir", str(train), "--do_train", "--max_steps", "2"], capsys
    )
    argv = [*script_args(tmp_path / "out"), "--model_name_or_path", str(trained), "--test_file", str(test)]
    with caplog.at_level(logging.INFO):
        run(script, [*argv, "--do_predict"], capsys)
    assert not [message for message in caplog.messages if "validation split" in message]
    rows = (tmp_path / "out" / "predictions.csv").read_text().splitlines()
    assert rows[0] == "index,prediction,label" and len(rows) == 1 + 9
    assert json.loads((tmp_path / "out" / "predict_results.json").read_text())["predict_samples"] == 9


def _without(argv: list[str], *flags: str) -> list[str]:
    """``argv`` without the given flags and their values."""
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in flags:
            skip = True
        else:
            kept.append(arg)
    return kept


@pytest.mark.parametrize(
    "flags, learning_rate, logging_steps",
    [
        ([], 1e-3, 0.05),  # the default ViT built from a config, AdamW
        (["--model_type", "resnet"], 1e-3, 0.05),
        (["--model_type", "resnet", "--optim", "sgd"], 5e-5, 0.05),  # no rate measured for SGD: a warning
        (["--learning_rate", "5e-5", "--logging_steps", "7"], 5e-5, 7),  # given: kept
        (["--learning_rate=2e-3"], 2e-3, 0.05),
        (["--model_name_or_path", "google/vit-base-patch16-224-in21k"], 5e-5, 0.05),  # pretrained: fine-tuning
        (["--do_eval"], 5e-5, 0.05),  # nothing trained
    ],
)
def test_the_scripts_own_defaults_for_the_flags_not_given(
    script, tmp_path, caplog, flags, learning_rate, logging_steps
):
    """``TrainingArguments``' learning rate 5e-5 left a ViT built from a config at chance, and its
    ``logging_steps=500`` logged nothing in a 90-step run: where the user does not give them, the script uses a
    rate that trains (AdamW) or warns, and logs every 5% of the run; flags given on the command line or in a config
    file are kept."""
    argv = ["--output_dir", str(tmp_path), "--report_to", "none", "--use_cpu", *flags]
    parser = HfArgumentParser((script.ModelArguments, script.DataTrainingArguments, BPModifiedTrainingArguments))
    model_args, _, training_args = parser.parse_args_into_dataclasses(args=argv)
    training_args.do_train = not script._flags_given(argv) & {"do_train", "do_eval", "do_predict"}  # as main()
    with caplog.at_level(logging.INFO, logger="image_classification_cli"):
        script.choose_defaults(script._flags_given(argv), model_args, training_args)
    assert (training_args.learning_rate, training_args.logging_steps) == (learning_rate, logging_steps)
    chosen = "--learning_rate not given: 0.001, the script's default for a model built from a config"
    assert (chosen in caplog.text) == (learning_rate == 1e-3 and "--learning_rate" not in " ".join(flags))
    assert ("may stay near chance at it with --optim sgd" in caplog.text) == ("sgd" in flags)

    config = tmp_path / "args.yaml"  # a config file gives its keys as a command line gives its flags
    config.write_text(f"output_dir: {tmp_path}\nreport_to: none\nuse_cpu: true\nlogging_steps: 3\n")
    model_args, _, training_args = parser.parse_yaml_file(str(config))
    training_args.do_train = True
    script.choose_defaults(script._flags_given([str(config)]), model_args, training_args)
    assert (training_args.learning_rate, training_args.logging_steps) == (1e-3, 3)


def test_a_short_run_on_the_defaults_logs_about_20_times_at_the_chosen_rate(
    script, tmp_path, capsys, logging_restored
):
    images = make_shape_folder(tmp_path / "images", per_class=10)
    argv = _without(script_args(tmp_path / "out"), "--learning_rate", "--logging_steps")
    argv += [*TINY_VIT, "--dataset_name", str(images), "--num_train_epochs", "10", "--bp_modified", "false"]
    run(script, argv, capsys)
    state = json.loads((tmp_path / "out" / "trainer_state.json").read_text())
    assert state["global_step"] == 40  # 25 training images in batches of 8, 10 epochs
    logged = [entry for entry in state["log_history"] if "loss" in entry]
    assert [entry["step"] for entry in logged] == list(range(2, 41, 2))  # every ceil(5% of 40) steps
    assert 9e-4 <= max(entry["learning_rate"] for entry in logged) <= 1e-3  # 1e-3, decaying linearly


def test_help_says_the_scripts_own_defaults(script, capsys):
    with pytest.raises(SystemExit):
        script.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert (
        "The script's default for a model built from a config (no --model_name_or_path) with an AdamW-family" in text
    )
    assert "The script's default: 0.05 (every 5% of the run's steps, about 20 logs a run)" in text
