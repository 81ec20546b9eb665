"""Evaluation metrics shipped with hf_bpmod, loadable offline.

``accuracy_topk`` is an ``evaluate`` metric module (top-1 and top-5 accuracy from logits) stored inside the
package, so :func:`load_accuracy_metric` never touches the Hugging Face Hub. :func:`compute_accuracy_metrics` is a
ready-made ``compute_metrics`` for ``transformers.Trainer``::

    from hf_bpmod.metrics import compute_accuracy_metrics

    trainer = Trainer(..., compute_metrics=compute_accuracy_metrics)
    trainer.evaluate()  # {"eval_accuracy": ..., "eval_top5_accuracy": ..., ...}
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

from .._extras import require_extra

with require_extra("hf_bpmod.metrics"):
    import numpy as np

__all__ = ["ACCURACY_TOPK_PATH", "compute_accuracy_metrics", "load_accuracy_metric"]

#: On-disk folder of the ``accuracy_topk`` metric module (``evaluate.load`` accepts it directly).
ACCURACY_TOPK_PATH: Path = Path(__file__).resolve().parent / "accuracy_topk"


def load_accuracy_metric(**kwargs: Any) -> Any:
    """Load the shipped ``accuracy_topk`` metric by its on-disk path (works with ``HF_HUB_OFFLINE=1``).

    Args:
        **kwargs: Passed to ``evaluate.load`` (e.g. ``experiment_id``, ``keep_in_memory``).

    Returns:
        The ``evaluate.EvaluationModule``; ``.compute(predictions=logits, references=labels)`` returns
        ``{"accuracy": ..., "top5_accuracy": ...}``.
    """
    with require_extra("hf_bpmod.metrics"):
        import evaluate

    script = ACCURACY_TOPK_PATH / "accuracy_topk.py"
    if not script.is_file():
        raise FileNotFoundError(
            f"The accuracy_topk metric script is missing at {script}; reinstall hf_bpmod (the package data "
            "'metrics/*/*.py' must be included)."
        )
    return evaluate.load(str(script), **kwargs)


@functools.lru_cache(maxsize=1)
def _cached_metric() -> Any:
    return load_accuracy_metric(keep_in_memory=True)


def compute_accuracy_metrics(eval_pred: Any) -> dict[str, float]:
    """``compute_metrics`` for ``transformers.Trainer``: top-1 and top-5 accuracy from the logits.

    Args:
        eval_pred: A ``transformers.EvalPrediction`` (or a ``(predictions, label_ids)`` pair). When the model
            returns several outputs, ``predictions`` is a tuple and its first element (the logits) is used.

    Returns:
        ``{"accuracy": float, "top5_accuracy": float}``.
    """
    if hasattr(eval_pred, "predictions"):
        predictions, label_ids = eval_pred.predictions, eval_pred.label_ids
    else:
        predictions, label_ids = eval_pred
    if isinstance(predictions, tuple | list) and predictions and not np.isscalar(predictions[0]):
        first = np.asarray(predictions[0])
        if first.ndim == 2:  # a tuple of model outputs: logits come first
            predictions = first
    if label_ids is None:
        raise ValueError(
            "compute_accuracy_metrics got no labels: the eval dataset must yield 'labels' (check the transform, "
            "and label_names in the training arguments)."
        )
    if isinstance(label_ids, tuple | list) and label_ids and not np.isscalar(label_ids[0]):
        label_ids = label_ids[0]
    logits = np.asarray(predictions, dtype=np.float32)
    labels = np.asarray(label_ids, dtype=np.int64).reshape(-1)
    return _cached_metric().compute(predictions=logits, references=labels)
