"""End-to-end runs of ``examples/run_image_classification.py`` in a subprocess, offline, on tiny models and data.

Like accelerate's ``tests/test_examples.py``: each test runs the script as a user would (a few tens of seconds on a CPU),
checks the exit code, the last printed line and the metrics files, then reloads what the script saved with the plain
``transformers``/``peft`` classes and recomputes the reported evaluation accuracy and loss from it on the same data.
"""

from __future__ import annotations

import importlib.util
import json
import os
import random
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import datasets
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from transformers import AutoImageProcessor, HfArgumentParser, ViTForImageClassification, ViTImageProcessor

from hf_bpmod import BPModifiedTrainingArguments
from hf_bpmod.data import collate_fn, with_pixel_values
from hf_bpmod.testing import tiny_vit

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "run_image_classification.py"
TIMEOUT = 300  # seconds per run; a run takes 10-40 s on a busy 2-core CPU
CLASSES = ("circle", "square", "triangle")
TINY_CONFIG = "hidden_size=32,num_hidden_layers=2,num_attention_heads=2,intermediate_size=64"
TINY_VIT = ["--model_type", "vit", "--config_overrides", TINY_CONFIG]
FINAL_LINE = re.compile(r"^final eval accuracy: (?P<acc>\d\.\d{4}) \(top-5 (?P<top5>\d\.\d{4})\)$")


def make_image_folder(root: Path, per_class: int, size: int = 16, seed: int = 0) -> Path:
    """``root/<class>/<i>.png``: small RGB PNGs of a bright circle, square or triangle on a dark background."""
    rng = random.Random(seed)
    for name in CLASSES:
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            image = Image.new("RGB", (size, size), tuple(rng.randrange(60) for _ in range(3)))
            draw, color = ImageDraw.Draw(image), tuple(rng.randrange(150, 256) for _ in range(3))
            x, y, s = rng.randrange(1, 5), rng.randrange(1, 5), size - 6
            if name == "circle":
                draw.ellipse([x, y, x + s, y + s], fill=color)
            elif name == "square":
                draw.rectangle([x, y, x + s, y + s], fill=color)
            else:
                draw.polygon([(x, y + s), (x + s, y + s), (x + s // 2, y)], fill=color)
            image.save(root / name / f"{i}.png")
    return root


def common_args(tmp_path: Path) -> list[str]:
    return [
        "--output_dir", str(tmp_path / "out"), "--cache_dir", str(tmp_path / "cache"), "--report_to", "none",
        "--seed", "0", "--use_cpu", "--disable_tqdm", "true", "--per_device_train_batch_size", "8",
        "--per_device_eval_batch_size", "128", "--learning_rate", "1e-3", "--logging_steps", "1",
    ]  # fmt: skip


def run_example(argv: list[str], tmp_path: Path) -> str:
    """Run the script offline; fail with the end of its output unless it exits 0; return its stdout."""
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_DATASETS_CACHE": str(tmp_path / "cache"),
        "WANDB_DISABLED": "true",
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    result = subprocess.run(
        [sys.executable, str(SCRIPT), *argv], cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT
    )
    if result.returncode != 0:
        pytest.fail(
            f"exit code {result.returncode}\n--- stdout (end) ---\n{result.stdout[-3000:]}\n"
            f"--- stderr (end) ---\n{result.stderr[-5000:]}"
        )
    return result.stdout


def check_outputs(stdout: str, out: Path, n_eval: int, n_train: int | None = None) -> dict[str, Any]:
    """The last printed line and the metrics files agree; return the evaluation metrics."""
    last = stdout.strip().splitlines()[-1]
    match = FINAL_LINE.match(last)
    assert match, f"last line is not the final accuracy: {last!r}"
    eval_metrics = json.loads((out / "eval_results.json").read_text())
    assert match["acc"] == f"{eval_metrics['eval_accuracy']:.4f}"
    assert match["top5"] == f"{eval_metrics['eval_top5_accuracy']:.4f}"
    assert eval_metrics["eval_samples"] == n_eval
    everything = json.loads((out / "all_results.json").read_text())
    assert everything["eval_accuracy"] == eval_metrics["eval_accuracy"]
    if n_train is not None:
        train_metrics = json.loads((out / "train_results.json").read_text())
        assert train_metrics["train_samples"] == n_train and train_metrics["train_loss"] > 0
        assert everything["train_samples"] == n_train
        state = json.loads((out / "trainer_state.json").read_text())
        assert state["global_step"] > 0
    return eval_metrics


def import_script() -> ModuleType:
    """The example script as a module (its siblings imported as it imports them)."""
    spec = importlib.util.spec_from_file_location("run_image_classification", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["run_image_classification"] = module  # HfArgumentParser resolves annotations through sys.modules
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def script() -> ModuleType:
    return import_script()


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


def reload_full_model(out: Path) -> ViTForImageClassification:
    model, info = ViTForImageClassification.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    return model


@pytest.mark.parametrize("layout", ["dataset_name", "train_dir"])
def test_tiny_vit_on_an_image_folder(script, tmp_path, layout):
    if layout == "dataset_name":  # one folder; the script splits 15% off for evaluation
        data = ["--dataset_name", str(make_image_folder(tmp_path / "images", per_class=14))]
        n_train, n_eval = 35, 7  # datasets rounds the test share up: ceil(0.15 x 42)
    else:
        train = make_image_folder(tmp_path / "train", per_class=10)
        val = make_image_folder(tmp_path / "val", per_class=4, seed=1)
        data = ["--train_dir", str(train), "--validation_dir", str(val)]
        n_train, n_eval = 30, 12
    argv = [
        *common_args(tmp_path), *TINY_VIT, *data, "--do_train", "--do_eval", "--num_train_epochs", "2",
        "--local_horizon", "1", "--bp_modified", "true", "--offset_batch_size", "16", "--offset_micro_batch_size", "4",
        "--eval_strategy", "epoch", "--save_strategy", "epoch", "--save_total_limit", "1",
    ]  # fmt: skip
    out = tmp_path / "out"
    metrics = check_outputs(run_example(argv, tmp_path), out, n_eval=n_eval, n_train=n_train)
    assert (out / "bpmod_offsets.jsonl").read_text().strip()  # the offset was refreshed and logged
    last_step = 2 * -(-n_train // 8)  # two epochs of ceil(n_train / 8) steps; save_total_limit 1 keeps the last
    assert [p.name for p in out.glob("checkpoint-*")] == [f"checkpoint-{last_step}"]

    model = reload_full_model(out)
    assert list(model.config.id2label.values()) == list(CLASSES)
    assert model.config.num_hidden_layers == 2 and model.config.hidden_size == 32
    accuracy, loss = recompute_eval(script, argv, model, out, model.config.image_size)
    assert accuracy == pytest.approx(metrics["eval_accuracy"], abs=1e-9)
    assert loss == pytest.approx(metrics["eval_loss"], rel=1e-4, abs=1e-6)


def test_embedded_data_default_model(script, tmp_path):
    argv = [
        *common_args(tmp_path), "--max_train_samples", "400", "--max_eval_samples", "100", "--max_steps", "5",
        "--offset_batch_size", "32",
    ]  # fmt: skip
    out = tmp_path / "out"
    metrics = check_outputs(run_example(argv, tmp_path), out, n_eval=100, n_train=400)
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 5
    # the default model is a ViT, which trains without the offset by default
    assert not (out / "bpmod_offsets.jsonl").exists()
    assert "- bp_modified: False" in (out / "README.md").read_text()

    model = reload_full_model(out)
    assert model.config.image_size == 28 and model.config.num_labels == 10
    accuracy, loss = recompute_eval(script, argv, model, out, model.config.image_size)
    assert accuracy == pytest.approx(metrics["eval_accuracy"], abs=1e-9)
    assert loss == pytest.approx(metrics["eval_loss"], rel=1e-4, abs=1e-6)


def test_lora_on_a_local_pretrained_vit(script, tmp_path):
    from peft import PeftModel
    from safetensors.torch import load_file

    pretrained = tmp_path / "tiny-vit"
    tiny_vit(num_layers=2, image_size=16, num_labels=5).save_pretrained(pretrained)
    ViTImageProcessor(size={"height": 16, "width": 16}, image_mean=[0.5] * 3, image_std=[0.5] * 3).save_pretrained(
        pretrained
    )
    argv = [
        *common_args(tmp_path), "--model_name_or_path", str(pretrained), "--ignore_mismatched_sizes", "--peft", "lora",
        "--peft_rank", "2", "--peft_alpha", "4", "--dataset_name", str(make_image_folder(tmp_path / "images", per_class=14)),
        "--max_steps", "4", "--local_horizon", "1", "--bp_modified", "true", "--offset_batch_size", "16",
        "--offset_micro_batch_size", "4",
    ]  # fmt: skip
    out = tmp_path / "out"
    metrics = check_outputs(run_example(argv, tmp_path), out, n_eval=7, n_train=35)
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


def test_eval_strategy_alone_still_trains(tmp_path):
    """`--eval_strategy` sets `do_eval` by itself; with no mode named the script must still train."""
    argv = [
        *common_args(tmp_path), *TINY_VIT, "--dataset_name", str(make_image_folder(tmp_path / "images", per_class=6)),
        "--max_steps", "2", "--bp_modified", "false", "--eval_strategy", "epoch",
    ]  # fmt: skip
    run_example(argv, tmp_path)
    assert (tmp_path / "out" / "train_results.json").exists()


def test_every_heads_accuracy_per_epoch_is_reported_and_plotted(tmp_path):
    """``--eval_block_accuracy`` with ``--eval_strategy epoch``: every head's training loss in the logs, every head's
    accuracy after each epoch and in the final results (the model's own head's is ``eval_accuracy``), and the plot
    ``block_accuracy.png`` (one line per epoch) in the output folder."""
    argv = [
        *common_args(tmp_path), *TINY_VIT, "--dataset_name", str(make_image_folder(tmp_path / "images", per_class=10)),
        "--num_train_epochs", "2", "--bp_modified", "false", "--eval_strategy", "epoch", "--eval_block_accuracy", "true",
    ]  # fmt: skip
    out = tmp_path / "out"
    metrics = check_outputs(run_example(argv, tmp_path), out, n_eval=5, n_train=25)
    assert metrics["eval_block_2_accuracy"] == metrics["eval_accuracy"] and "eval_block_1_accuracy" in metrics
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    trained = [entry for entry in history if "loss" in entry]
    assert trained and all({"block_1_loss", "block_2_loss"} <= set(entry) for entry in trained)
    evaluated = [entry["epoch"] for entry in history if "eval_block_1_accuracy" in entry]
    assert evaluated == [1.0, 2.0]
    plot = out / "block_accuracy.png"
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(plot) as image:
        assert image.size == (600, 400) and len(image.convert("RGB").getcolors(maxcolors=1 << 16) or []) > 10


@pytest.mark.distributed
def test_two_processes_report_once(tmp_path):
    """Under ``torchrun`` (2 CPU processes, gloo) the summary lines, the note on what was saved and the final line
    come once, from the main process; only the per-process rank line comes from each."""
    argv = [
        *common_args(tmp_path), *TINY_VIT, "--dataset_name", str(make_image_folder(tmp_path / "images", per_class=8)),
        "--max_steps", "2", "--per_device_train_batch_size", "4", "--bp_modified", "false", "--peft", "lora",
    ]  # fmt: skip
    env = {
        **os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_DATASETS_CACHE": str(tmp_path / "cache"),
        "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "PYTHONUNBUFFERED": "1",
    }  # fmt: skip
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(SCRIPT)]
    result = subprocess.run([*command, *argv], cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-5000:]
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
