"""Per-block metrics: every head's training loss in the logs and, with ``eval_block_accuracy``, every head's
evaluation accuracy, i.e. how good the model is if cut after block ``s``.

Head ``s`` reads the block output ``x_s`` (``s = 1 .. T``, counting blocks from 1; :mod:`hf_bpmod.chain`): the
auxiliary heads ``s = h .. T-1`` and the model's own head ``s = T``. Outputs ``x_s`` with ``s < h`` have no head and
are not reported.

- ``block_{s}_loss``: ``L(x_s)`` of training (eq. 4's local loss), summed on the device over the micro-batches since
  the last log and, at the log, averaged over its optimizer steps and over processes, as the Trainer averages
  ``loss`` (``block_{T}_loss`` is ``loss``). No synchronisation until the log.
- ``{prefix}_block_{s}_accuracy`` (``eval_block_{s}_accuracy`` from ``evaluate()``): the share of evaluation examples
  whose argmax of head ``s`` is the label. One forward through the blocks gives every ``x_s``: it replaces the
  model's forward in the Trainer's evaluation loop, and the final head's logits and loss are the Trainer's (so
  ``eval_block_{T}_accuracy`` is the model's accuracy). Predictions and labels are gathered per batch with
  ``gather_for_metrics``, which drops the examples repeated to pad the last batch across processes, as the Trainer
  does for its own predictions.
"""

from __future__ import annotations

import io
import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn
from transformers import TrainerCallback
from transformers.modeling_outputs import ImageClassifierOutput

from ._extras import require_extra
from ._files import write_atomically
from ._unwrap import unwrap_model
from .chain import BlockChain
from .losses import split_inputs

ReduceSum = Callable[[torch.Tensor], Any]
SINGLE_LABEL_ONLY = ("regression", "multi_label_classification")


def loss_name(s: int) -> str:
    """The log name of head ``s``'s training loss."""
    return f"block_{s}_loss"


def accuracy_name(s: int, prefix: str = "eval") -> str:
    """The metric name of head ``s``'s accuracy under the evaluation's ``metric_key_prefix``."""
    return f"{prefix}_block_{s}_accuracy"


def check_eval_block_accuracy(args: Any, model: nn.Module) -> None:
    """Refuse ``eval_block_accuracy`` where an accuracy has no meaning (regression, multi-label) or would not be
    computed (transformers' legacy prediction loop)."""
    if not args.eval_block_accuracy:
        return
    config = unwrap_model(model).config
    problem = config.problem_type or ("regression" if config.num_labels == 1 else None)
    if problem in SINGLE_LABEL_ONLY:
        raise ValueError(
            f"`eval_block_accuracy` reports each head's accuracy, which needs single-label classification, but the "
            f"model's problem_type is {problem!r} (num_labels={config.num_labels}). Set `eval_block_accuracy=False`, "
            "or give the model a single-label config (`problem_type='single_label_classification'`, num_labels >= 2)."
        )
    if getattr(args, "use_legacy_prediction_loop", False):
        raise ValueError(
            "`eval_block_accuracy` is computed in the Trainer's evaluation loop, which `use_legacy_prediction_loop="
            "True` replaces. Set `use_legacy_prediction_loop=False` or `eval_block_accuracy=False`."
        )


class BlockMetrics(TrainerCallback):
    """Collects the per-block metrics of a :class:`~hf_bpmod.BPModifiedTrainer` (see the module's docstring).

    Args:
        chain: the model's blocks and heads (the auxiliary heads on block outputs, the model's own last).
        aux_heads: the auxiliary heads, put in evaluation mode while evaluation runs.
        loss: ``L`` of one head's logits and the labels (:class:`~hf_bpmod.losses.TrainingLoss`): the evaluation loss.
        accelerator: its ``gather_for_metrics`` gathers predictions, its ``num_processes`` averages the losses.
        eval_block_accuracy: the training argument: report every head's evaluation accuracy.
        logging_nan_inf_filter: the training argument: a non-finite loss counts as the average so far.
        label_names: the Trainer's ``label_names``, which must hold ``labels`` for ``eval_block_accuracy``.
        reduce_sum: the in-place sum across processes (``dist.all_reduce``), ``None`` with one process.
    """

    def __init__(
        self,
        chain: BlockChain,
        aux_heads: nn.Module,
        loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        accelerator: Any,
        *,
        eval_block_accuracy: bool = False,
        logging_nan_inf_filter: bool = True,
        label_names: Sequence[str] = ("labels",),
        reduce_sum: ReduceSum | None = None,
    ) -> None:
        if eval_block_accuracy and "labels" not in label_names:
            raise ValueError(
                "`eval_block_accuracy` scores every head against the `labels` of each evaluation batch, but the "
                f"Trainer's `label_names` is {label_names} (some transformers releases find none in a peft "
                "model's forward). Pass `label_names=['labels']` in the arguments."
            )
        self.chain = chain
        self.aux_heads = aux_heads
        self.loss = loss
        self.accelerator = accelerator
        self.eval_block_accuracy = eval_block_accuracy
        self.logging_nan_inf_filter = logging_nan_inf_filter
        self.reduce_sum = reduce_sum
        self.heads = [s for s in range(1, chain.num_blocks + 1) if chain.heads[s - 1] is not None]
        self._sums: dict[int, torch.Tensor] = {}
        self._steps = 0
        self.collecting = False
        self._correct: torch.Tensor | None = None
        self._count = 0
        self._warned = False

    # ------------------------------------------------------------------ training losses
    def on_train_begin(self, args, state, control, **kwargs):
        """A run starts with nothing summed, as the Trainer's ``loss``."""
        self._sums, self._steps = {}, 0

    def add_losses(self, head_losses: Mapping[int, torch.Tensor], step_done: bool) -> None:
        """Add one micro-batch's ``L(x_s)`` (detached, scaled as the Trainer scales ``loss``) to the sums;
        ``step_done`` on the last micro-batch of an optimizer step. With ``logging_nan_inf_filter`` a non-finite
        loss counts as the average so far, as the Trainer counts its ``loss``."""
        nan_filter = self.logging_nan_inf_filter
        for s, loss in head_losses.items():
            total = self._sums.get(s)
            if total is None:
                total = torch.zeros((), dtype=torch.float32, device=loss.device)
            loss = loss.detach().float()
            if nan_filter:
                loss = torch.where(torch.isfinite(loss), loss, total / (1 + self._steps))
            self._sums[s] = total + loss
        if step_done:
            self._steps += 1

    def pop_logs(self) -> dict[str, float]:
        """``block_{s}_loss`` averaged over the optimizer steps since the last call and over processes, then reset.
        Called from ``Trainer.log`` with the Trainer's ``loss``, which every process logs at the same steps."""
        if not self._sums or not self._steps:
            return {}
        heads = sorted(self._sums)
        totals = torch.stack([self._sums[s] for s in heads])
        if self.reduce_sum is not None:
            self.reduce_sum(totals)
            totals = totals / self.accelerator.num_processes
        steps, self._sums, self._steps = self._steps, {}, 0
        return {loss_name(s): total / steps for s, total in zip(heads, totals.tolist())}

    # ------------------------------------------------------------------ evaluation accuracy
    def evaluation_loop(self, loop: Callable[..., Any], *args: Any, metric_key_prefix: str = "eval", **kwargs: Any):
        """Run the Trainer's evaluation ``loop``; with ``eval_block_accuracy`` its metrics gain
        ``{metric_key_prefix}_block_{s}_accuracy`` of every head."""
        if not self.eval_block_accuracy:
            return loop(*args, metric_key_prefix=metric_key_prefix, **kwargs)
        aux_heads = self.aux_heads
        was_training = aux_heads.training
        self._correct, self._count, self.collecting = None, 0, True
        aux_heads.eval()
        try:
            output = loop(*args, metric_key_prefix=metric_key_prefix, **kwargs)
        finally:
            self.collecting = False
            aux_heads.train(was_training)
        if self._correct is None:
            if f"{metric_key_prefix}_loss" in output.metrics and not self._warned:
                self._warned = True
                warnings.warn(
                    "`eval_block_accuracy` is on, but no evaluation batch reached BPModifiedTrainer.compute_loss "
                    "(a `compute_loss` override that does not call it): no per-block accuracy is reported. Call "
                    "`super().compute_loss(...)` in evaluation, or set `eval_block_accuracy=False`.",
                    stacklevel=3,
                )
            return output
        counts = self._correct.tolist()
        for s, correct in zip(self.heads, counts):
            output.metrics[accuracy_name(s, metric_key_prefix)] = correct / self._count if self._count else math.nan
        self._correct = None
        return output

    def compute_loss(self, inputs: dict[str, Any], return_outputs: bool):
        """The Trainer's evaluation loss and logits from one forward through the blocks, recording every head's
        predictions on the way."""
        pixel_values, labels = split_inputs(inputs)
        if labels.ndim != 1 or labels.is_floating_point():
            raise ValueError(
                "`eval_block_accuracy` needs single-label classification (one integer class per example), got "
                f"labels of shape {tuple(labels.shape)} and dtype {labels.dtype}. Set `eval_block_accuracy=False`."
            )
        chain = self.chain
        predictions = []
        x = _as_input_of(chain.blocks[0], pixel_values)  # as the model's forward casts the pixels
        for t, block in enumerate(chain.blocks[:-1]):
            x = block(x)
            head = chain.heads[t]
            if head is not None:
                predictions.append(head(_as_input_of(head, x)).argmax(-1))
        logits = chain.heads[-1](chain.blocks[-1](x))
        predictions.append(logits.argmax(-1))
        loss = self.loss(logits, labels)
        self._record(torch.stack(predictions, dim=1), labels)
        return (loss, ImageClassifierOutput(loss=loss, logits=logits)) if return_outputs else loss

    def _record(self, predictions: torch.Tensor, labels: torch.Tensor) -> None:
        """Count the correct predictions of every head over the batch of every process (one gather per batch)."""
        both = torch.cat([predictions, labels.to(predictions.dtype)[:, None]], dim=1)
        both = self.accelerator.gather_for_metrics(both)
        correct = (both[:, :-1] == both[:, -1:]).sum(dim=0)
        self._correct = correct if self._correct is None else self._correct + correct
        self._count += both.shape[0]


def _as_input_of(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``x`` in the dtype of ``module``'s weights. A model cast for evaluation (``bf16_full_eval``,
    ``fp16_full_eval``) gets float32 pixels, and leaves the auxiliary heads, which are not part of it, in float32."""
    weight = next(module.parameters(), None)
    if weight is None or not x.is_floating_point() or x.dtype == weight.dtype:
        return x
    return x.to(weight.dtype)


def block_accuracy_by_epoch(log_history: list[dict[str, Any]], prefix: str = "eval") -> dict[float, dict[int, float]]:
    """``{epoch: {s: accuracy}}`` from ``trainer.state.log_history``: the last evaluation logged at each epoch."""
    start, end = f"{prefix}_block_", "_accuracy"
    by_epoch: dict[float, dict[int, float]] = {}
    for entry in log_history:
        accuracies = {
            int(key[len(start) : -len(end)]): value
            for key, value in entry.items()
            if key.startswith(start) and key.endswith(end) and key[len(start) : -len(end)].isdigit()
        }
        if accuracies and "epoch" in entry:
            by_epoch[float(entry["epoch"])] = accuracies
    return by_epoch


def plot_block_accuracy(
    log_history: list[dict[str, Any]], path: str, prefix: str = "eval", title: str | None = None
) -> bool:
    """Plot each head's accuracy (x: block ``s``, y: accuracy, one line per epoch) from ``log_history`` into the PNG
    file ``path``, written whole or not at all, under ``title`` (e.g. the run's name). Needs matplotlib (the
    ``examples`` extra); no display is used. Whether there was anything to plot."""
    by_epoch = block_accuracy_by_epoch(log_history, prefix)
    if not by_epoch:
        return False
    figure = block_accuracy_figure(by_epoch, prefix, title)
    image = io.BytesIO()
    figure.savefig(image, format="png")
    write_atomically(path, image.getvalue())
    return True


#: Up to this many epochs each line is named in a legend; beyond, a colour bar gives the epoch.
LEGEND_EPOCHS = 8


def block_accuracy_figure(by_epoch: dict[float, dict[int, float]], prefix: str = "eval", title: str | None = None):
    """The matplotlib ``Figure`` of :func:`plot_block_accuracy`: the epochs' lines in a sequential colour map (early
    light, late dark), named outside the axes (a legend up to :data:`LEGEND_EPOCHS` epochs, a colour bar beyond),
    accuracies from 0 to above 1 so that a line at 1.0 shows whole."""
    with require_extra("hf_bpmod.block_metrics.plot_block_accuracy"):
        from matplotlib import colormaps
        from matplotlib.cm import ScalarMappable
        from matplotlib.colors import Normalize
        from matplotlib.figure import Figure

    epochs = sorted(by_epoch)
    colours = colormaps["viridis_r"]
    norm = Normalize(epochs[0], epochs[-1] if len(epochs) > 1 else epochs[0] + 1)
    figure = Figure(figsize=(7.5, 4.2))
    axes = figure.subplots()
    for epoch in epochs:
        accuracies = by_epoch[epoch]
        blocks = sorted(accuracies)
        axes.plot(
            blocks, [accuracies[s] for s in blocks], marker="o", color=colours(0.1 + 0.9 * norm(epoch)),
            label=f"epoch {epoch:g}",
        )  # fmt: skip
    axes.set_xlabel("block s (the model cut after block s)")
    axes.set_ylabel(f"{prefix} accuracy")
    ticks = sorted({s for accuracies in by_epoch.values() for s in accuracies})
    axes.set_xticks(ticks, [str(s) for s in ticks[:-1]] + [f"{ticks[-1]}\n(model)"])  # the last head is the model's
    axes.set_ylim(0, 1.05)
    axes.grid(alpha=0.3)
    axes.set_title(f"Accuracy of each head by epoch{f': {title}' if title else ''}", fontsize="medium")
    if len(epochs) <= LEGEND_EPOCHS:
        axes.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0)
    else:
        scale = ScalarMappable(norm=Normalize(0.1, 1.0), cmap=colours)
        bar = figure.colorbar(scale, ax=axes, pad=0.02)
        positions = [epochs[0], epochs[len(epochs) // 2], epochs[-1]]
        bar.set_ticks([0.1 + 0.9 * norm(e) for e in positions], labels=[f"{e:g}" for e in positions])
        bar.set_label("epoch")
    figure.tight_layout()
    return figure
