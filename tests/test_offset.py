"""The offset: estimators against known covariances, scales against a numerical minimum, and the trainer's
application of eq. 5 (exactly once per optimizer step, BP gradient of the B' batch for a = 0, lambda = 1)."""

import dataclasses
import json
import logging
import math

import pytest
import torch
import torch.nn.functional as F
from helpers import max_param_diff
from transformers import TrainerCallback

from hf_bpmod import BPModifiedTrainer, BPModifiedTrainingArguments, OffsetStatistics, ScalingProblem, block_offset
from hf_bpmod.offset import BlockMoments
from hf_bpmod.offset_pass import OffsetSettings, compute_offsets, offset_sample
from hf_bpmod.testing import CLASS_WEIGHTS, SyntheticImages, micro_batch_fetch, tiny_vit, weighted_cross_entropy


def _gaussian_gradients(n_samples, dim, seed):
    """Per-sample g_h = A z + mu_h, g_T = B z + mu_T with z ~ N(0, I): C_h = AA^T, C_T = BB^T, Cov = AB^T."""
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(dim, dim, generator=g, dtype=torch.float64) / math.sqrt(dim)
    B = 0.6 * A + 0.8 * torch.randn(dim, dim, generator=g, dtype=torch.float64) / math.sqrt(dim)
    mu_h = torch.randn(dim, generator=g, dtype=torch.float64)
    mu_T = torch.randn(dim, generator=g, dtype=torch.float64)
    z = torch.randn(n_samples, dim, generator=g, dtype=torch.float64)
    exact = dict(tr_C_h=(A * A).sum().item(), tr_C_T=(B * B).sum().item(), tr_C_hT=2 * (A * B).sum().item())
    return z @ A.T + mu_h, z @ B.T + mu_T, mu_h, mu_T, exact


@pytest.mark.parametrize("micro_batch_size", [1, 8])
def test_trace_estimators_match_known_covariance(micro_batch_size):
    n_micro, dim = 4000, 6
    g_h, g_T, mu_h, mu_T, exact = _gaussian_gradients(n_micro * micro_batch_size, dim, seed=micro_batch_size)
    stats = OffsetStatistics([[torch.Size([dim])]])
    for i in range(n_micro):
        rows = slice(i * micro_batch_size, (i + 1) * micro_batch_size)
        stats.update([[g_h[rows].mean(0)]], [[g_T[rows].mean(0)]])
    m = stats.moments(0, micro_batch_size)
    # 4000 micro-batches: the trace estimators have a relative standard error of about 2.5%
    for key in ("tr_C_h", "tr_C_T", "tr_C_hT"):
        assert getattr(m, key) == pytest.approx(exact[key], rel=0.08), key
    # means over 4000 * b samples
    torch.testing.assert_close(m.mean_h[0], mu_h, atol=0.1, rtol=0)
    torch.testing.assert_close(m.mean_T[0], mu_T, atol=0.1, rtol=0)


def test_estimators_are_exact_sample_statistics():
    """With b' = 1 the estimators are the unbiased sample covariance traces, to rounding."""
    g_h, g_T, *_ = _gaussian_gradients(50, 4, seed=3)
    stats = OffsetStatistics([[torch.Size([4])]])
    for a, b in zip(g_h, g_T):
        stats.update([[a]], [[b]])
    m = stats.moments(0, 1)
    cov = torch.cov(torch.cat([g_h, g_T], 1).T)
    assert m.tr_C_h == pytest.approx(cov[:4, :4].trace().item(), rel=1e-10)
    assert m.tr_C_T == pytest.approx(cov[4:, 4:].trace().item(), rel=1e-10)
    assert m.tr_C_hT == pytest.approx(2 * cov[:4, 4:].trace().item(), rel=1e-10)


def _random_problem(seed):
    g = torch.Generator().manual_seed(seed)
    r = lambda: torch.rand((), generator=g).item()  # noqa: E731
    hh, TT = 0.1 + 3 * r(), 0.1 + 3 * r()
    hT = (2 * r() - 1) * math.sqrt(hh * TT)
    tr_h, tr_T = 10 * r(), 10 * r()
    tr_hT = 2 * (2 * r() - 1) * math.sqrt(tr_h * tr_T)
    return ScalingProblem(hh, TT, hT, tr_h, tr_T, tr_hT, batch_size=64, offset_batch_size=320, period=1 + 200 * r())


@pytest.mark.parametrize("seed", range(8))
def test_optimal_scales_minimise_the_objective(seed):
    problem = _random_problem(seed)
    a, lam = problem.solve_optimal()
    assert 0.0 <= lam <= 1.0
    best = problem.objective(a, lam)
    # dense grid, then the minimum must not beat the closed-form alternation
    grid = min(problem.objective(-4 + 8 * i / 800, j / 200) for i in range(801) for j in range(201))
    assert best <= grid + 1e-9
    # stationarity in a, and lambda is its closed form
    eps = 1e-6
    assert abs(problem.objective(a + eps, lam) - problem.objective(a - eps, lam)) / (2 * eps) < 1e-5 * max(1, best)
    assert lam == pytest.approx(problem.best_lambda(a))


def test_optimal_a_has_the_corrected_variance_term():
    """Eq. 19's a*_var lacks 1/2: with lambda = 1, g_h = g_T and no bias, a* must be the plain shrinkage."""
    p = ScalingProblem(hh=0, TT=0, hT=0, tr_C_h=2.0, tr_C_T=2.0, tr_C_hT=4.0, batch_size=64, offset_batch_size=320,
                       period=320)  # fmt: skip
    kappa = 1.0
    assert p.best_a(1.0) == pytest.approx(kappa / (1 / 64 + kappa))  # the paper's formula would give twice this


def test_identical_gradients_give_unit_scale_and_no_offset():
    # noiseless: the closed forms themselves give a = 1, lambda = 0
    p = ScalingProblem(hh=2.0, TT=2.0, hT=2.0, tr_C_h=0, tr_C_T=0, tr_C_hT=0, batch_size=64, offset_batch_size=320,
                       period=10)  # fmt: skip
    assert p.solve_optimal() == pytest.approx((1.0, 0.0))
    # noisy but identical per micro-batch: detected as exact, whatever the rule
    g_h, _, *_ = _gaussian_gradients(40, 5, seed=1)
    stats = OffsetStatistics([[torch.Size([5])]])
    for row in g_h:
        stats.update([[row]], [[row.clone()]])
    m = stats.moments(0, 1)
    assert m.is_exact()
    for rule in ("optimal", "aligned", "bias_only"):
        o = block_offset(m, rule, batch_size=64, period=10)
        assert o.scale == pytest.approx(1.0, abs=1e-6) or rule == "optimal"
    assert ScalingProblem.from_moments(m, 64, 10).bias(1.0) == pytest.approx(0.0, abs=1e-9)


def test_aligned_rule_keeps_the_local_step_size_and_prefers_the_true_direction():
    # local gradient 10x larger and orthogonal to the true one (the failure seen with fresh auxiliary heads)
    p = ScalingProblem(hh=100.0, TT=1.0, hT=0.0, tr_C_h=50.0, tr_C_T=5.0, tr_C_hT=0.0, batch_size=64,
                       offset_batch_size=320, period=125)  # fmt: skip
    a, lam, c = p.solve_aligned()
    assert a == 1.0 and lam > 0.5
    mean_sq = (1 - lam) ** 2 * p.hh + lam**2 * p.TT
    applied = c**2 * (mean_sq + p.tr_C_h / 64 + lam**2 * p.var(1.0))
    assert applied == pytest.approx(p.hh + p.tr_C_h / 64)
    assert p.expected_cosine(1.0, lam) > p.expected_cosine(1.0, 0.0)
    a_opt, lam_opt = p.solve_optimal()
    assert abs(a_opt) < 0.1  # the paper's rule shrinks the update to nearly nothing here


def test_offset_sample_is_reproducible_and_independent_of_global_rng():
    torch.manual_seed(0)
    first = offset_sample(100, 10, seed=3, period_index=2)
    torch.manual_seed(1)
    assert offset_sample(100, 10, seed=3, period_index=2) == first
    assert offset_sample(100, 10, seed=3, period_index=3) != first
    assert len(set(first)) == 10
    with pytest.raises(ValueError, match="Cannot draw 10 examples"):
        offset_sample(5, 10, seed=0, period_index=0)


class _GradCapture(TrainerCallback):
    def __init__(self, params):
        self.params, self.grads = params, []

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.grads.append([p.grad.detach().clone() for p in self.params])


def _trainer(tmp_path, data, compute_loss_func=None, **kw):
    kw.setdefault("bp_modified", True)  # the offset on the ViT: not its default
    args = BPModifiedTrainingArguments(
        output_dir=str(tmp_path), report_to="none", use_cpu=True, save_strategy="no", disable_tqdm=True,
        learning_rate=1e-3, max_grad_norm=0.0, seed=0, data_seed=0, **kw,
    )  # fmt: skip
    model = tiny_vit(num_layers=4)
    trainer = BPModifiedTrainer(model=model, args=args, train_dataset=data, compute_loss_func=compute_loss_func)
    capture = _GradCapture([p for ps in trainer.block_chain.block_params for p in ps])
    trainer.add_callback(capture)
    return trainer, capture


@pytest.mark.parametrize("loss", ["model", "label_smoothing", "compute_loss_func"])
def test_a0_lambda1_gives_the_bp_gradient_of_the_offset_batch(tmp_path, loss):
    """The offset's true gradient is that of the loss being trained: the model's, the label-smoothed one, or the
    user's ``compute_loss_func``."""
    data = SyntheticImages(64)
    kw = {
        "model": {},
        "label_smoothing": dict(label_smoothing_factor=0.2),
        "compute_loss_func": dict(compute_loss_func=weighted_cross_entropy),
    }[loss]
    trainer, capture = _trainer(
        tmp_path, data, max_steps=1, per_device_train_batch_size=16, offset_batch_size=32, offset_micro_batch_size=8,
        offset_period="1", offset_scaling="fixed", offset_fixed_a=0.0, offset_fixed_lambda=1.0, **kw,
    )  # fmt: skip
    reference = tiny_vit(num_layers=4)
    reference.train()
    idx = offset_sample(len(data), 32, seed=0, period_index=0)
    x = torch.stack([data[i]["pixel_values"] for i in idx])
    y = torch.stack([data[i]["labels"] for i in idx])
    logits = reference(pixel_values=x).logits
    if loss == "compute_loss_func":  # the pass averages micro-batch means: the weighted loss of each 8, averaged
        micro = [F.cross_entropy(lg, yy, weight=torch.tensor(CLASS_WEIGHTS), reduction="sum") / 8 for lg, yy in
                 zip(logits.split(8), y.split(8))]  # fmt: skip
        torch.stack(micro).mean().backward()
    else:
        F.cross_entropy(logits, y, label_smoothing=kw.get("label_smoothing_factor", 0.0)).backward()
    trainer.train()
    chain_params = trainer.block_chain.block_params
    names = {id(p): n for n, p in trainer.model.named_parameters()}
    ref_params = dict(reference.named_parameters())
    flat = [names[id(p)] for ps in chain_params for p in ps]
    last_block = {names[id(p)] for p in chain_params[-1]}
    for name, grad in zip(flat, capture.grads[0]):
        if name in last_block:  # the last block's gradient is exact: no offset, plain g_h
            continue
        torch.testing.assert_close(grad, ref_params[name].grad, rtol=1e-4, atol=1e-6)


def test_offset_enters_each_optimizer_step_once_under_accumulation(tmp_path):
    data = SyntheticImages(64)
    common = dict(max_steps=2, offset_batch_size=32, offset_period="1", offset_scaling="fixed", offset_fixed_a=1.0,
                  offset_fixed_lambda=1.0)  # fmt: skip
    t1, one = _trainer(tmp_path / "a", data, per_device_train_batch_size=32, gradient_accumulation_steps=1, **common)
    t1.train()
    t2, two = _trainer(tmp_path / "b", data, per_device_train_batch_size=16, gradient_accumulation_steps=2, **common)
    t2.train()
    assert len(one.grads) == len(two.grads) == 2
    for g1, g2 in zip(one.grads, two.grads):
        for a, b in zip(g1, g2):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    # and the offset is really there: one step with it differs from one step without by Delta, exactly once
    common["max_steps"] = 1
    t3, once = _trainer(tmp_path / "c", data, per_device_train_batch_size=16, gradient_accumulation_steps=2, **common)
    t3.train()
    t4, plain = _trainer(tmp_path / "d", data, per_device_train_batch_size=32, bp_modified=False, max_steps=1)
    t4.train()
    delta = [d for block in t3.offset.state.blocks for d in (block.offset or [])]
    assert len(delta) == sum(len(ps) for ps in t3.block_chain.block_params[:3])  # the last block has no offset
    for a, b, d in zip(once.grads[0], plain.grads[0], delta):
        torch.testing.assert_close(a - b, d.to(a.dtype), rtol=1e-3, atol=1e-6)


def test_refresh_logs_per_block_statistics(tmp_path):
    data = SyntheticImages(64)
    trainer, _ = _trainer(
        tmp_path, data, max_steps=4, per_device_train_batch_size=16, offset_batch_size=16, offset_period="2",
        logging_steps=1,
    )  # fmt: skip
    trainer.train()
    records = [json.loads(line) for line in open(tmp_path / "bpmod_offsets.jsonl")]
    assert [r["step"] for r in records] == [0, 2]
    assert len(records[0]["blocks"]) == 4 and records[0]["blocks"][3]["lam"] == 0.0  # exact last block
    for key in ("a", "lam", "bias", "var", "cosine", "offset_norm"):
        assert key in records[0]["blocks"][0]
    logged = [h for h in trainer.state.log_history if "offset/block_0/a" in h]
    assert len(logged) == 2 and "offset/seconds" in logged[0]


def test_offset_pass_leaves_buffers_rng_and_weights_untouched():
    from hf_bpmod import get_adapter
    from hf_bpmod.testing import tiny_resnet

    model = tiny_resnet()
    adapter = get_adapter(model)
    chain = adapter.chain(model, adapter.aux_heads(model, 1))
    data = SyntheticImages(32)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(7)
    expected_next = torch.rand(3)
    torch.manual_seed(7)
    fetch = micro_batch_fetch(data)

    offsets, record = compute_offsets(
        chain, list(range(16)), fetch, OffsetSettings(horizon=1, batch_size=8, micro_batch_size=4), period=5,
        preserve=[model],
    )  # fmt: skip
    torch.testing.assert_close(torch.rand(3), expected_next)
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert offsets is not None and not record["skipped"]
    micro = record["micro_batch_seconds"]  # one per micro-batch of b' = 4, inside the pass's own time
    assert len(micro) == 4 and all(m > 0 for m in micro) and sum(micro) <= record["seconds"]


@pytest.mark.parametrize("kind", ["vit_dropout", "resnet"])
def test_refreshes_with_zero_offsets_leave_training_bitwise_unchanged(tmp_path, kind):
    """The refresh is a measurement: a run that refreshes before every step but applies nothing (``a = 1``,
    ``lambda = 0``) ends with exactly the weights, BatchNorm statistics and auxiliary heads of the same local run
    without the offset. Dropout (ViT) and BatchNorm (ResNet) are where a pass over extra examples would leak."""
    from hf_bpmod.testing import tiny_resnet

    data = SyntheticImages(64)
    states = []
    for modified in (False, True):
        model = tiny_vit(num_layers=3) if kind == "vit_dropout" else tiny_resnet()
        for module in model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.2
        args = BPModifiedTrainingArguments(
            output_dir=str(tmp_path / str(modified)), report_to="none", use_cpu=True, save_strategy="no",
            disable_tqdm=True, learning_rate=1e-2, seed=0, data_seed=0, max_steps=4, per_device_train_batch_size=16,
            bp_modified=modified, offset_batch_size=16, offset_micro_batch_size=8, offset_period="1",
            offset_scaling="fixed", offset_fixed_a=1.0, offset_fixed_lambda=0.0,
        )  # fmt: skip
        trainer = BPModifiedTrainer(model=model, args=args, train_dataset=data)
        trainer.train()
        if modified:
            assert trainer.offset.state.period_index == 4  # it did refresh before every step
        states.append({**model.state_dict(), **{f"aux.{k}": v for k, v in trainer.aux_heads.state_dict().items()}})
    plain, refreshed = states
    assert plain.keys() == refreshed.keys()
    if kind == "resnet":
        assert any("running_mean" in k for k in plain)
    for key, value in plain.items():
        assert torch.equal(value, refreshed[key]), key


def test_non_finite_statistics_keep_the_previous_offset(tmp_path):
    data = SyntheticImages(64)
    trainer, _ = _trainer(tmp_path, data, max_steps=2, per_device_train_batch_size=16, offset_batch_size=16,
                          offset_period="1")  # fmt: skip
    trainer.train()
    previous = trainer.offset.state.blocks
    with torch.no_grad():
        next(trainer.aux_heads.parameters()).fill_(float("nan"))
    trainer._refresh_offset()
    assert trainer.offset.state.blocks is previous


def test_reliability_is_the_clamped_correlation():
    from hf_bpmod.offset import reliability

    prev = [torch.tensor([1.0, 2.0]), torch.tensor([[2.0]])]
    assert reliability(None, prev) == 0.0
    assert reliability(prev, [0.5 * p for p in prev]) == pytest.approx(1.0)  # same direction, any size
    assert reliability(prev, [3.0 * p for p in prev]) == pytest.approx(1.0)
    assert reliability(prev, [-p for p in prev]) == 0.0
    orthogonal = [torch.tensor([2.0, -1.0]), torch.tensor([[0.0]])]
    assert reliability(prev, orthogonal) == pytest.approx(0.0)
    # 60 degrees apart: cos = 1/2, whatever the lengths (the regression coefficient would be 1.5 here, clamped to 1)
    a, b = [torch.tensor([1.0, 0.0])], [torch.tensor([1.5, 1.5 * 3**0.5])]
    assert reliability(a, b) == pytest.approx(0.5)
    assert reliability([torch.zeros(2)], b) == 0.0


def _one_block_moments() -> BlockMoments:
    """Moments of one 4-parameter block from 50 micro-batches of 4 Gaussian per-sample gradients."""
    g_h, g_T, *_ = _gaussian_gradients(200, 4, seed=5)
    stats = OffsetStatistics([[torch.Size([4])]])
    for i in range(0, 200, 4):
        stats.update([[g_h[i : i + 4].mean(0)]], [[g_T[i : i + 4].mean(0)]])
    return stats.moments(0, 4)


def test_reliability_scales_lambda_and_keeps_the_step_size():
    m = _one_block_moments()
    free = block_offset(m, "aligned", batch_size=64, period=5)
    # a previous offset at 60 degrees to this one (in the plane of Delta and a vector orthogonal to it): cos = 1/2
    (d,) = free.delta
    ortho = torch.randn(d.shape, generator=torch.Generator().manual_seed(0), dtype=d.dtype)
    ortho -= (ortho @ d) / (d @ d) * d
    previous = [0.5 * d / d.norm() + (3**0.5 / 2) * ortho / ortho.norm()]
    half = block_offset(m, "aligned", batch_size=64, period=5, previous_delta=previous, check_reliability=True)
    assert half.reliability == pytest.approx(0.5)
    assert half.lam == pytest.approx(free.lam * 0.5)
    problem = ScalingProblem.from_moments(m, 64, 5)
    assert half.c == pytest.approx(problem.aligned_step_factor(half.lam))
    first = block_offset(m, "aligned", batch_size=64, period=5, check_reliability=True)
    assert first.lam == 0.0 and first.offset is None  # nothing to compare with: no offset in the first period


def _block(scale: float, weight: float, seed: int = 0):
    from hf_bpmod.offset import BlockOffset

    g = torch.Generator().manual_seed(seed)
    delta = [torch.randn(5, 3, generator=g), torch.randn(7, generator=g)]
    block = BlockOffset(scale=scale, weight=weight, delta=[d.clone() for d in delta], a=scale, lam=weight, c=1.0,
                        bias=0.0, var=0.0, cosine=0.0, offset_norm=0.0)  # fmt: skip
    return block, delta, [torch.randn(d.shape, generator=g) for d in delta]


@pytest.mark.parametrize(
    "scale, weight, one_pass",
    [(0.3, 0.4, True), (1.7, 0.4, True), (-0.5, 2.0, True), (1.0, 0.4, True), (1.0 - 1e-6, 0.4, False),
     (0.3, 0.0, True)],
)  # fmt: skip
def test_prepared_offset_is_applied_in_one_pass(monkeypatch, scale, weight, one_pass):
    """``prepare`` folds ``weight / (1 - scale)`` into the stored vector so that ``scale g + weight Delta`` is one
    ``lerp``; the result, ``Delta``, the offset and the loss-scaled path are those of the unprepared offset."""
    from hf_bpmod.offset import apply_offset

    block, delta, grads = _block(scale, weight)
    block.prepare()
    for d, d_ref in zip(block.unscaled_delta(), delta):
        torch.testing.assert_close(d, d_ref)
    if weight:
        for o, d_ref in zip(block.offset, delta):
            torch.testing.assert_close(o, weight * d_ref)
    expected = [(scale * g.double() + weight * d.double()).float() for g, d in zip(grads, delta)]
    passes = []
    for name in ("_foreach_mul_", "_foreach_add_", "_foreach_lerp_"):
        original = getattr(torch, name)
        monkeypatch.setattr(torch, name, lambda *a, _f=original, _n=name, **k: (passes.append(_n), _f(*a, **k)))
    applied = [g.clone() for g in grads]
    apply_offset(applied, block)
    assert (len(passes) == 1) == one_pass, passes
    for a, e in zip(applied, expected):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6)
    scaled = [1024.0 * g for g in grads]  # an fp16 loss scale: the two-pass path, same result
    apply_offset(scaled, block, grad_scale=1024.0)
    for a, e in zip(scaled, expected):
        torch.testing.assert_close(a / 1024.0, e, rtol=1e-5, atol=1e-6)


def test_prepared_offsets_survive_a_checkpoint():
    from hf_bpmod.offset import apply_offset
    from hf_bpmod.offset_pass import OffsetState

    block, delta, grads = _block(1.7, 0.4)
    block.prepare()
    assert block.delta_factor == pytest.approx(0.4 / (1 - 1.7))
    restored = OffsetState.from_state_dict(OffsetState(3, 9, [block]).state_dict()).blocks[0]
    old = {k: v for k, v in vars(_block(1.7, 0.4)[0]).items() if k != "delta_factor"}
    legacy = OffsetState.from_state_dict(  # a checkpoint written before offsets were prepared: Delta as it is
        {"period_index": 3, "next_refresh_step": 9, "blocks": [old]}
    ).blocks[0]
    for b in (restored, legacy):
        applied = [g.clone() for g in grads]
        apply_offset(applied, b)
        for a, g, d in zip(applied, grads, delta):
            torch.testing.assert_close(a, 1.7 * g + 0.4 * d, rtol=1e-5, atol=1e-6)


def test_prepared_offset_with_a_changed_scale_takes_the_two_pass_path():
    """A prepared offset copied with other constants (``dataclasses.replace``, as a research patch does) no longer
    matches its folded factor: it is applied in two passes with the new constants, also where ``scale`` became 1
    (``1 - scale = 0`` must not be divided by)."""
    import dataclasses

    from hf_bpmod.offset import apply_offset

    block, delta, grads = _block(0.3, 0.4)
    block.prepare()
    for scale, weight in ((1.0, 0.2), (0.5, 0.4)):
        changed = dataclasses.replace(block, scale=scale, weight=weight)
        assert changed.lerp_weight is None
        applied = [g.clone() for g in grads]
        apply_offset(applied, changed)
        for a, g, d in zip(applied, grads, delta):
            torch.testing.assert_close(a, scale * g + weight * d, rtol=1e-5, atol=1e-6)


def test_apply_block_offsets_on_a_chain_is_eq5_per_block():
    """On a real chain, every block's gradients become ``scale_t g + weight_t Delta_t`` with that block's own
    constants, prepared (one ``lerp`` pass) or not; an exact block (no offset) is only scaled; a parameter without a
    gradient gets the offset alone."""
    from hf_bpmod import get_adapter
    from hf_bpmod.offset import BlockOffset
    from hf_bpmod.offset_pass import apply_block_offsets
    from hf_bpmod.testing import tiny_resnet

    model = tiny_resnet(depths=(2, 2))
    adapter = get_adapter(model)
    chain = adapter.chain(model, adapter.aux_heads(model, 1))
    g = torch.Generator().manual_seed(3)
    constants = [(0.3, 0.4), (1.7, 0.2), (1.0, 0.5), (0.8, None)][: chain.num_blocks]
    assert len(constants) == chain.num_blocks
    for prepared in (False, True):
        offsets, deltas, grads = [], [], []
        for params, (scale, weight) in zip(chain.block_params, constants):
            delta = None if weight is None else [torch.randn(p.shape, generator=g) for p in params]
            stored = None if delta is None else [d.clone() for d in delta]
            block = BlockOffset(scale=scale, weight=weight or 0.0, delta=stored, a=scale, lam=weight or 0.0, c=1.0,
                                bias=0.0, var=0.0, cosine=0.0, offset_norm=0.0)  # fmt: skip
            if prepared:
                block.prepare()
            offsets.append(block)
            deltas.append(delta)
            grads.append([torch.randn(p.shape, generator=g) for p in params])
            for p, grad in zip(params, grads[-1]):
                p.grad = grad.clone()
        chain.block_params[0][0].grad = None
        grads[0][0] = torch.zeros_like(grads[0][0])
        apply_block_offsets(chain, offsets)
        for params, (scale, weight), delta, grad in zip(chain.block_params, constants, deltas, grads):
            for i, p in enumerate(params):
                expected = scale * grad[i] + (0.0 if delta is None else weight * delta[i])
                torch.testing.assert_close(p.grad, expected, rtol=1e-5, atol=1e-6)


def test_reliability_reads_the_unscaled_previous_offset():
    """A prepared offset with ``scale > 1`` stores ``-Delta``-like vectors; the next refresh's reliability must
    compare the true ``Delta``s (comparing the stored ones would flip the sign and clamp it to 0)."""
    from hf_bpmod import get_adapter
    from hf_bpmod.offset import BlockOffset

    model = tiny_vit(num_layers=3)
    adapter = get_adapter(model)
    chain = adapter.chain(model, adapter.aux_heads(model, 1))
    data = SyntheticImages(32)
    fetch = micro_batch_fetch(data)

    settings = OffsetSettings(
        horizon=1, batch_size=8, micro_batch_size=4, scaling="fixed", fixed_a=1.5, fixed_lambda=0.5
    )
    kw = dict(period=5, preserve=[model])
    first, _ = compute_offsets(chain, list(range(16)), fetch, settings, **kw)
    assert first[0].delta_factor == pytest.approx(-1.0)  # weight 0.5 / (1 - 1.5)
    raw = [BlockOffset(**{**vars(b), "delta": b.unscaled_delta(), "delta_factor": 1.0}) for b in first]
    settings = dataclasses.replace(settings, check_reliability=True)
    # the same sample again: the same Delta, reliability 1 (the stored vectors, at factor -1, would give 0)
    second, _ = compute_offsets(chain, list(range(16)), fetch, settings, previous=first, **kw)
    reference, _ = compute_offsets(chain, list(range(16)), fetch, settings, previous=raw, **kw)
    assert [b.reliability for b in second] == [b.reliability for b in reference]
    assert [b.reliability for b in second[:2]] == pytest.approx([1.0, 1.0])


def test_reliability_defaults_follow_the_scaling_rule(tmp_path):
    def args(**kw):
        return BPModifiedTrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True, **kw)

    assert args().offset_reliability is True  # aligned, the default rule
    assert args(offset_scaling="optimal").offset_reliability is False  # the paper's rule, faithfully
    assert args(offset_scaling="optimal", offset_reliability=True).offset_reliability is True


def test_norm_cap_bounds_the_offsets_share_of_the_gradient():
    m = _one_block_moments()
    free = block_offset(m, "aligned", batch_size=64, period=5)
    (d,) = free.delta
    share = free.lam * d.norm().item() / m.hh**0.5  # ||lam Delta|| / ||a m_h||, a = 1
    assert share > 0.1, "the test needs an offset that a cap can bind"
    capped = block_offset(m, "aligned", batch_size=64, period=5, max_ratio=share / 2)
    assert capped.capped and not free.capped
    assert capped.lam == pytest.approx(free.lam / 2)
    # the applied offset is exactly max_ratio times the scaled mean local gradient
    applied = capped.weight * d.norm().item() / (capped.scale * m.hh**0.5)
    assert applied == pytest.approx(share / 2)
    assert capped.c == pytest.approx(ScalingProblem.from_moments(m, 64, 5).aligned_step_factor(capped.lam))
    loose = block_offset(m, "aligned", batch_size=64, period=5, max_ratio=share * 2)
    assert not loose.capped and loose.lam == free.lam and loose.c == free.c
    # the paper's rule, when a user asks for a cap: |a| enters the bound
    optimal = block_offset(m, "optimal", batch_size=64, period=5, max_ratio=1e-3)
    assert optimal.lam * optimal.delta[0].norm().item() <= 1e-3 * abs(optimal.a) * m.hh**0.5 * (1 + 1e-9)


def test_norm_cap_defaults_and_validation(tmp_path):
    def args(**kw):
        return BPModifiedTrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True, **kw)

    assert args().offset_max_ratio == 0.1  # aligned, the default rule
    assert args(offset_scaling="optimal").offset_max_ratio == float("inf")  # the paper's rule as written
    assert args(offset_scaling="fixed", offset_max_ratio=0.5).offset_max_ratio == 0.5
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="offset_max_ratio"):
            args(offset_max_ratio=bad)
    from transformers import HfArgumentParser

    (cli,) = HfArgumentParser(BPModifiedTrainingArguments).parse_args_into_dataclasses(
        ["--output_dir", str(tmp_path), "--report_to", "none", "--use_cpu", "--offset_max_ratio", "inf"]
    )
    assert cli.offset_max_ratio == float("inf")  # the command line's way to turn the cap off


@pytest.mark.parametrize("a, lam", [(1.0, 0.0), (1.0, 0.3), (0.7, 0.8), (1.3, 1.0)])
def test_expected_cosine_matches_the_applied_gradient_built_from_vectors(a, lam):
    """The ``aligned`` rule's objective, against the applied gradient built coordinate by coordinate: its mean
    ``a (1 - lam) m_h + lam m_T`` and its noise ``a^2 tr C_h / B + lam^2 (K / B') tr Cov(g_T - a g_h)``, with the
    covariances taken from explicit per-sample gradients (float64)."""
    g = torch.Generator().manual_seed(3)
    n, d, batch, sample, period = 40, 7, 16, 320, 25
    per_sample_h = torch.randn(n, d, generator=g, dtype=torch.float64) + 0.5
    per_sample_T = 0.6 * per_sample_h + torch.randn(n, d, generator=g, dtype=torch.float64) + 0.2
    m_h, m_T = per_sample_h.mean(0), per_sample_T.mean(0)

    def trace_cov(x: torch.Tensor) -> float:
        return float(((x - x.mean(0)) ** 2).sum() / (len(x) - 1))

    problem = ScalingProblem(
        hh=float(m_h @ m_h), TT=float(m_T @ m_T), hT=float(m_h @ m_T),
        tr_C_h=trace_cov(per_sample_h), tr_C_T=trace_cov(per_sample_T),
        tr_C_hT=trace_cov(per_sample_h + per_sample_T) - trace_cov(per_sample_h) - trace_cov(per_sample_T),
        batch_size=batch, offset_batch_size=sample, period=period,
    )  # fmt: skip
    mean = a * (1 - lam) * m_h + lam * m_T
    noise = a * a * trace_cov(per_sample_h) / batch + lam * lam * period / sample * trace_cov(
        per_sample_T - a * per_sample_h
    )
    want = float(mean @ m_T) / math.sqrt((float(mean @ mean) + noise) * float(m_T @ m_T))
    assert problem.expected_cosine(a, lam) == pytest.approx(want, rel=1e-12)


def test_bias_only_keeps_the_local_gradient_where_its_mean_is_zero():
    """``a*_bias = m_h.m_T / ||m_h||^2`` (eq. 19) is undefined at ``m_h = 0``; the rule then keeps ``a = 1`` rather
    than zeroing the block's gradient."""
    problem = ScalingProblem(0.0, 2.0, 0.0, 1.0, 1.0, 0.5, batch_size=16, offset_batch_size=320, period=25)
    assert problem.bias_only_a() == 1.0
    assert ScalingProblem(4.0, 2.0, 1.0, 1.0, 1.0, 0.5, 16, 320, 25).bias_only_a() == 0.25


def test_a_block_whose_local_gradient_is_the_true_one_up_to_rounding_is_exact():
    """``is_exact``: ``E||m^h_i - m^T_i||^2`` is zero up to rounding relative to ``||m_h||^2 + ||m_T||^2``; such a block
    gets no offset. A gap of one part in 1e4 is not rounding."""
    g = torch.Generator().manual_seed(0)
    local = [[torch.randn(5, generator=g, dtype=torch.float64)] for _ in range(4)]

    def moments(scale: float) -> BlockMoments:
        stats = OffsetStatistics([[torch.Size([5])]], device="cpu")
        for m in local:
            stats.update([[m[0]]], [[m[0] * scale]])
        return stats.moments(0, micro_batch_size=8)

    assert moments(1.0 + 1e-15).is_exact()
    assert not moments(1.0 + 1e-4).is_exact()


# ---------------------------------------------------------------------------------------------- B' from the data
@pytest.mark.parametrize(
    "period_examples, dataset_size, micro, expected",
    [
        (64, 64, 8, 16),  # 1% of a period is under one micro-batch: two micro-batches
        (8000, 8000, 8, 80),  # make train's epoch: 1%
        (8000, 8000, 7, 77),  # in whole micro-batches
        (32000, 50000, 8, 320),  # the paper's 320 from K B = 32,000 on
        (50000, 50000, 8, 320),  # and no more
        (8000, 20, 8, 16),  # at most the training set, in whole micro-batches
        (100000, 100, 8, 96),
        (8000, 8000, 200, 400),  # two micro-batches even where that is more than 320
    ],
)
def test_the_default_offset_batch_is_one_percent_of_a_period_in_whole_micro_batches(
    period_examples, dataset_size, micro, expected
):
    from hf_bpmod.offset_controller import default_sample_size

    assert default_sample_size(period_examples, dataset_size, micro) == expected


@pytest.mark.parametrize(
    "sample_size, device_batch, on_cpu, expected",
    [
        (80, 64, True, 40),  # make train on the CPU: two micro-batches
        (80, 64, False, 8),  # on an accelerator the paper's 8: the pass's memory
        (320, 64, True, 64),  # at most a training batch
        (320, 16, True, 16),
        (16, 8, True, 8),
        (14, 64, True, 7),
        (12, 64, False, 6),  # a divisor of B' at most 8
    ],
)
def test_the_default_micro_batch_divides_b_prime_in_the_fewest_parts_the_device_allows(
    sample_size, device_batch, on_cpu, expected
):
    from hf_bpmod.offset_controller import default_micro_batch_size

    assert default_micro_batch_size(sample_size, device_batch, on_cpu) == expected


class _Sized(torch.utils.data.Dataset):
    """``n`` examples that repeat 64 synthetic images: only the size matters to the choice of B'."""

    def __init__(self, n):
        self.n, self.data = n, SyntheticImages(64)

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return self.data[i % 64]


def test_a_resnet_on_64_images_trains_with_the_offset_and_a_b_prime_chosen_from_the_data(tmp_path, caplog):
    """``offset_batch_size`` unset: B' follows the data (1% of K B, at least two micro-batches), is logged with the
    reason, and the first refresh says it holds step 0 back. It used to be 320, refused for any set under 320."""
    from hf_bpmod.testing import tiny_resnet

    model = tiny_resnet(depths=(2, 2))
    args = BPModifiedTrainingArguments(
        output_dir=str(tmp_path), report_to="none", use_cpu=True, save_strategy="no", disable_tqdm=True,
        per_device_train_batch_size=16, num_train_epochs=2, seed=0, logging_steps=1, learning_rate=1e-3,
    )  # fmt: skip
    assert args.offset_batch_size is None and args.offset_settings().sample_size is None
    with caplog.at_level(logging.INFO, logger="hf_bpmod"):
        trainer = BPModifiedTrainer(model=model, args=args, train_dataset=SyntheticImages(64))
        assert trainer.uses_offset and trainer.offset.settings.sample_size == 16
        trainer.train()
    records = [json.loads(line) for line in open(tmp_path / "bpmod_offsets.jsonl")]
    assert [(r["step"], r["offset_batch_size"]) for r in records] == [(0, 16), (4, 16)]  # K = 4 steps of 16
    assert max_param_diff(model, tiny_resnet(depths=(2, 2))) > 1e-3
    chosen = [r.getMessage() for r in caplog.records if "`offset_batch_size` unset" in r.getMessage()]
    assert chosen == [
        "`offset_batch_size` unset: the BP offset draws 16 examples per refresh, at least two micro-batches of 8, "
        "more than 1% of the 64 examples of a refresh period (K steps x batch B); in 2 micro-batches of 8 (on the "
        "CPU a micro-batch costs about a training step whatever its size: the fewest, at least two, of at most "
        "`per_device_train_batch_size` (16)). Set `offset_batch_size` and `offset_micro_batch_size` to choose others."
    ]  # once, although every refresh checks the training set
    assert "Refreshing the BP offset on 16 examples in 2 micro-batches before step 0" in caplog.text
    trainer.create_model_card()
    card = (tmp_path / "README.md").read_text()
    assert "- offset_batch_size: 16\n- offset_micro_batch_size: 8\n" in card  # the B' and b' used


def test_the_papers_320_comes_back_from_32000_examples_a_period_and_an_explicit_b_prime_is_kept(tmp_path):
    from hf_bpmod.testing import tiny_resnet

    def chosen(n, **kw):
        args = BPModifiedTrainingArguments(
            output_dir=str(tmp_path), report_to="none", use_cpu=True, per_device_train_batch_size=64, **kw
        )
        settings = BPModifiedTrainer(model=tiny_resnet(), args=args, train_dataset=_Sized(n)).offset.settings
        return settings.sample_size, settings.micro_batch_size

    assert chosen(32000) == (320, 64)  # K = 500 steps of 64; on the CPU in micro-batches of a training batch
    assert chosen(50000) == (320, 64)
    assert chosen(16000) == (160, 40)
    assert chosen(32000, offset_period="100") == (64, 32)  # K B = 6,400
    assert chosen(32000, gradient_accumulation_steps=2, offset_period="250") == (320, 64)  # B = 128
    assert chosen(32000, offset_micro_batch_size=6) == (318, 6)  # 53 micro-batches of 6
    assert chosen(100, offset_batch_size=48) == (48, 8)  # given: kept, with the paper's b'
    assert chosen(100, offset_batch_size=48, offset_micro_batch_size=24) == (48, 24)
    assert chosen(12) == (12, 6)  # two micro-batches of 6, the paper's 8 being too many
    with pytest.raises(ValueError, match=r"`offset_batch_size` \(320\) is larger than the training set \(100 "
                       r"examples\); lower it \(e\.g\. `offset_batch_size=16`, the value chosen from the data"):  # fmt: skip
        chosen(100, offset_batch_size=320)
    with pytest.raises(ValueError, match=r"The training set \(12 examples\) cannot hold the two micro-batches of "
                       r"`offset_micro_batch_size` \(8\) .*e\.g\. `offset_micro_batch_size=6`\) or set `bp_modified=False`"):  # fmt: skip
        chosen(12, offset_micro_batch_size=8)
    with pytest.raises(ValueError, match=r"The training set \(1 examples\) cannot hold the two micro-batches of "
                       r"`offset_micro_batch_size` \(1\) .*; set `bp_modified=False`"):  # fmt: skip
        chosen(1)
