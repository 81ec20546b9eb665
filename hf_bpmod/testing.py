"""Tiny models and data for tests, benchmarks and examples: built from configs, never downloaded."""

from __future__ import annotations

import torch
import torch.nn.functional as F
import transformers
from torch import nn
from torch.utils.data import Dataset
from transformers import ResNetConfig, ResNetForImageClassification, ViTConfig, ViTForImageClassification


def tiny_vit(num_layers: int = 6, image_size: int = 16, num_labels: int = 5, hidden_size: int = 32, seed: int = 0):
    """A small ``ViTForImageClassification`` from a config (``num_layers`` blocks)."""
    torch.manual_seed(seed)
    config = ViTConfig(
        image_size=image_size,
        patch_size=4,
        num_channels=3,
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=2,
        intermediate_size=2 * hidden_size,
        num_labels=num_labels,
    )
    return ViTForImageClassification(config)


def tiny_resnet(depths: tuple[int, ...] = (2, 2), num_labels: int = 5, seed: int = 0, layer_type: str = "basic"):
    """A small ``ResNetForImageClassification`` from a config (one block per residual layer: ``sum(depths)``)."""
    torch.manual_seed(seed)
    hidden = [8 * 2**i for i in range(len(depths))]
    config = ResNetConfig(
        embedding_size=8, hidden_sizes=hidden, depths=list(depths), layer_type=layer_type, num_labels=num_labels
    )
    return ResNetForImageClassification(config)


def _tiny_settings(kind: str, image_size: int) -> tuple[str, str, dict]:
    """``(config class, model class, config kwargs)`` of a tiny model of ``kind`` for ``image_size`` px inputs."""
    encoder = dict(
        image_size=image_size,
        patch_size=4,
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=2,
        intermediate_size=64,
    )
    swin = dict(image_size=image_size, patch_size=2, embed_dim=16, depths=[2, 2], num_heads=[2, 2], window_size=2)
    convnext = dict(num_stages=2, patch_size=2, hidden_sizes=[8, 16], depths=[2, 2])
    table = {
        "vit": ("ViTConfig", "ViTForImageClassification", encoder),
        "deit": ("DeiTConfig", "DeiTForImageClassification", encoder),
        "deit_distilled": ("DeiTConfig", "DeiTForImageClassificationWithTeacher", encoder),
        "beit": (
            "BeitConfig",
            "BeitForImageClassification",
            {**encoder, "use_relative_position_bias": True, "drop_path_rate": 0.0},
        ),
        "beit_shared": (
            "BeitConfig",
            "BeitForImageClassification",
            {**encoder, "use_shared_relative_position_bias": True, "use_mean_pooling": False, "drop_path_rate": 0.0},
        ),
        "dinov2": (
            "Dinov2Config",
            "Dinov2ForImageClassification",
            {k: v for k, v in encoder.items() if k != "intermediate_size"} | {"mlp_ratio": 2},
        ),
        "swin": ("SwinConfig", "SwinForImageClassification", {**swin, "drop_path_rate": 0.0}),
        "swinv2": ("Swinv2Config", "Swinv2ForImageClassification", {**swin, "drop_path_rate": 0.0}),
        "resnet": (
            "ResNetConfig",
            "ResNetForImageClassification",
            dict(embedding_size=8, hidden_sizes=[8, 16], depths=[2, 2]),
        ),
        "convnext": ("ConvNextConfig", "ConvNextForImageClassification", convnext),
        "convnextv2": ("ConvNextV2Config", "ConvNextV2ForImageClassification", convnext),
        "regnet": (
            "RegNetConfig",
            "RegNetForImageClassification",
            dict(embedding_size=8, hidden_sizes=[8, 16], depths=[2, 2], groups_width=8),
        ),
    }
    if kind not in table:
        raise KeyError(f"No tiny model of kind {kind!r}; kinds: {sorted(table)}.")
    return table[kind]


#: Every kind :func:`tiny_model` builds: one or more per supported architecture.
TINY_KINDS = (
    "vit",
    "deit",
    "deit_distilled",
    "beit",
    "beit_shared",
    "dinov2",
    "swin",
    "swinv2",
    "resnet",
    "convnext",
    "convnextv2",
    "regnet",
)


def tiny_model(kind: str, num_labels: int = 5, image_size: int = 16, seed: int = 0, **overrides):
    """A small image classifier of ``kind`` (one of :data:`TINY_KINDS`) from a config, for ``image_size`` px RGB
    inputs; ``overrides`` go to the config. Dropout and drop-path are 0, so train and eval mode compute the same."""
    config_name, model_name, settings = _tiny_settings(kind, image_size)
    torch.manual_seed(seed)
    config = getattr(transformers, config_name)(num_channels=3, num_labels=num_labels, **{**settings, **overrides})
    return getattr(transformers, model_name)(config)


def emulate_legacy_vit_layout(model: nn.Module) -> nn.Module:
    """Move ``vit.layers`` to ``vit.encoder.layer`` as in transformers < 5.9 (the model's own forward no longer
    runs; only the block chain, which finds layers by structure, does). A model of transformers < 5.9 already has
    that layout and is returned as it is."""
    vit = model.vit
    if not hasattr(vit, "layers"):
        return model
    layers = vit.layers
    del vit.layers
    vit.encoder = nn.Module()
    vit.encoder.layer = layers
    return model


class ImageTensors(Dataset):
    """Images and their labels held as tensors, served as Trainer-ready ``pixel_values``/``labels`` dicts."""

    def __init__(self, pixel_values: torch.Tensor, labels: torch.Tensor) -> None:
        self.pixel_values, self.labels = pixel_values, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"pixel_values": self.pixel_values[i], "labels": self.labels[i]}


class SyntheticImages(ImageTensors):
    """``n`` random images with labels that depend on them (so a model can learn), as Trainer-ready dicts."""

    def __init__(self, n: int = 128, image_size: int = 16, num_labels: int = 5, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        pixel_values = torch.randn(n, 3, image_size, image_size, generator=g)
        direction = torch.randn(num_labels, 3 * image_size * image_size, generator=g)
        super().__init__(pixel_values, (pixel_values.flatten(1) @ direction.T).argmax(-1))


CLASS_WEIGHTS = (0.5, 1.0, 2.0, 1.5, 3.0)


def weighted_cross_entropy(outputs, labels: torch.Tensor, num_items_in_batch=None) -> torch.Tensor:
    """A ``compute_loss_func`` as a user writes one: cross-entropy with ``CLASS_WEIGHTS`` (5 classes), summed and
    divided by the examples of the whole accumulated batch (``num_items_in_batch``) or, without it, of this one."""
    weight = torch.tensor(CLASS_WEIGHTS, dtype=outputs.logits.dtype, device=outputs.logits.device)
    loss = F.cross_entropy(outputs.logits, labels, weight=weight, reduction="sum")
    return loss / (num_items_in_batch if num_items_in_batch is not None else len(labels))


def micro_batch_fetch(data: Dataset):
    """The ``fetch`` of :func:`hf_bpmod.offset_pass.compute_offsets` over a dataset of ``pixel_values`` /
    ``labels`` dicts: the stacked images and a cross-entropy loss on their labels."""

    def fetch(indices: list[int]):
        x = torch.stack([data[i]["pixel_values"] for i in indices])
        y = torch.stack([data[i]["labels"] for i in indices])
        return x, lambda logits: F.cross_entropy(logits, y)

    return fetch


def short_run_data(n_train: int = 4000, n_test: int = 500) -> tuple[ImageTensors, ImageTensors]:
    """The data of :func:`embedded_short_run`, transformed once: the first ``n_train`` training and ``n_test`` test
    images of Animal-Shape-MNIST (split seed 0) at 28 px, normalised with mean and std 0.5."""
    from .data import collate_fn, load_animal_shape_mnist, with_pixel_values

    data = load_animal_shape_mnist(seed=0)

    def tensors(split: str, n: int) -> ImageTensors:
        images = with_pixel_values(data[split].select(range(n)), image_size=28, image_mean=0.5, image_std=0.5)
        batch = collate_fn([images[i] for i in range(n)])
        return ImageTensors(batch["pixel_values"], batch["labels"])

    return tensors("train", n_train), tensors("test", n_test)


def embedded_short_run(
    kind: str,
    output_dir: str,
    seed: int = 0,
    data: tuple[Dataset, Dataset] | None = None,
    **overrides,
) -> float:
    """Test accuracy of a tiny ``kind`` model trained at h = 1 by ``BPModifiedTrainer`` on 4,000 Animal-Shape-MNIST
    images (28 px) for 3 epochs (AdamW, learning rate 1e-2, batch 32), measured on 500 held-out images. Chance is
    0.10. ``data``: the ``(train, test)`` pair of :func:`short_run_data`, made once for many runs (made here when
    omitted). ``overrides`` go to the training arguments."""
    from . import BPModifiedTrainer, BPModifiedTrainingArguments

    train, test = data if data is not None else short_run_data()
    settings = dict(
        output_dir=output_dir,
        local_horizon=1,
        num_train_epochs=3,
        per_device_train_batch_size=32,
        learning_rate=1e-2,
        report_to="none",
        use_cpu=True,
        save_strategy="no",
        seed=seed,
        data_seed=seed,
        disable_tqdm=True,
        logging_steps=50,
    )
    args = BPModifiedTrainingArguments(**{**settings, **overrides})
    model = tiny_model(kind, num_labels=10, image_size=28, seed=seed)
    trainer = BPModifiedTrainer(model=model, args=args, train_dataset=train)
    trainer.train()
    predictions = trainer.predict(test)
    logits = predictions.predictions
    logits = logits[0] if isinstance(logits, tuple) else logits  # the logits first, then any other outputs
    return float((logits.argmax(-1) == predictions.label_ids).mean())
