"""The BP-modified offset: micro-batch statistics (§4 of the method) and the per-block scales (eq. 16-19, §5).

For block ``t`` the applied gradient is (eq. 5)

    g^_t = a_t g_{h,t}(batch) + lambda_t Delta_t,   Delta_t = mean(g~_{T,t}) - a_t mean(g~_{h,t}),

with the means taken over an independent sample of ``B'`` examples. It is stored as ``g^_t = scale_t g_{h,t} +
offset_t``, which also covers the step-size-preserving ``aligned`` rule (``scale_t = c a_t``,
``offset_t = c lambda_t Delta_t``). Everything here is pure torch and knows nothing of the Trainer.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields

import torch

Vector = list[torch.Tensor]  # one tensor per trainable parameter of a block


def _dot(a: Vector, b: Vector) -> float:
    return float(sum((x.double() * y.double()).sum() for x, y in zip(a, b)))


def _flat(vector: Vector) -> torch.Tensor:
    """One block's tensors as one float64 vector."""
    return torch.cat([g.reshape(-1) for g in vector]).double()


def _views(flat: torch.Tensor, shapes: Sequence[torch.Size]) -> Vector:
    """``flat`` cut into tensors of ``shapes`` (views, no copy)."""
    return [v.view(s) for v, s in zip(flat.split([math.prod(s) for s in shapes]), shapes)]


class OffsetStatistics:
    """Running sums over ``n`` micro-batch mean gradients ``m_i`` of every block (§4 of the method).

    Per block it keeps ``S_h = sum m_i^h``, ``S_T = sum m_i^T`` (``O(#params)`` memory, float64) and the scalars
    ``Q_h = sum ||m_i^h||^2``, ``Q_T = sum ||m_i^T||^2``, ``Q_hT = sum m_i^h . m_i^T``. Each block's sums are one
    flat vector (``flat_h[t]``, ``flat_T[t]``; :meth:`moments` cuts the means back into the parameters' shapes), so
    a micro-batch costs a few vector operations per block, the scalars stay on the device (no synchronisation per
    micro-batch), and an all-reduce sends one tensor per block and sum.
    """

    def __init__(self, shapes: Sequence[Sequence[torch.Size]], device: torch.device | str = "cpu") -> None:
        self.shapes = [list(block) for block in shapes]
        sizes = [sum(math.prod(s) for s in block) for block in self.shapes]
        self.flat_h = [torch.zeros(n, dtype=torch.float64, device=device) for n in sizes]
        self.flat_T = [torch.zeros(n, dtype=torch.float64, device=device) for n in sizes]
        self.squares = torch.zeros(len(shapes), 3, dtype=torch.float64, device=device)  # Q_h, Q_T, Q_hT
        self.count = torch.zeros((), dtype=torch.float64, device=device)

    @property
    def num_blocks(self) -> int:
        return len(self.flat_h)

    def update(self, local: Sequence[Vector], true: Sequence[Vector]) -> None:
        """Add one micro-batch: ``local[t]`` = ``m^h`` and ``true[t]`` = ``m^T`` of block ``t``."""
        for t, (m_h, m_T) in enumerate(zip(local, true)):
            if not m_h:
                continue
            h, T = _flat(m_h), _flat(m_T)
            self.flat_h[t].add_(h)
            self.flat_T[t].add_(T)
            self.squares[t] += torch.stack((h @ h, T @ T, h @ T))
        self.count += 1

    def tensors(self) -> list[torch.Tensor]:
        """Every running sum, for an all-reduce (sum) across processes."""
        return [*self.flat_h, *self.flat_T, self.squares, self.count]

    def all_reduce(self, reduce_sum: Callable[[torch.Tensor], None]) -> None:
        """Sum the statistics over processes in place (``reduce_sum`` e.g. ``torch.distributed.all_reduce``)."""
        for tensor in self.tensors():
            reduce_sum(tensor)

    def moments(self, t: int, micro_batch_size: int) -> BlockMoments:
        """Means and trace covariances of block ``t`` (§4 of the method).

        ``tr C ~= b' (Q - n ||mean||^2) / (n - 1)`` since a micro-batch mean of ``b'`` samples has covariance
        ``C / b'``; ``tr C_{h,T} = 2 b' (sum m^h.m^T - n mean_h.mean_T) / (n - 1)`` with the paper's
        ``C_{h,T} = Cov(g_h, g_T) + Cov(g_T, g_h)``.
        """
        n = float(self.count)
        if n < 2:
            raise ValueError(f"Offset statistics need at least 2 micro-batches, got {n:g}.")
        flat_h, flat_T = self.flat_h[t] / n, self.flat_T[t] / n
        hh, TT, hT = (float(v) for v in torch.stack((flat_h @ flat_h, flat_T @ flat_T, flat_h @ flat_T)))
        mean_h, mean_T = _views(flat_h, self.shapes[t]), _views(flat_T, self.shapes[t])
        q_h, q_T, q_hT = (float(v) for v in self.squares[t])
        b = micro_batch_size
        return BlockMoments(
            n=n,
            sample_size=n * b,
            mean_h=mean_h,
            mean_T=mean_T,
            hh=hh,
            TT=TT,
            hT=hT,
            tr_C_h=max(b * (q_h - n * hh) / (n - 1), 0.0),
            tr_C_T=max(b * (q_T - n * TT) / (n - 1), 0.0),
            tr_C_hT=2 * b * (q_hT - n * hT) / (n - 1),
        )


@dataclass
class BlockMoments:
    """The statistics of one block that eq. 16-19 need: means ``m_h, m_T`` and their products, and traces."""

    n: float
    sample_size: float  # B' actually seen: n * b'
    mean_h: Vector
    mean_T: Vector
    hh: float  # ||m_h||^2
    TT: float  # ||m_T||^2
    hT: float  # m_h . m_T
    tr_C_h: float
    tr_C_T: float
    tr_C_hT: float

    def is_exact(self, rtol: float = 1e-10) -> bool:
        """True when every micro-batch had ``m^h == m^T`` (the local gradient already is the true one)."""
        diff = self.hh + self.TT - 2 * self.hT + (self.tr_C_h + self.tr_C_T - self.tr_C_hT) / max(self.n, 1)
        return abs(diff) <= rtol * max(self.hh + self.TT, 1e-300)


@dataclass
class ScalingProblem:
    """The objective of eq. 16 with Appendix C's K factor (§5 of the method), for one block:

    ``E(a, lam) = (1-lam)^2 ||a m_h - m_T||^2 + (a^2/B) tr C_h + lam^2 (K/B') (a^2 tr C_h + tr C_T - a tr C_hT)``
    """

    hh: float
    TT: float
    hT: float
    tr_C_h: float
    tr_C_T: float
    tr_C_hT: float
    batch_size: float  # B, effective training batch
    offset_batch_size: float  # B'
    period: float  # K, optimizer steps per refresh
    bias_correction: bool = False

    @classmethod
    def from_moments(cls, m: BlockMoments, batch_size: float, period: float, bias_correction: bool = False):
        return cls(m.hh, m.TT, m.hT, m.tr_C_h, m.tr_C_T, m.tr_C_hT, batch_size, m.sample_size, period, bias_correction)

    @property
    def kappa(self) -> float:
        """``K / B'``: the variance factor of an offset reused for ``K`` steps."""
        return self.period / self.offset_batch_size

    def offset_variance(self, a: float) -> float:
        """``tr Cov(g_T - a g_h) = a^2 tr C_h + tr C_T - a tr C_hT`` (per sample)."""
        return max(a * a * self.tr_C_h + self.tr_C_T - a * self.tr_C_hT, 0.0)

    def bias(self, a: float) -> float:
        """``||a m_h - m_T||^2``; with ``bias_correction`` less the sampling noise of the ``B'`` means."""
        raw = a * a * self.hh - 2 * a * self.hT + self.TT
        if self.bias_correction:
            raw -= self.offset_variance(a) / self.offset_batch_size
        return max(raw, 0.0)

    def var(self, a: float) -> float:
        """``Var = (K/B') (a^2 tr C_h + tr C_T - a tr C_hT)`` of eq. 18 with the K factor."""
        return self.kappa * self.offset_variance(a)

    def objective(self, a: float, lam: float) -> float:
        """``E(a, lambda)``."""
        return (1 - lam) ** 2 * self.bias(a) + a * a * self.tr_C_h / self.batch_size + lam * lam * self.var(a)

    def best_lambda(self, a: float) -> float:
        """``lambda* = Bias / (Bias + Var)`` (eq. 18), clamped to [0, 1]."""
        bias, var = self.bias(a), self.var(a)
        if bias + var <= 0:
            return 0.0
        return min(max(bias / (bias + var), 0.0), 1.0)

    def best_a(self, lam: float) -> float:
        """``a*`` of eq. 17 derived from the objective (with the 1/2 that eq. 19's ``a*_var`` lacks):

        ``a* = [(1-lam)^2 m_h.m_T + lam^2 (K/B') tr C_hT / 2] / [(1-lam)^2 ||m_h||^2 + (1/B + lam^2 K/B') tr C_h]``
        """
        w = (1 - lam) ** 2
        den = w * self.hh + (1 / self.batch_size + lam * lam * self.kappa) * self.tr_C_h
        if self.bias_correction:
            den -= w * self.tr_C_h / self.offset_batch_size
        num = w * self.hT + lam * lam * self.kappa * self.tr_C_hT / 2
        if self.bias_correction:
            num -= w * self.tr_C_hT / (2 * self.offset_batch_size)
        if den <= 0:
            return 1.0
        return num / den

    def bias_only_a(self) -> float:
        """``a*_bias = m_h.m_T / ||m_h||^2`` (eq. 19), the paper's Table-3 choice with ``lambda = 0``."""
        return self.hT / self.hh if self.hh > 0 else 1.0

    def solve_optimal(self, max_iter: int = 100, tol: float = 1e-12) -> tuple[float, float]:
        """Alternate the two closed forms until ``(a, lambda)`` settles (Remark 4.2); ``E`` is convex in each."""
        a, lam = 1.0, self.best_lambda(1.0)
        for _ in range(max_iter):
            a_new = self.best_a(lam)
            lam_new = self.best_lambda(a_new)
            done = abs(a_new - a) <= tol * max(1.0, abs(a)) and abs(lam_new - lam) <= tol
            a, lam = a_new, lam_new
            if done:
                break
        return a, lam

    def expected_cosine(self, a: float, lam: float) -> float:
        """Cosine of the applied gradient's mean with ``m_T``, its norm inflated by the noise of eq. 16."""
        mean_dot_T = a * (1 - lam) * self.hT + lam * self.TT
        mean_sq = (a * (1 - lam)) ** 2 * self.hh + 2 * a * (1 - lam) * lam * self.hT + lam * lam * self.TT
        noise = a * a * self.tr_C_h / self.batch_size + lam * lam * self.var(a)
        denom = math.sqrt(max(mean_sq + noise, 1e-300) * max(self.TT, 1e-300))
        return mean_dot_T / denom

    def solve_aligned(self, grid: int = 201) -> tuple[float, float, float]:
        """The ``aligned`` rule: ``a = 1``, ``lambda`` in [0, 1] maximising :meth:`expected_cosine`, then a factor
        ``c`` that gives the applied gradient the local gradient's expected size ``||m_h||^2 + tr C_h / B``.

        Returns ``(a, lambda, c)``.
        """
        lams = [i / (grid - 1) for i in range(grid)]
        lam = max(lams, key=lambda v: (self.expected_cosine(1.0, v), -v))
        return 1.0, lam, self.aligned_step_factor(lam)

    def aligned_step_factor(self, lam: float) -> float:
        """``c`` with ``E||c (g_h + lam Delta)||^2 = E||g_h||^2`` (``a = 1``): the local gradient's step size."""
        mean_sq = (1 - lam) ** 2 * self.hh + 2 * (1 - lam) * lam * self.hT + lam * lam * self.TT
        applied = mean_sq + self.tr_C_h / self.batch_size + lam * lam * self.var(1.0)
        local = self.hh + self.tr_C_h / self.batch_size
        return math.sqrt(local / applied) if applied > 0 else 1.0


@dataclass
class BlockOffset:
    """The modification of block ``t`` for one period: ``g^_t = scale * g_{h,t} + weight * Delta``.

    ``Delta = m_T - a m_h`` is eq. 5's offset before scaling; ``weight = c * lambda``. ``delta`` holds
    ``delta_factor * Delta``: ``delta_factor`` is 1 until :meth:`prepare` folds the step's constants into the stored
    vector (in place, so that a step applies the offset in one pass over the gradients); :meth:`unscaled_delta`
    gives ``Delta`` back.
    """

    scale: float
    weight: float
    delta: Vector | None  # None: exact block, no offset
    a: float
    lam: float
    c: float
    bias: float
    var: float
    cosine: float
    offset_norm: float
    reliability: float = 1.0
    capped: bool = False  # lambda was lowered by the norm cap (``max_ratio`` of :func:`block_offset`)
    delta_factor: float = 1.0

    @property
    def offset(self) -> Vector | None:
        """``weight * Delta``, the vector added to the gradient (``None`` when there is none)."""
        if self.delta is None or self.weight == 0.0:
            return None
        return [(self.weight / self.delta_factor) * d for d in self.delta]

    def unscaled_delta(self) -> Vector | None:
        """``Delta`` itself (a new tensor when :meth:`prepare` scaled the stored vector)."""
        if self.delta is None or self.delta_factor == 1.0:
            return self.delta
        return [d / self.delta_factor for d in self.delta]

    @property
    def lerp_weight(self) -> float | None:
        """``1 - scale`` when :meth:`prepare` made ``delta`` the end point ``weight Delta / (1 - scale)`` of
        ``g <- g + (1 - scale)(end - g) = scale g + weight Delta`` (one ``lerp``); ``None`` otherwise."""
        if self.delta is None or self.weight == 0.0 or self.delta_factor == 1.0:
            return None
        w = 1.0 - self.scale
        return w if w != 0.0 and self.delta_factor == self.weight / w else None

    def prepare(self, min_lerp_weight: float = 1e-4) -> None:
        """Store ``delta`` as the ``lerp`` end point ``weight Delta / (1 - scale)`` (in place, once per period),
        so that :func:`apply_offset` costs one pass over the gradients where ``scale * g + weight * Delta`` costs
        two (a multiply, then an add). Left as it is when there is nothing to combine (``scale == 1`` or
        ``weight == 0``), when ``|1 - scale| < min_lerp_weight`` would blow the stored vector up, and in float16,
        whose range the scaled vector could leave."""
        if self.delta is None or self.weight == 0.0 or self.delta_factor != 1.0:
            return
        if any(d.dtype == torch.float16 for d in self.delta):
            return
        w = 1.0 - self.scale
        if abs(w) < min_lerp_weight:
            return
        factor = self.weight / w
        if not math.isfinite(factor):
            return
        torch._foreach_mul_(self.delta, factor)
        self.delta_factor = factor

    def log_record(self) -> dict[str, float]:
        """The scalars of this block's refresh, for the logs (not ``delta``, nor ``delta_factor``, a storage
        detail). Read field by field: ``dataclasses.asdict`` would deep-copy the offset tensors first."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("delta", "delta_factor")}


def reliability(previous: Vector | None, current: Vector) -> float:
    """How much of last period's offset still holds: the correlation ``<Delta_prev, Delta_now> / (||Delta_prev||
    ||Delta_now||)``, clamped to [0, 1].

    Measured at the refresh that ends a period. An offset that no longer predicts the gap between true and local
    gradient after ``K`` steps (correlation near 0) would only add a stale constant to every step of the next
    period. It is the regression coefficient of the new offset on the old one when the gap keeps its size; unlike
    that coefficient it does not grow when ``||Delta||`` grows. No previous offset gives 0.
    """
    if previous is None:
        return 0.0
    norms = _dot(previous, previous) * _dot(current, current)
    if norms <= 0:
        return 0.0
    return min(max(_dot(previous, current) / math.sqrt(norms), 0.0), 1.0)


def block_offset(
    moments: BlockMoments,
    scaling: str,
    *,
    batch_size: float,
    period: float,
    fixed_a: float = 1.0,
    fixed_lambda: float = 0.5,
    bias_correction: bool = False,
    previous_delta: Vector | None = None,
    check_reliability: bool = False,
    max_ratio: float | None = None,
) -> BlockOffset:
    """``a``, ``lambda`` and ``Delta = m_T - a m_h`` (eq. 5) of one block under a scaling rule.

    ``scaling``: ``"optimal"`` (eq. 16-19 with the K factor, alternated), ``"bias_only"`` (``lambda = 0``,
    ``a = a*_bias``), ``"fixed"`` (given ``a``, ``lambda``) or ``"aligned"`` (:meth:`ScalingProblem.solve_aligned`).
    With ``check_reliability``, ``lambda`` is multiplied by :func:`reliability` of ``previous_delta``.
    With ``max_ratio``, ``lambda`` is then lowered where needed so that the offset is at most that fraction of the
    scaled mean local gradient, ``lambda ||Delta|| <= max_ratio |a| ||m_h||`` (:func:`capped_lambda`).
    """
    problem = ScalingProblem.from_moments(moments, batch_size, period, bias_correction)
    c = 1.0
    if scaling == "optimal":
        a, lam = problem.solve_optimal()
    elif scaling == "bias_only":
        a, lam = problem.bias_only_a(), 0.0
    elif scaling == "fixed":
        a, lam = fixed_a, fixed_lambda
    elif scaling == "aligned":
        a, lam, c = problem.solve_aligned()
    else:
        raise ValueError(f"Unknown offset scaling {scaling!r}.")
    delta = [m_T - a * m_h for m_h, m_T in zip(moments.mean_h, moments.mean_T)]
    rho = reliability(previous_delta, delta) if check_reliability else 1.0
    delta_sq = _dot(delta, delta)
    lam_rule = lam * rho
    lam = lam_rule if max_ratio is None else capped_lambda(lam_rule, a, moments.hh, delta_sq, max_ratio)
    if scaling == "aligned" and (rho != 1.0 or lam != lam_rule):
        c = problem.aligned_step_factor(lam)
    cosine = moments.hT / math.sqrt(moments.hh * moments.TT) if moments.hh > 0 and moments.TT > 0 else 0.0
    return BlockOffset(
        scale=c * a,
        weight=c * lam,
        delta=delta,
        a=a,
        lam=lam,
        c=c,
        bias=problem.bias(a),
        var=problem.var(a),
        cosine=cosine,
        offset_norm=abs(c * lam) * math.sqrt(delta_sq),
        reliability=rho,
        capped=lam < lam_rule,
    )


def capped_lambda(lam: float, a: float, hh: float, delta_sq: float, max_ratio: float) -> float:
    """The largest ``lambda' <= lambda`` with ``lambda' ||Delta|| <= max_ratio |a| ||m_h||``.

    A bound on the offset's share of the applied gradient ``c (a g_h + lambda Delta)``, whatever ``c``. Under an
    adaptive optimizer a constant vector that dominates a block's gradient for a whole period becomes a full-size
    step in every coordinate.
    """
    if lam <= 0.0 or delta_sq <= 0.0:
        return lam
    limit = max_ratio * abs(a) * math.sqrt(max(hh, 0.0)) / math.sqrt(delta_sq)
    return min(lam, limit)


def exact_block_offset() -> BlockOffset:
    """The identity modification of a block whose local gradient is already exact (``t + h >= T``)."""
    return BlockOffset(
        scale=1.0, weight=0.0, delta=None, a=1.0, lam=0.0, c=1.0, bias=0.0, var=0.0, cosine=1.0, offset_norm=0.0
    )


def apply_offset(grads: Sequence[torch.Tensor | None], modification: BlockOffset, grad_scale: float = 1.0) -> None:
    """``g <- scale * g + weight * Delta * grad_scale`` in place (eq. 5); ``grad_scale`` is the fp16 loss scale,
    since ``grads`` are scaled gradients and the offset is not. A missing gradient is skipped.

    One fused (``torch._foreach_*``) operation per block, not one per parameter. With a prepared offset
    (:meth:`BlockOffset.prepare`) and no loss scale it is a single ``lerp`` pass over the gradients; otherwise a
    multiply and an add."""
    present = [i for i, g in enumerate(grads) if g is not None]
    if not present:
        return
    targets = [grads[i] for i in present]
    if modification.delta is None or modification.weight == 0.0:
        if modification.scale != 1.0:
            torch._foreach_mul_(targets, modification.scale)
        return
    ends = [modification.delta[i].to(device=g.device, dtype=g.dtype) for i, g in zip(present, targets)]
    w = modification.lerp_weight
    if w is not None and grad_scale == 1.0:
        torch._foreach_lerp_(targets, ends, w)
        return
    if modification.scale != 1.0:
        torch._foreach_mul_(targets, modification.scale)
    torch._foreach_add_(targets, ends, alpha=modification.weight * grad_scale / modification.delta_factor)
