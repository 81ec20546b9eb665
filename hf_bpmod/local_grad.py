"""Local gradients with horizon ``h`` (paper eq. 2-4), streamed in ``O(h)`` blocks of activation memory.

Block ``t`` receives ``g_{h,t} = grad_{u_t} L(x_{min(t+h, T)})`` (eq. 4): ``h = 1`` is Forward-Forward-like,
``h = 2`` LoCo-like, ``h >= T`` exact backprop. The forward runs block by block; every block input is a detached
leaf, so each block's autograd graph stands alone. As soon as ``L(x_s)`` exists its gradient is carried back
through the blocks it reaches by chained vector-Jacobian products: input-gradients only through blocks
``s-1 .. s-h+1``, the weight-gradient only at its one target block ``s - h`` (all of blocks ``T-h .. T-1`` for the
final loss). Block ``j`` is last needed by ``L(x_{min(j+h, T)})`` and is freed right after, so at most ``h`` block
graphs are alive at once. Every auxiliary head is trained by its own loss only (its gradient does not depend on
whether its input is detached).

With ``also_true=True`` (the offset's refresh) the true backprop gradient ``g_{T,t}`` of every block
comes from the same forward, which then keeps every block graph alive and connected: each loss is differentiated for
its head and its target block in one call (autograd walks only that path), and the final loss for every block.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from .chain import BlockChain

LossFn = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class ChainGradients:
    """What :func:`local_gradients` computed for one batch.

    Attributes:
        loss: the final loss ``L(x_T)`` (detached), as given by ``loss_fn``.
        head_losses: ``L(x_s)`` for every head that was evaluated (``s -> loss``, detached), final head included.
        local: ``g_{h,t}`` per block, aligned with ``chain.block_params`` (``None`` when accumulated into ``.grad``).
        true: ``g_{T,t}`` per block when ``also_true`` was asked for.
        heads: per head gradients aligned with ``chain.head_params`` (``None`` when accumulated into ``.grad``).
    """

    loss: torch.Tensor
    head_losses: dict[int, torch.Tensor] = field(default_factory=dict)
    local: list[list[torch.Tensor]] | None = None
    true: list[list[torch.Tensor]] | None = None
    heads: list[list[torch.Tensor]] | None = None


def loss_targets(s: int, horizon: int, num_blocks: int) -> list[int]:
    """The blocks whose gradient comes from ``L(x_s)`` under horizon ``h`` (eq. 4).

    ``L(x_s)`` for ``s < T`` trains only block ``s - h`` (none when ``s < h``); ``L(x_T)`` trains every block
    ``t >= T - h``, whose horizon is cut at the model output.
    """
    if s < num_blocks:
        return [s - horizon] if s - horizon >= 0 else []
    return list(range(max(0, num_blocks - horizon), num_blocks))


def _sink(
    params: list[torch.nn.Parameter], grads: tuple[torch.Tensor | None, ...], store: list[torch.Tensor] | None
) -> None:
    """Accumulate ``grads`` into ``params[i].grad`` (``store is None``) or into ``store``."""
    for i, (p, g) in enumerate(zip(params, grads)):
        if g is None:
            g = torch.zeros_like(p)
        if store is not None:
            store[i] = store[i] + g if store[i] is not None else g
        elif p.grad is None:
            # In the parameter's memory layout, as `backward` leaves it: autograd may return another (channels-last
            # for a convolution whose input is a permuted view), and torch's fused Adam reads both as one.
            p.grad = torch.empty_like(p).copy_(g) if g.stride() != p.stride() else g.detach().to(p.dtype)
        else:
            p.grad.add_(g.to(p.grad.dtype))


def local_gradients(
    chain: BlockChain,
    x0: torch.Tensor,
    loss_fn: LossFn,
    horizon: int,
    *,
    accumulate: bool = False,
    also_true: bool = False,
    loss_scale: float = 1.0,
    forward_context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> ChainGradients:
    """Per-block local gradients ``g_{h,t} = grad_{u_t} L(x_{min(t+h,T)})`` (eq. 4) for one batch.

    Args:
        chain: the blocks and heads.
        x0: the block-0 input (pixels).
        loss_fn: maps a head's logits to the scalar loss ``L`` (labels closed over).
        horizon: ``h >= 1``; ``h >= T`` gives exact backprop.
        accumulate: add the gradients into ``.grad`` of the parameters (as ``backward`` does) instead of returning
            them; keeps the extra memory at zero.
        also_true: also compute the true gradient ``g_{T,t}`` of every block from the same forward (keeps every
            block graph alive: ``O(T)`` memory). Not with ``accumulate``.
        loss_scale: every loss is multiplied by this before differentiation (fp16 loss scaling); reported losses
            are not.
        forward_context: a context entered around each forward computation (e.g. autocast).
    """
    if horizon < 1:
        raise ValueError(f"`horizon` must be >= 1, got {horizon}.")
    if accumulate and also_true:
        raise ValueError("`also_true` returns gradients; it cannot be combined with `accumulate`.")
    T = chain.num_blocks
    h = min(horizon, T)
    if also_true:
        return _local_and_true(chain, x0, loss_fn, h, loss_scale, forward_context)
    local = None if accumulate else [[None] * len(ps) for ps in chain.block_params]
    heads = None if accumulate else [[None] * len(ps) for ps in chain.head_params]
    graphs: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    head_losses: dict[int, torch.Tensor] = {}
    x = x0
    final_loss = None
    for t in range(T):
        inp = x.detach().requires_grad_(True) if t > 0 else x
        with forward_context():
            out = chain.blocks[t](inp)
        graphs[t] = (inp, out)
        x = out.detach()  # the next block starts from a leaf; only `graphs` keeps this block's graph alive
        s = t + 1
        targets = loss_targets(s, h, T)
        head = chain.heads[s - 1]
        if head is not None and (targets or chain.head_params[s - 1] or s == T):
            loss = _head_step(chain, graphs, s, out, loss_fn, loss_scale, forward_context, targets, local, heads)
            head_losses[s] = loss
            if s == T:
                final_loss = loss
        # Block j is last read by L(x_{min(j+h, T)}): free it.
        if s < T and s - h >= 0:
            graphs.pop(s - h, None)
        del inp, out
    graphs.clear()
    if final_loss is None:  # pragma: no cover - the last head is never None
        raise RuntimeError("The final head produced no loss.")
    return ChainGradients(loss=final_loss, head_losses=head_losses, local=local, heads=heads)


def _local_and_true(
    chain: BlockChain,
    x0: torch.Tensor,
    loss_fn: LossFn,
    h: int,
    loss_scale: float,
    forward_context: Callable[[], contextlib.AbstractContextManager],
) -> ChainGradients:
    """``also_true``: ``g_{h,t}`` and ``g_{T,t}`` of every block from one forward whose block graphs stay connected
    (the true gradient keeps every one of them alive anyway).

    Each ``L(x_s)`` is differentiated for its head and its one target block ``s - h`` in a single call: autograd
    walks only the path to what is asked, so blocks ``s-h+1 .. s-1`` give input gradients only, which is eq. 4. The
    final loss gives every block's true gradient in one call; blocks ``t >= T - h`` take it as their local gradient.
    The same forward, in the same order (so the same dropout draws), as the streamed pass.
    """
    T = chain.num_blocks
    local: list[list[torch.Tensor]] = [[None] * len(ps) for ps in chain.block_params]
    heads: list[list[torch.Tensor]] = [[None] * len(ps) for ps in chain.head_params]
    true: list[list[torch.Tensor]] = [[None] * len(ps) for ps in chain.block_params]
    head_losses: dict[int, torch.Tensor] = {}
    x = x0
    final_loss = None
    for t in range(T):
        with forward_context():
            x = chain.blocks[t](x)
        s = t + 1
        targets = loss_targets(s, h, T)
        head = chain.heads[s - 1]
        if head is None or not (targets or chain.head_params[s - 1] or s == T):
            continue
        with forward_context():
            loss = loss_fn(head(x))
        hparams = list(chain.head_params[s - 1])
        blocks = range(T) if s == T else targets
        wrt = hparams + [p for j in blocks for p in chain.block_params[j]]
        if wrt:
            grads = torch.autograd.grad(loss * loss_scale, wrt, retain_graph=s < T, allow_unused=True)
            _sink(hparams, grads[: len(hparams)], heads[s - 1])
            start = len(hparams)
            for j in blocks:
                params = chain.block_params[j]
                block_grads = grads[start : start + len(params)]
                start += len(params)
                _sink(params, block_grads, true[j] if s == T else local[j])
                if s == T and j in targets:
                    local[j] = list(true[j])
        head_losses[s] = loss.detach()
        del loss  # the head's graph (kept by ``retain_graph``) dies here, before the next block's forward
        if s == T:
            final_loss = head_losses[s]
    if final_loss is None:  # pragma: no cover - the last head is never None
        raise RuntimeError("The final head produced no loss.")
    return ChainGradients(loss=final_loss, head_losses=head_losses, local=local, true=true, heads=heads)


def _head_step(
    chain: BlockChain,
    graphs: dict[int, tuple[torch.Tensor, torch.Tensor]],
    s: int,
    out: torch.Tensor,
    loss_fn: LossFn,
    loss_scale: float,
    forward_context: Callable[[], contextlib.AbstractContextManager],
    targets: list[int],
    local: list[list[torch.Tensor]] | None,
    heads: list[list[torch.Tensor]] | None,
) -> torch.Tensor:
    """``L(x_s)``: the head's own gradient, then its cotangent carried back to the blocks it trains.

    The head and the first block of the walk (``s - 1``, whose output the head reads) are differentiated in one
    ``autograd.grad`` call: under ``h = 1`` that is the whole of a block's local gradient, one backward call per
    block instead of two. A function of its own so that the loss's graph dies with its frame, not at the next block.
    """
    with forward_context():
        loss = loss_fn(chain.heads[s - 1](out))
    hparams = list(chain.head_params[s - 1])
    walk = _Walk(chain, set(targets), local)
    walk_to = min(targets) if targets else None
    j = s - 1
    block_wrt = walk.wrt(graphs, j, walk_to) if walk_to is not None else []
    wrt = hparams + block_wrt
    if wrt:
        grads = torch.autograd.grad(loss * loss_scale, wrt, retain_graph=bool(block_wrt), allow_unused=True)
        _sink(hparams, grads[: len(hparams)], None if heads is None else heads[s - 1])
        if block_wrt:
            cotangent = walk.take(j, grads[len(hparams) :], walk_to)
            if cotangent is not None:
                walk.back(graphs, cotangent, j - 1, walk_to)
    return loss.detach()


@dataclass
class _Walk:
    """One loss's cotangent carried back through the blocks (eq. 4 by the chain rule): input gradients through the
    blocks on the way, weight gradients at the target blocks (into ``local``, or ``.grad`` when ``local is None``).
    """

    chain: BlockChain
    targets: set[int]
    local: list[list[torch.Tensor]] | None

    def wrt(self, graphs: dict[int, tuple[torch.Tensor, torch.Tensor]], j: int, stop: int) -> list[torch.Tensor]:
        """What block ``j`` is differentiated for: its parameters if it is a target, its input where the walk goes
        on past it."""
        params = self.chain.block_params[j]
        want_params = bool(params) and j in self.targets
        return (list(params) if want_params else []) + ([graphs[j][0]] if j > stop else [])

    def take(self, j: int, grads: Sequence[torch.Tensor | None], stop: int) -> torch.Tensor | None:
        """Sink block ``j``'s parameter gradients (``grads`` as :meth:`wrt` ordered them); the input cotangent, if
        the walk goes on."""
        n = len(grads) - (1 if j > stop else 0)
        if n:
            _sink(self.chain.block_params[j], grads[:n], None if self.local is None else self.local[j])
        return grads[-1] if j > stop else None

    def back(
        self, graphs: dict[int, tuple[torch.Tensor, torch.Tensor]], cotangent: torch.Tensor, start: int, stop: int
    ) -> None:
        """Carry ``cotangent`` (``dL/dx_{start+1}``) back from block ``start`` to block ``stop``."""
        for j in range(start, stop - 1, -1):
            wrt = self.wrt(graphs, j, stop)
            if not wrt:
                continue
            out = graphs[j][1]
            grads = torch.autograd.grad(out, wrt, grad_outputs=cotangent, retain_graph=True, allow_unused=True)
            cotangent = self.take(j, grads, stop)
