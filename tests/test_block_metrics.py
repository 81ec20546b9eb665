"""Per-block metrics: every head's training loss in the logs (``block_{s}_loss``) and, with ``eval_block_accuracy``,
every head's evaluation accuracy (``eval_block_{s}_accuracy``), each against an independent forward of the model's
own modules (a ViT's hidden states; a ResNet's residual layers one by one, its hidden states being per stage)."""

from __future__ import annotations

import copy
import warnings
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from helpers import training_args
from PIL import Image
from torch.utils.data import Dataset

from hf_bpmod import BPModifiedTrainer, BPModifiedTrainingArguments
from hf_bpmod.adapters import get_adapter
from hf_bpmod.block_metrics import BlockMetrics, block_accuracy_by_epoch, plot_block_accuracy
from hf_bpmod.losses import TrainingLoss
from hf_bpmod.metrics import compute_accuracy_metrics
from hf_bpmod.testing import SyntheticImages, tiny_model

NUM_BLOCKS = 4  # tiny_model("vit") has 4 encoder layers, tiny_model("resnet") 2 stages of 2 residual layers


def _args(tmp_path, **kw) -> BPModifiedTrainingArguments:
    return training_args(tmp_path / "out", **{"bp_modified": False, **kw})


def _block_outputs(model, kind: str, pixel_values: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    """``[x_1, ..., x_T]`` and the model's logits, from the model's own modules."""
    if kind == "vit":
        out = model(pixel_values=pixel_values, output_hidden_states=True)
        return list(out.hidden_states[1:]), out.logits
    x, outputs = model.resnet.embedder(pixel_values), []
    for stage in model.resnet.encoder.stages:
        for layer in stage.layers:
            x = layer(x)
            outputs.append(x)
    return outputs, model(pixel_values=pixel_values).logits


def _head_logits(model, aux_heads, kind: str, pixel_values: torch.Tensor) -> dict[int, torch.Tensor]:
    """``{s: logits of head s}`` for every head: the auxiliary ones on ``x_s``, the model's own (``s = T``)."""
    outputs, logits = _block_outputs(model, kind, pixel_values)
    assert len(outputs) == NUM_BLOCKS
    heads = {int(s): head(outputs[int(s) - 1]) for s, head in aux_heads.items()}
    return {**heads, NUM_BLOCKS: logits}


# ---------------------------------------------------------------------------------------------- training losses
@pytest.mark.parametrize("kind", ["vit", "resnet"])
def test_the_logged_block_losses_are_each_heads_loss(tmp_path, kind):
    """One optimizer step over the whole training set, one log: ``block_{s}_loss`` is the cross-entropy of head ``s``
    on ``x_s`` with the weights before the step (BatchNorm in training mode, as training computes it)."""
    data = SyntheticImages(16)
    model = tiny_model(kind)
    args = _args(tmp_path, max_steps=1, per_device_train_batch_size=16, logging_steps=1, local_horizon=1)
    trainer = BPModifiedTrainer(model=model, args=args, train_dataset=data)
    before, aux_before = copy.deepcopy(model), copy.deepcopy(trainer.aux_heads)
    trainer.train()
    (logged,) = [entry for entry in trainer.state.log_history if "loss" in entry]
    with torch.no_grad():
        logits = _head_logits(before.train(), aux_before.train(), kind, data.pixel_values)
    expected = {f"block_{s}_loss": F.cross_entropy(z, data.labels).item() for s, z in logits.items()}
    assert (
        sorted(k for k in logged if k.startswith("block_"))
        == sorted(expected)
        == [f"block_{s}_loss" for s in range(1, NUM_BLOCKS + 1)]
    )
    for name, value in expected.items():
        assert logged[name] == pytest.approx(value, rel=1e-5), name
    assert logged[f"block_{NUM_BLOCKS}_loss"] == pytest.approx(logged["loss"], abs=5e-5)  # transformers < 5 rounds
    assert len({round(logged[name], 4) for name in expected}) == NUM_BLOCKS  # four different heads


def test_block_losses_average_over_accumulation_and_steps_and_only_heads_that_exist_are_logged(tmp_path):
    """2 optimizer steps of 2 accumulated micro-batches of 8, one log: with the learning rate at 0 every micro-batch
    sees the initial weights, so each ``block_{s}_loss`` is the head's mean loss over all 32 examples. Under ``h = 2``
    block output ``x_1`` has no head, and no ``block_1_loss``."""
    data = SyntheticImages(32)
    model = tiny_model("vit")
    args = _args(
        tmp_path, max_steps=2, per_device_train_batch_size=8, gradient_accumulation_steps=2, logging_steps=2,
        learning_rate=0.0, local_horizon=2,
    )  # fmt: skip
    trainer = BPModifiedTrainer(model=model, args=args, train_dataset=data)
    trainer.train()
    (logged,) = [entry for entry in trainer.state.log_history if "loss" in entry]
    with torch.no_grad():
        logits = _head_logits(model.eval(), trainer.aux_heads.eval(), "vit", data.pixel_values)
    assert sorted(logits) == [2, 3, 4]
    assert sorted(k for k in logged if k.startswith("block_")) == ["block_2_loss", "block_3_loss", "block_4_loss"]
    for s, z in logits.items():
        assert logged[f"block_{s}_loss"] == pytest.approx(F.cross_entropy(z, data.labels).item(), rel=1e-5)


def test_non_finite_losses_count_as_the_trainers_loss_does_and_processes_are_averaged():
    """``logging_nan_inf_filter``: a non-finite micro-batch loss adds the average so far, the Trainer's rule for
    ``loss`` (``tr_loss += tr_loss / (1 + steps since the last log)``); the sums are averaged over processes."""
    other_process = torch.tensor([1.0, 5.0])  # what the other process summed, for heads 2 and 3

    def reduce_sum(tensor: torch.Tensor) -> None:
        tensor.add_(other_process)

    for nan_filter, head_2 in ((True, (2.0 + 2.0 / 2 + 0.5 + 1.0) / 2 / 2), (False, float("nan"))):
        chain = SimpleNamespace(num_blocks=3, heads=[None, object(), object()])
        accelerator = SimpleNamespace(num_processes=2)
        metrics = BlockMetrics(
            chain, None, None, accelerator, logging_nan_inf_filter=nan_filter, reduce_sum=reduce_sum
        )
        assert metrics.heads == [2, 3]
        metrics.add_losses({2: torch.tensor(2.0), 3: torch.tensor(1.0)}, step_done=True)
        metrics.add_losses({2: torch.tensor(float("nan")), 3: torch.tensor(2.0)}, step_done=False)
        metrics.add_losses({2: torch.tensor(0.5), 3: torch.tensor(2.0)}, step_done=True)
        logs = metrics.pop_logs()
        assert logs["block_3_loss"] == pytest.approx((5.0 + 5.0) / 2 / 2)
        assert logs["block_2_loss"] == pytest.approx(head_2, nan_ok=True)
        assert metrics.pop_logs() == {}  # reset: nothing until the next step


# ---------------------------------------------------------------------------------------------- evaluation accuracy
@pytest.mark.parametrize("kind, horizon", [("vit", 1), ("resnet", 2)])
def test_each_heads_evaluation_accuracy_is_the_model_cut_after_its_block(tmp_path, kind, horizon):
    """Two epochs with an evaluation after each, then ``evaluate()``, ``evaluate(metric_key_prefix=...)`` and
    ``predict()`` on 10 examples in batches of 4 (the last one of 2): every ``*_block_{s}_accuracy`` is the share of
    examples that head ``s`` classifies right, computed independently; ``s = T`` is the model's accuracy. Evaluation
    makes one forward through the blocks (the model's own forward never runs), and its loss and accuracy are those of
    the same trainer without the flag."""
    train, evaluation = SyntheticImages(64), SyntheticImages(10, seed=1)
    model = tiny_model(kind)
    kw = dict(per_device_train_batch_size=16, per_device_eval_batch_size=4, learning_rate=3e-3, local_horizon=horizon)
    args = _args(tmp_path, num_train_epochs=2, eval_strategy="epoch", eval_block_accuracy=True, **kw)
    trainer = BPModifiedTrainer(
        model=model, args=args, train_dataset=train, eval_dataset=evaluation, compute_metrics=compute_accuracy_metrics
    )
    trainer.train()
    heads = list(range(horizon, NUM_BLOCKS + 1))
    by_epoch = block_accuracy_by_epoch(trainer.state.log_history)
    assert sorted(by_epoch) == [1.0, 2.0] and all(sorted(acc) == heads for acc in by_epoch.values())

    forward_calls = []
    hook = model.register_forward_hook(lambda *_: forward_calls.append(1))
    metrics = trainer.evaluate()
    heldout = trainer.evaluate(metric_key_prefix="heldout")
    test = trainer.predict(evaluation).metrics
    hook.remove()
    assert not forward_calls
    assert trainer.aux_heads.training  # put back in the mode training left it in

    with torch.no_grad():
        logits = _head_logits(model.eval(), trainer.aux_heads.eval(), kind, evaluation.pixel_values)
    assert sorted(logits) == heads
    for s, z in logits.items():
        accuracy = (z.argmax(-1) == evaluation.labels).sum().item() / len(evaluation)
        assert metrics[f"eval_block_{s}_accuracy"] == accuracy
        assert heldout[f"heldout_block_{s}_accuracy"] == test[f"test_block_{s}_accuracy"] == accuracy
        assert by_epoch[2.0][s] == accuracy  # the evaluation after the last epoch saw the same weights
    assert not [k for k in metrics if k.startswith("eval_block_") and int(k.split("_")[2]) not in heads]
    assert not [k for k in heldout if k.startswith("eval_")]
    assert metrics[f"eval_block_{NUM_BLOCKS}_accuracy"] == metrics["eval_accuracy"]
    assert metrics["eval_loss"] == pytest.approx(F.cross_entropy(logits[NUM_BLOCKS], evaluation.labels).item(), 1e-5)
    assert len({metrics[f"eval_block_{s}_accuracy"] for s in heads}) > 1  # the heads differ

    plain = BPModifiedTrainer(
        model=model, args=_args(tmp_path, **kw), eval_dataset=evaluation, compute_metrics=compute_accuracy_metrics
    ).evaluate()
    assert not [k for k in plain if "block" in k]
    assert plain["eval_accuracy"] == metrics["eval_accuracy"]
    assert plain["eval_loss"] == pytest.approx(metrics["eval_loss"], rel=1e-6)


@pytest.mark.parametrize("kind", ["vit", "resnet"])
def test_block_metrics_built_from_plain_objects_score_every_head(kind):
    """``BlockMetrics`` from a chain, its auxiliary heads, a loss and a stand-in accelerator, under a stand-in
    evaluation loop over batches of 4 and 2: each head's accuracy is its share of right argmaxes, the loss of each
    batch is the model's own, and the heads are back in training mode afterwards."""
    model = tiny_model(kind).eval()
    adapter = get_adapter(model)
    aux_heads = adapter.aux_heads(model, 1)
    chain = adapter.chain(model, aux_heads)
    gathered = []
    accelerator = SimpleNamespace(num_processes=1, gather_for_metrics=lambda t: gathered.append(t) or t)
    metrics = BlockMetrics(chain, aux_heads, TrainingLoss(model), accelerator, eval_block_accuracy=True)
    data = SyntheticImages(6)
    batches = [
        {"pixel_values": data.pixel_values[i : i + n], "labels": data.labels[i : i + n]} for i, n in ((0, 4), (4, 2))
    ]
    losses = []

    def loop(*args, metric_key_prefix="eval", **kwargs):
        assert not aux_heads.training
        with torch.no_grad():
            losses.extend(metrics.compute_loss(batch, return_outputs=False) for batch in batches)
        return SimpleNamespace(metrics={f"{metric_key_prefix}_loss": 0.0})

    output = metrics.evaluation_loop(loop, metric_key_prefix="test")
    assert aux_heads.training and [t.shape for t in gathered] == [(4, NUM_BLOCKS + 1), (2, NUM_BLOCKS + 1)]
    with torch.no_grad():
        logits = _head_logits(model, aux_heads.eval(), kind, data.pixel_values)
        own = [model(**batch).loss for batch in batches]
    expected = {f"test_block_{s}_accuracy": (z.argmax(-1) == data.labels).sum().item() / 6 for s, z in logits.items()}
    assert output.metrics == pytest.approx({"test_loss": 0.0, **expected}, abs=1e-12)
    torch.testing.assert_close(losses, own)


def test_a_model_cast_for_evaluation_is_scored_in_its_dtype(tmp_path):
    """``bf16_full_eval`` casts the model, not the pixels nor the auxiliary heads: the blocks get the pixels in the
    model's dtype, as the model's own forward casts them, and each auxiliary head its input in its own dtype."""
    evaluation = SyntheticImages(10, seed=1)
    model = tiny_model("vit")
    kw = dict(per_device_eval_batch_size=4, bf16_full_eval=True, local_horizon=1)

    def evaluate(**flag):
        trainer = BPModifiedTrainer(
            model=model,
            args=_args(tmp_path, **kw, **flag),
            eval_dataset=evaluation,
            compute_metrics=compute_accuracy_metrics,
        )
        return trainer, trainer.evaluate()

    trainer, metrics = evaluate(eval_block_accuracy=True)
    assert next(model.parameters()).dtype == torch.bfloat16
    assert next(trainer.aux_heads.parameters()).dtype == torch.float32
    assert sorted(k for k in metrics if "_block_" in k) == [f"eval_block_{s}_accuracy" for s in range(1, 5)]
    assert metrics["eval_block_4_accuracy"] == metrics["eval_accuracy"]
    _, plain = evaluate()  # the model's own forward, in bfloat16
    assert plain["eval_accuracy"] == metrics["eval_accuracy"]
    assert plain["eval_loss"] == pytest.approx(metrics["eval_loss"], rel=1e-3)


@pytest.mark.parametrize(
    "configure",
    [
        lambda m: setattr(m.config, "problem_type", "multi_label_classification"),
        lambda m: setattr(m.config, "problem_type", "regression"),
        lambda m: setattr(m.config, "num_labels", 1),
    ],
)
def test_regression_and_multi_label_models_are_refused_when_the_trainer_is_built(tmp_path, configure):
    model = tiny_model("vit")
    configure(model)
    with pytest.raises(ValueError, match=r"`eval_block_accuracy` reports each head's accuracy, which needs single-"):
        BPModifiedTrainer(model=model, args=_args(tmp_path, eval_block_accuracy=True))
    BPModifiedTrainer(model=model, args=_args(tmp_path))  # without the flag the model trains as before


class _MultiHot(Dataset):
    def __init__(self, n: int) -> None:
        self.data = SyntheticImages(n)

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"pixel_values": self.data.pixel_values[i], "labels": F.one_hot(self.data.labels[i], 5).float()}


def test_labels_that_are_not_one_class_per_example_are_refused_in_evaluation(tmp_path):
    trainer = BPModifiedTrainer(model=tiny_model("vit"), args=_args(tmp_path, eval_block_accuracy=True))
    with pytest.raises(ValueError, match=r"`eval_block_accuracy` needs single-label classification .* shape \(8, 5\)"):
        trainer.evaluate(_MultiHot(8))


def test_label_names_without_the_labels_are_refused_when_the_trainer_is_built(tmp_path):
    with pytest.raises(ValueError, match=r"`label_names` is \[\].*Pass `label_names=\['labels'\]`"):
        BPModifiedTrainer(model=tiny_model("vit"), args=_args(tmp_path, eval_block_accuracy=True, label_names=[]))


def test_a_compute_loss_override_that_skips_ours_is_reported(tmp_path):
    class OwnLoss(BPModifiedTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            outputs = model(**inputs)
            return (outputs.loss, outputs) if return_outputs else outputs.loss

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the override itself is flagged when the trainer is built
        trainer = OwnLoss(model=tiny_model("vit"), args=_args(tmp_path, eval_block_accuracy=True))
    with pytest.warns(UserWarning, match="no evaluation batch reached BPModifiedTrainer.compute_loss"):
        metrics = trainer.evaluate(SyntheticImages(8))
    assert "eval_loss" in metrics and not [k for k in metrics if "block" in k]


# ---------------------------------------------------------------------------------------------- the plot
def test_the_plot_has_one_line_per_epoch_from_the_log_history(tmp_path):
    history = [
        {"loss": 1.0, "block_1_loss": 1.2, "epoch": 0.5},
        {"eval_loss": 1.0, "eval_block_1_accuracy": 0.3, "eval_block_2_accuracy": 0.4, "epoch": 1.0},
        {"eval_block_1_accuracy": 0.5, "eval_block_2_accuracy": 0.7, "epoch": 2.0},
        {"eval_block_1_accuracy": 0.5, "eval_block_2_accuracy": 0.7, "eval_block_x_accuracy": 1, "epoch": 2.0},
        {"heldout_block_1_accuracy": 0.9, "epoch": 2.0},
    ]
    assert block_accuracy_by_epoch(history) == {1.0: {1: 0.3, 2: 0.4}, 2.0: {1: 0.5, 2: 0.7}}
    assert block_accuracy_by_epoch(history, "heldout") == {2.0: {1: 0.9}}
    path = tmp_path / "block_accuracy.png"
    assert plot_block_accuracy(history, str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as image:
        assert image.size == (750, 420)
        colours = image.convert("RGB").getcolors(maxcolors=1 << 16)
        assert colours is not None and len(colours) > 10  # lines and text, not a blank canvas
    assert not plot_block_accuracy(history[:1], str(tmp_path / "none.png"))
    assert not (tmp_path / "none.png").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["block_accuracy.png"]  # no temporary file left behind


def _drawn(figure):
    """The renderer of ``figure`` drawn on an Agg canvas, where its parts have their final places."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    return canvas.get_renderer()


def test_the_plot_stays_readable_past_10_epochs(tmp_path):
    """15 epochs: 15 distinct colours in a sequential map, the epochs named outside the axes (a colour bar), a line
    at 1.0 drawn whole inside the axes, and a title naming the run. The colours used to repeat after 10 epochs, the
    legend covered the lines, a line at 1.0 was cut by the top of the axes, and there was no title."""
    from matplotlib import colormaps

    from hf_bpmod.block_metrics import block_accuracy_figure

    by_epoch = {float(e): {s: min(1.0, 0.3 + 0.05 * e + 0.01 * s) for s in (1, 2, 3)} for e in range(1, 16)}
    by_epoch[15.0] = {1: 1.0, 2: 1.0, 3: 1.0}
    figure = block_accuracy_figure(by_epoch, title="runs/shapes")
    axes = figure.axes[0]
    colours = [line.get_color() for line in axes.get_lines()]
    assert len(colours) == 15 and len({tuple(c) for c in colours}) == 15
    assert colours == [colormaps["viridis_r"](0.1 + 0.9 * (e - 1) / 14) for e in range(1, 16)]
    assert axes.get_ylim()[1] > 1.0 + 0.02  # room above 1.0 for the markers
    assert axes.get_title() == "Accuracy of each head by epoch: runs/shapes"
    assert axes.get_legend() is None and len(figure.axes) == 2  # the colour bar names the epochs
    renderer = _drawn(figure)
    bar = figure.axes[1].get_window_extent(renderer)
    assert bar.x0 >= axes.get_window_extent(renderer).x1  # outside the lines' axes
    assert [t.get_text() for t in figure.axes[1].get_yticklabels()] == ["1", "8", "15"]

    history = [{**{f"eval_block_{s}_accuracy": a for s, a in acc.items()}, "epoch": e} for e, acc in by_epoch.items()]
    path = tmp_path / "block_accuracy.png"
    assert plot_block_accuracy(history, str(path), title="runs/shapes")
    with Image.open(path) as image:
        pixels = image.convert("RGB")
        counts = dict((colour, n) for n, colour in pixels.getcolors(maxcolors=1 << 20))
    for colour in colours:  # every epoch's line is drawn in its own colour
        rgb = tuple(round(255 * c) for c in colour[:3])
        near = sum(n for c, n in counts.items() if max(abs(a - b) for a, b in zip(c, rgb)) <= 2)
        assert near >= 20, (rgb, near)


def test_a_few_epochs_are_named_in_a_legend_outside_the_axes():
    from hf_bpmod.block_metrics import block_accuracy_figure

    figure = block_accuracy_figure({1.0: {1: 0.5, 2: 1.0}, 2.0: {1: 0.6, 2: 1.0}})
    axes = figure.axes[0]
    legend = axes.get_legend()
    assert [t.get_text() for t in legend.get_texts()] == ["epoch 1", "epoch 2"]
    renderer = _drawn(figure)
    assert legend.get_window_extent(renderer).x0 >= axes.get_window_extent(renderer).x1
    assert axes.get_title() == "Accuracy of each head by epoch"
