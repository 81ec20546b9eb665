"""Top-1 and top-5 accuracy from logits, as an ``evaluate`` metric module that loads offline.

Load it by path (no Hub access)::

    import evaluate

    metric = evaluate.load("hf_bpmod/metrics/accuracy_topk")  # or ".../accuracy_topk/accuracy_topk.py"
    metric.compute(predictions=[[0.1, 2.0, 0.3], [1.0, 0.2, 0.5]], references=[1, 2])
    # {'accuracy': 0.5, 'top5_accuracy': 1.0}
"""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = """
Top-k classification accuracy computed from logits (or any per-class scores):

    accuracy      = fraction of examples whose highest-scoring class is the reference label (top-1);
    top5_accuracy = fraction of examples whose reference label is among the k highest-scoring classes,
                    with k = min(5, number of classes).

Classes are ranked by decreasing score with ties broken towards the lower class index (a stable sort), so
`accuracy` matches `argmax(logits) == label`.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `list` of `float`, or a 2-D array of shape (num_examples, num_classes)):
        Logits or scores for each class.
    references (`list` of `int`): Ground-truth class indices in [0, num_classes).
    top_k (`int`, defaults to 5): k of the second score; the effective k is min(top_k, num_classes). The key
        stays `top5_accuracy` for the default and becomes `top{top_k}_accuracy` otherwise.

Returns:
    accuracy (`float`): top-1 accuracy in [0, 1].
    top5_accuracy (`float`): top-k accuracy in [0, 1].

Examples:
    >>> import evaluate
    >>> metric = evaluate.load("hf_bpmod/metrics/accuracy_topk")
    >>> metric.compute(predictions=[[0.1, 2.0, 0.3], [1.0, 0.2, 0.5]], references=[1, 2])
    {'accuracy': 0.5, 'top5_accuracy': 1.0}
"""

_CITATION = ""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class AccuracyTopk(evaluate.Metric):
    """Top-1 and top-k (default 5) accuracy from 2-D logits and integer labels."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": datasets.Sequence(datasets.Value("float32")),
                    "references": datasets.Value("int64"),
                }
            ),
            reference_urls=["https://huggingface.co/spaces/evaluate-metric/accuracy"],
        )

    def _compute(self, predictions, references, top_k: int = 5) -> dict[str, float]:
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
            raise ValueError(f"top_k must be a positive int, got {top_k!r}.")
        try:
            logits = np.asarray(predictions, dtype=np.float64)
        except ValueError as error:
            raise ValueError(
                "predictions must be a rectangular 2-D array of logits (num_examples, num_classes); rows of "
                f"different lengths were given ({error})."
            ) from error
        labels = np.asarray(references, dtype=np.int64)
        if logits.ndim != 2:
            raise ValueError(
                f"predictions must be 2-D logits of shape (num_examples, num_classes), got shape {logits.shape}. "
                "Pass the model's logits, not argmax class ids."
            )
        if labels.shape != (logits.shape[0],):
            raise ValueError(
                f"references must hold one int label per prediction row: got {labels.shape[0]} labels for "
                f"{logits.shape[0]} rows."
            )
        if logits.shape[0] == 0:
            raise ValueError("Cannot compute accuracy on zero examples.")
        num_classes = logits.shape[1]
        if labels.min() < 0 or labels.max() >= num_classes:
            raise ValueError(
                f"references must lie in [0, {num_classes}) for {num_classes}-class logits, got values in "
                f"[{labels.min()}, {labels.max()}]. Check that the label ids match the model's classifier."
            )
        k = min(top_k, num_classes)
        ranked = np.argsort(-logits, axis=1, kind="stable")[:, :k]
        hits = ranked == labels[:, None]
        key = "top5_accuracy" if top_k == 5 else f"top{top_k}_accuracy"
        return {"accuracy": float(hits[:, 0].mean()), key: float(hits.any(axis=1).mean())}
