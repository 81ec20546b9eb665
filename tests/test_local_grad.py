"""Every block's streamed gradient equals an independent plain-autograd grad_{u_t} L(x_{min(t+h, T)}) (eq. 4)."""

import pytest
import torch
from helpers import chain_of, float64_batch, make, reference_local_gradients

from hf_bpmod import get_adapter, local_gradients, loss_targets

pytestmark = pytest.mark.compat  # the adapters find layers by structure and unwrap peft, which move across releases


def _setup(kind, horizon):
    model, granularity = make(kind)
    x, loss_fn = float64_batch()
    return model, chain_of(model.double().train(), horizon, granularity), x, loss_fn


def _close(a, b):
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x, y, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("kind", ["vit", "resnet", "vit_lora", "resnet_lokr", "resnet_stage", "resnet_stem"])
@pytest.mark.parametrize("horizon", [1, 2, "T"])
def test_local_gradient_matches_independent_autograd(kind, horizon):
    model, chain, x, loss_fn = _setup(kind, 1 if horizon == "T" else horizon)
    h = chain.num_blocks if horizon == "T" else horizon
    if horizon == "T":  # rebuild with the heads of h = T (none but the model's own)
        adapter = get_adapter(model)
        _, granularity = make(kind)
        chain = adapter.chain(model, adapter.aux_heads(model, h, granularity).double(), granularity)
    ref_local, ref_heads = reference_local_gradients(chain, x, loss_fn, h)
    ref_true, _ = reference_local_gradients(chain, x, loss_fn, chain.num_blocks)
    got = local_gradients(chain, x, loss_fn, h, also_true=True)
    for t in range(chain.num_blocks):
        assert chain.block_params[t], "every block of these models has trainable parameters"
        _close(got.local[t], ref_local[t])
        _close(got.true[t], ref_true[t])
    for s, grads in ref_heads.items():
        _close(got.heads[s - 1], grads)
    # local and true really differ below the horizon cut, so the comparison above is not vacuous
    if h < chain.num_blocks:
        diff = sum((a - b).abs().sum() for a, b in zip(got.local[0], got.true[0]))
        assert diff > 1e-6


@pytest.mark.parametrize("horizon", [1, 3])
def test_accumulate_into_grad_equals_returned_gradients(horizon):
    model, chain, x, loss_fn = _setup("vit", horizon)
    got = local_gradients(chain, x, loss_fn, horizon)
    local_gradients(chain, x, loss_fn, horizon, accumulate=True)
    local_gradients(chain, x, loss_fn, horizon, accumulate=True)  # twice: .grad accumulates like backward()
    for params, grads in zip(chain.block_params, got.local):
        for p, g in zip(params, grads):
            torch.testing.assert_close(p.grad, 2 * g, rtol=1e-12, atol=1e-14)
    for params, grads in zip(chain.head_params, got.heads):
        for p, g in zip(params, grads):
            torch.testing.assert_close(p.grad, 2 * g, rtol=1e-12, atol=1e-14)


def test_h_at_least_T_is_backprop_of_the_model():
    model, chain, x, loss_fn = _setup("resnet", 4)
    got = local_gradients(chain, x, loss_fn, horizon=10)
    model.zero_grad()
    loss_fn(model(pixel_values=x).logits).backward()
    for params, grads in zip(chain.block_params, got.local):
        for p, g in zip(params, grads):
            torch.testing.assert_close(g, p.grad, rtol=1e-9, atol=1e-12)


def test_loss_targets():
    assert loss_targets(1, 1, 4) == [0]
    assert loss_targets(1, 2, 4) == []
    assert loss_targets(3, 2, 4) == [1]
    assert loss_targets(4, 2, 4) == [2, 3]
    assert loss_targets(4, 9, 4) == [0, 1, 2, 3]


def test_bad_horizon():
    _, chain, x, loss_fn = _setup("vit", 1)
    with pytest.raises(ValueError, match="horizon"):
        local_gradients(chain, x, loss_fn, 0)


@pytest.mark.parametrize("kind", ["vit", "resnet"])
@pytest.mark.parametrize("horizon", [2, 3])
def test_streamed_training_path_matches_per_block_autograd(kind, horizon):
    """The path the trainer trains with (``accumulate=True``: streamed, O(h) graphs, into ``.grad``) gives every
    block exactly ``grad_{u_t} L(x_{min(t+h, T)})`` (eq. 4) and nothing from the later losses whose cotangent only
    passes through it on the way back; every auxiliary head gets its own loss's gradient."""
    _, chain, x, loss_fn = _setup(kind, horizon)
    assert chain.num_blocks > horizon  # some losses pass through blocks they do not train
    ref_blocks, ref_heads = reference_local_gradients(chain, x, loss_fn, horizon)
    for p in chain.trainable_parameters():
        p.grad = None
    local_gradients(chain, x, loss_fn, horizon, accumulate=True)
    for t, (params, ref) in enumerate(zip(chain.block_params, ref_blocks, strict=True)):
        assert params, f"block {t} has no trainable parameter"
        for p, g in zip(params, ref, strict=True):
            assert p.grad is not None, f"block {t} got no gradient"
            torch.testing.assert_close(p.grad, g, rtol=1e-10, atol=1e-13)
    assert set(ref_heads) == {s for s in range(1, chain.num_blocks + 1) if chain.head_params[s - 1]}
    for s, ref in ref_heads.items():
        for p, g in zip(chain.head_params[s - 1], ref, strict=True):
            torch.testing.assert_close(p.grad, g, rtol=1e-10, atol=1e-13)
    # the local gradient of block 0 really differs from backprop's, so the comparison is not vacuous
    final = x
    for block in chain.blocks:
        final = block(final)
    true0 = torch.autograd.grad(loss_fn(chain.heads[-1](final)), chain.block_params[0])
    assert sum((a.grad - b).abs().sum() for a, b in zip(chain.block_params[0], true0)) > 1e-6
