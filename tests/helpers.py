"""What the tests share, written once: training arguments, tiny peft-wrapped models, the independent autograd reference
of local gradients (eq. 4), image data in every form ``hf_bpmod.data.load_image_dataset`` reads, and runs of the
example script. Fixtures built on these live in ``conftest.py``; no test module imports another."""

from __future__ import annotations

import importlib.util
import io
import json
import os
import random
import re
import socket
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from peft import LoKrConfig, LoraConfig, get_peft_model
from PIL import Image, ImageDraw
from transformers import ViTForImageClassification, ViTImageProcessor

from hf_bpmod import BPModifiedTrainingArguments, get_adapter
from hf_bpmod.chain import BlockChain
from hf_bpmod.testing import tiny_resnet, tiny_vit

ROOT = Path(__file__).resolve().parents[1]

# ---------------------------------------------------------------------------------------------- training arguments
#: The settings every trainer test starts from: offline, on the CPU, seeded, no checkpoints, a log line per step.
COMMON: dict[str, Any] = dict(
    per_device_train_batch_size=16,
    learning_rate=1e-3,
    report_to="none",
    use_cpu=True,
    save_strategy="no",
    seed=0,
    data_seed=0,
    disable_tqdm=True,
    logging_steps=1,
)


def training_args(output_dir: str | os.PathLike, cls: type = BPModifiedTrainingArguments, **overrides: Any):
    """``cls`` (``BPModifiedTrainingArguments`` or plain ``TrainingArguments``) from :data:`COMMON` and
    ``overrides``."""
    return cls(output_dir=str(output_dir), **{**COMMON, **overrides})


def max_param_diff(a: torch.nn.Module, b: torch.nn.Module) -> float:
    """The largest absolute difference between the parameters of two models of one architecture."""
    return max((x - y).abs().max().item() for x, y in zip(a.parameters(), b.parameters(), strict=True))


# ---------------------------------------------------------------------------------------------- models
#: The kinds of :func:`make`: plain, peft-wrapped and legacy-layout models at each granularity.
KINDS = ["vit", "vit_legacy", "resnet", "resnet_stem", "resnet_stage", "vit_lora", "resnet_lokr"]


def lora_vit(num_layers: int = 4, **kw):
    model = tiny_vit(num_layers=num_layers, **kw)
    targets = get_adapter(model).peft_target_modules(model)  # q_proj/v_proj, or query/value before transformers 5.9
    config = LoraConfig(
        r=2, lora_alpha=4, target_modules=targets, modules_to_save=["classifier"], init_lora_weights=False
    )
    return get_peft_model(model, config)


def lokr_resnet(**kw):
    model = tiny_resnet(**kw)
    config = LoKrConfig(
        r=2, alpha=4, target_modules=["convolution"], modules_to_save=["classifier"], init_weights=False
    )
    return get_peft_model(model, config)


def make(kind: str):
    """``(model, granularity)`` for a kind of :data:`KINDS`."""
    if kind == "vit":
        return tiny_vit(num_layers=4), "layer"
    if kind == "vit_legacy":  # the layout is emulated after the model's own forward has run
        return tiny_vit(num_layers=4), "layer"
    if kind == "resnet":
        return tiny_resnet(depths=(2, 2)), "layer"
    if kind == "resnet_stem":
        return tiny_resnet(depths=(2, 2)), "layer+stem"
    if kind == "resnet_stage":
        return tiny_resnet(depths=(2, 1, 1)), "stage"
    if kind == "vit_lora":
        return lora_vit(), "layer"
    if kind == "resnet_lokr":
        return lokr_resnet(), "layer"
    raise KeyError(kind)


# ---------------------------------------------------------------------------------------------- local gradients
def chain_of(model: torch.nn.Module, horizon: int, granularity: str = "layer") -> BlockChain:
    """The block chain of ``model`` with the auxiliary heads of ``horizon``, in the model's dtype."""
    adapter = get_adapter(model)
    heads = adapter.aux_heads(model, horizon, granularity).to(next(model.parameters()).dtype)
    return adapter.chain(model, heads, granularity)


def float64_batch(size: int = 16, n: int = 6, seed: int = 1, num_labels: int = 5):
    """``(x, loss_fn)``: ``n`` random float64 images of ``size`` px and the cross-entropy on random labels."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, size, size, generator=g, dtype=torch.float64)
    y = torch.randint(0, num_labels, (n,), generator=g)
    return x, lambda logits: F.cross_entropy(logits, y)


def reference_local_gradients(
    chain: BlockChain, x: torch.Tensor, loss_fn: Callable, horizon: int
) -> tuple[list[tuple[torch.Tensor, ...]], dict[int, tuple[torch.Tensor, ...]]]:
    """Eq. 4 by plain autograd, independently of ``hf_bpmod.local_grad``: for each block ``t`` on its own, a fresh
    forward to ``x_{min(t+h, T)}`` and the gradient of that head's loss with respect to ``u_t`` only (no streaming,
    no detaching, no graph shared between blocks); and for each head ``s`` with parameters, the gradient of its own
    loss on the detached ``x_s``. Returns ``(blocks, heads)``: ``blocks[t]``, ``heads[s]``."""
    T = chain.num_blocks
    blocks = []
    for t in range(T):
        s = min(t + horizon, T)
        out = x
        for block in chain.blocks[:s]:
            out = block(out)
        blocks.append(torch.autograd.grad(loss_fn(chain.heads[s - 1](out)), chain.block_params[t]))
    heads = {}
    out = x
    for s in range(1, T + 1):
        out = chain.blocks[s - 1](out).detach()
        if chain.head_params[s - 1]:
            heads[s] = torch.autograd.grad(loss_fn(chain.heads[s - 1](out)), chain.head_params[s - 1])
    return blocks, heads


def assert_local_gradients_match_reference(chain: BlockChain, x: torch.Tensor, loss_fn: Callable, horizon: int):
    """``local_gradients`` gives every block the reference gradient of eq. 4 (to float64 precision); below the cut
    (``h < T``) block 0's local gradient differs from the true one, so the comparison is not vacuous."""
    from hf_bpmod import local_gradients

    reference, _ = reference_local_gradients(chain, x, loss_fn, horizon)
    got = local_gradients(chain, x, loss_fn, horizon, also_true=horizon < chain.num_blocks)
    for t in range(chain.num_blocks):
        assert chain.block_params[t], f"block {t} has trainable parameters"
        for a, b in zip(got.local[t], reference[t], strict=True):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    if horizon < chain.num_blocks:
        assert sum((a - b).abs().sum() for a, b in zip(got.local[0], got.true[0], strict=True)) > 1e-8


# ---------------------------------------------------------------------------------------------- image data
# Image ``i`` is an 8x8 RGB PNG whose red value is ``i`` (so a loaded row says which image it is) and whose green value
# is its class's brightness (so a model can learn the class); its class is ``CLASSES[i % 3]``.
CLASSES = ("cat", "dog", "owl")
INT_CLASSES = (3, 7, 10)  # integer labels that are not 0..K-1


def image(i: int) -> Image.Image:
    return Image.new("RGB", (8, 8), (i, 40 + 90 * (i % 3), 0))


def png(i: int) -> bytes:
    buffer = io.BytesIO()
    image(i).save(buffer, format="PNG")
    return buffer.getvalue()


def label(i: int) -> str:
    return CLASSES[i % 3]


def identity(loaded: Image.Image) -> int:
    """Which image a loaded one is."""
    return loaded.convert("RGB").getpixel((0, 0))[0]


#: Ways an image file is found broken in real data: a PNG cut off, a JPEG cut off in its pixel data (its header, and
#: so ``PIL.Image.open`` and ``verify()``, still fine), a file of something else under an image's name.
BROKEN_KINDS = ("cut_png", "cut_jpeg", "not_an_image")


def broken_image(kind: str, i: int) -> bytes:
    """The bytes of image ``i`` broken as ``kind`` (one of :data:`BROKEN_KINDS`)."""
    if kind == "cut_png":
        whole = png(i)
        return whole[: len(whole) // 2]
    if kind == "cut_jpeg":  # noise, so that the pixel data is most of the file
        noise = Image.frombytes("RGB", (64, 64), random.Random(i).randbytes(64 * 64 * 3))
        buffer = io.BytesIO()
        noise.save(buffer, format="JPEG", quality=90)
        whole = buffer.getvalue()
        return whole[: len(whole) * 2 // 3]
    if kind == "not_an_image":
        return b"<html>404 Not Found</html>\n"
    raise KeyError(kind)


def write_pngs(folder: Path, ids: Sequence[int]) -> list[str]:
    """``folder/<i>.png`` for each id; return the file names."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in ids:
        image(i).save(folder / f"{i}.png")
    return [f"{i}.png" for i in ids]


def write_csv(path: Path, ids: Sequence[int], image_prefix: str, labels: bool = True) -> Path:
    """A csv of image paths (``image_prefix`` + file name) and class names."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = ["image,label" if labels else "image"]
    lines += [f"{image_prefix}{i}.png" + (f",{label(i)}" if labels else "") for i in ids]
    path.write_text("\n".join(lines) + "\n")
    return path


def write_jsonl(path: Path, ids: Sequence[int], image_prefix: str, as_list: bool = False) -> Path:
    """Json lines (or one json list) of image paths and integer labels ``INT_CLASSES[i % 3]``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    records = [{"image": f"{image_prefix}{i}.png", "label": INT_CLASSES[i % 3]} for i in ids]
    text = json.dumps(records) if as_list else "".join(json.dumps(r) + "\n" for r in records)
    path.write_text(text)
    return path


def table(ids: Sequence[int]) -> pa.Table:
    """Encoded images as plain bytes and class names, as pandas or pyarrow write them."""
    return pa.table({"image": [png(i) for i in ids], "label": [label(i) for i in ids]})


def write_parquet(path: Path, ids: Sequence[int]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table(ids), path)
    return path


def write_arrow(path: Path, ids: Sequence[int]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = table(ids)
    with pa.ipc.new_stream(str(path), data.schema) as writer:
        writer.write_table(data)
    return path


def cifar_style(ids: Sequence[int], names: Sequence[str] = CLASSES) -> datasets.Dataset:
    """``img`` (``datasets.Image``) and ``label`` (``ClassLabel(names)``), as ``uoft-cs/cifar10`` has them."""
    features = datasets.Features({"img": datasets.Image(), "label": datasets.ClassLabel(names=list(names))})
    rows = {"img": [image(i) for i in ids], "label": [names.index(label(i)) for i in ids]}
    return datasets.Dataset.from_dict(rows, features=features)


def write_metadata_folder(folder: Path, ids: Sequence[int]) -> Path:
    """An image folder whose ``metadata.csv`` names each ``file_name`` and its ``species``."""
    names = write_pngs(folder, ids)
    rows = [f"{name},{label(i)}" for name, i in zip(names, ids)]
    (folder / "metadata.csv").write_text("file_name,species\n" + "\n".join(rows) + "\n")
    return folder


def write_class_folders(folder: Path, ids: Sequence[int]) -> Path:
    """An image folder with one sub-folder per class."""
    for i in ids:
        write_pngs(folder / label(i), [i])
    return folder


#: The classes of :func:`make_shape_folder`, in label order.
SHAPES = ("circle", "square", "triangle")


def make_shape_folder(root: Path, per_class: int, size: int = 16, seed: int = 0) -> Path:
    """``root/<class>/<i>.png``: small RGB PNGs of a bright circle, square or triangle on a dark background, a class
    a model can learn in a few steps."""
    rng = random.Random(seed)
    for name in SHAPES:
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            picture = Image.new("RGB", (size, size), tuple(rng.randrange(60) for _ in range(3)))
            draw, color = ImageDraw.Draw(picture), tuple(rng.randrange(150, 256) for _ in range(3))
            x, y, s = rng.randrange(1, 5), rng.randrange(1, 5), size - 6
            if name == "circle":
                draw.ellipse([x, y, x + s, y + s], fill=color)
            elif name == "square":
                draw.rectangle([x, y, x + s, y + s], fill=color)
            else:
                draw.polygon([(x, y + s), (x + s, y + s), (x + s // 2, y)], fill=color)
            picture.save(root / name / f"{i}.png")
    return root


# ---------------------------------------------------------------------------------------------- the example script
SCRIPT = ROOT / "examples" / "run_image_classification.py"
TINY_CONFIG = "hidden_size=32,num_hidden_layers=2,num_attention_heads=2,intermediate_size=64"
TINY_VIT = ["--model_type", "vit", "--config_overrides", TINY_CONFIG]
FINAL_LINE = re.compile(r"^final eval accuracy: (?P<acc>\d\.\d{4}) \(top-5 (?P<top5>\d\.\d{4})\)$")
#: The environment of a run of the script in a subprocess: offline, one thread, nothing reported.
OFFLINE = {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "WANDB_DISABLED": "true",
    "OMP_NUM_THREADS": "1",
    "TOKENIZERS_PARALLELISM": "false",
}
TIMEOUT = 300  # seconds per subprocess run; a run takes 10-40 s on a busy 2-core CPU


def import_file(name: str, path: Path) -> ModuleType:
    """The Python file ``path`` imported as the module ``name``."""
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # HfArgumentParser resolves a dataclass's annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def import_script() -> ModuleType:
    """The example script as a module (its siblings imported as it imports them)."""
    return import_file("run_image_classification", SCRIPT)


def script_args(out: Path, cache: Path | None = None) -> list[str]:
    """The flags every run of the script in the tests passes: output folder, offline, seeded, small batches."""
    return [
        "--output_dir", str(out), *(["--cache_dir", str(cache)] if cache else []), "--report_to", "none",
        "--seed", "0", "--use_cpu", "--disable_tqdm", "true", "--per_device_train_batch_size", "8",
        "--per_device_eval_batch_size", "128", "--learning_rate", "1e-3", "--logging_steps", "1",
    ]  # fmt: skip


def run_script_subprocess(argv: list[str], cache: Path, launcher: Sequence[str] = ()) -> subprocess.CompletedProcess:
    """Run the script as a user does (``launcher``, e.g. ``torchrun ...``, in place of ``python``), offline; fail with
    the end of its output unless it exits 0."""
    env = {
        **os.environ,
        **OFFLINE,
        "HF_DATASETS_CACHE": str(cache),
        "CUDA_VISIBLE_DEVICES": "",
        "PYTHONUNBUFFERED": "1",
    }
    result = subprocess.run(
        [*(launcher or [sys.executable]), str(SCRIPT), *argv],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    if result.returncode != 0:
        pytest.fail(
            f"exit code {result.returncode}\n--- stdout (end) ---\n{result.stdout[-3000:]}\n"
            f"--- stderr (end) ---\n{result.stderr[-5000:]}"
        )
    return result


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


def reload_full_model(out: Path) -> ViTForImageClassification:
    """The ViT the script saved in ``out``, reloaded with plain transformers, every weight found."""
    model, info = ViTForImageClassification.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    return model


def save_pretrained_vit(folder: Path, num_labels: int = 3, image_size: int = 16) -> Path:
    """A tiny pretrained ViT with its image processor in ``folder``, as ``save_pretrained`` writes them."""
    tiny_vit(num_layers=2, image_size=image_size, num_labels=num_labels).save_pretrained(folder)
    ViTImageProcessor(
        size={"height": image_size, "width": image_size}, image_mean=[0.5] * 3, image_std=[0.5] * 3
    ).save_pretrained(folder)
    return folder


# ---------------------------------------------------------------------------------------------- model cards
def read_card(path: Path) -> tuple[dict[str, Any], str]:
    """A model card's YAML metadata and its text."""
    import yaml

    content = path.read_text()
    assert content.startswith("---\n"), "the card has no metadata block"
    metadata, text = content[len("---\n") :].split("\n---\n", 1)
    return yaml.safe_load(metadata), text


def card_links(text: str) -> list[str]:
    """The targets of a card's markdown links."""
    return re.findall(r"\]\(([^)]*)\)", text)


def card_section(text: str, heading: str) -> str:
    """The body of the card's ``## heading`` section, up to the next heading."""
    return text.split(f"\n## {heading}\n", 1)[1].split("\n#", 1)[0].strip()


# ---------------------------------------------------------------------------------------------- the Hub
def closed_port_endpoint() -> str:
    """An http address on this machine where nothing listens: a connection to it is refused at once."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def put_in_hub_cache(cache: Path, repo_id: str, source: Path) -> None:
    """Lay ``source``'s files out as huggingface_hub caches a download of ``repo_id`` (revision main)."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for file in source.iterdir():
        (snapshot / file.name).write_bytes(file.read_bytes())
