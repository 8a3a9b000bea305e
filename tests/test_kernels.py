"""Checks peftcli.kernels (LoRA linear, chunked LM loss) against plain-autograd references on CPU."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from peftcli.methods.install import prepare_model
from peftcli.models.kernels import chunked_causal_lm_loss, fused, lora_delta_weight, lora_linear
from peftcli.models.kernels.lora import _keep_mask

TOL = {torch.float64: dict(rtol=1e-10, atol=1e-10), torch.float32: dict(rtol=1e-4, atol=1e-5)}


# ----------------------------------------------------------------------------- LoRA linear


def _lora_params(dtype, d_in=12, d_out=10, r=4, bias=True, seed=0):
    """Frozen W/bias in the compute dtype, trainable A/B (B non-zero so every grad is exercised)."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(d_out, d_in, generator=gen, dtype=dtype)
    b = torch.randn(d_out, generator=gen, dtype=dtype) if bias else None
    a = torch.randn(r, d_in, generator=gen, dtype=dtype).requires_grad_()
    bb = torch.randn(d_out, r, generator=gen, dtype=dtype).requires_grad_()
    return w, b, a, bb


def _ref_lora(x, w, b, a, bb, scale, mask=None, p=0.0):
    """Reference: plain F.linear composition; ``mask`` is the dropout keep-mask (2D over tokens)."""
    xd = x
    if mask is not None:
        xd = x * mask.view(x.shape) / (1.0 - p)
    return F.linear(x, w, b) + scale * F.linear(F.linear(xd, a), bb)


def _grads(out, tensors, seed=1):
    """Vector-Jacobian product with one fixed random upstream gradient."""
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype)
    return torch.autograd.grad(out, tensors, g)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", [(5, 12), (2, 3, 12)])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dropout_p,training", [(0.0, True), (0.1, False)], ids=["p0", "eval"])
def test_lora_matches_reference_no_dropout(dtype, shape, bias, dropout_p, training):
    w, b, a, bb = _lora_params(dtype, bias=bias)
    x = torch.randn(shape, dtype=dtype, requires_grad=True)
    out = lora_linear(x, w, b, a, bb, scale=0.5, dropout_p=dropout_p, training=training)
    ref = _ref_lora(x, w, b, a, bb, 0.5)
    torch.testing.assert_close(out, ref, **TOL[dtype])
    for got, want in zip(_grads(out, (x, a, bb)), _grads(ref, (x, a, bb))):
        torch.testing.assert_close(got, want, **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_lora_dropout_matches_reference_with_same_mask(dtype):
    """Reseeding reproduces the kernel's mask, so the reference can use exactly the same one."""
    p, shape = 0.3, (2, 7, 12)
    w, b, a, bb = _lora_params(dtype)
    x = torch.randn(shape, dtype=dtype, requires_grad=True)
    torch.manual_seed(123)
    out = lora_linear(x, w, b, a, bb, scale=2.0, dropout_p=p, training=True)
    torch.manual_seed(123)
    mask = _keep_mask(x.detach().reshape(-1, 12), p)
    assert 0 < mask.sum() < mask.numel()
    ref = _ref_lora(x, w, b, a, bb, 2.0, mask, p)
    torch.testing.assert_close(out, ref, **TOL[dtype])
    for got, want in zip(_grads(out, (x, a, bb)), _grads(ref, (x, a, bb))):
        torch.testing.assert_close(got, want, **TOL[dtype])


def test_lora_gradcheck_with_dropout():
    """Backward reuses the forward's mask: gradcheck passes only if forward and backward agree."""
    w, b, a, bb = _lora_params(torch.float64, d_in=5, d_out=4, r=2)
    x = torch.randn(2, 3, 5, dtype=torch.float64, requires_grad=True)
    bias = b.clone().requires_grad_()  # also check the (rarely used) trainable bias path

    def fn(x, bias, a, bb):
        torch.manual_seed(7)  # same mask on every call gradcheck makes
        return lora_linear(x, w, bias, a, bb, scale=1.5, dropout_p=0.4, training=True)

    assert torch.autograd.gradcheck(fn, (x, bias, a, bb))


def test_lora_gradcheck_trainable_weight():
    w, b, a, bb = _lora_params(torch.float64, d_in=5, d_out=4, r=2)
    x = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    w.requires_grad_()
    assert torch.autograd.gradcheck(
        lambda x, w, a, bb: lora_linear(x, w, b, a, bb, 0.7, 0.0, True), (x, w, a, bb)
    )


def test_lora_dropout_is_unbiased():
    """E[dropout(x)] = x, so the mean output over many tokens equals the no-dropout output."""
    torch.manual_seed(0)
    w, b, a, bb = _lora_params(torch.float64)
    n = 20000
    x = torch.randn(1, 12, dtype=torch.float64).expand(n, 12)
    out = lora_linear(x, w, b, a, bb, 1.0, 0.5, True).detach()
    ref = _ref_lora(x[:1], w, b, a, bb, 1.0).detach()[0]
    five_sigma = 5 * out.std(0) / n**0.5
    assert ((out.mean(0) - ref).abs() < five_sigma).all()


def test_lora_x_without_grad_computes_only_param_grads():
    w, b, a, bb = _lora_params(torch.float32)
    x = torch.randn(4, 12)
    out = lora_linear(x, w, b, a, bb, 0.5, 0.2, True)
    # W is not saved: with x not requiring grad (first layer) nothing reads it in backward.
    assert all(t.shape != w.shape for t in out.grad_fn.saved_tensors if t is not None)
    out.sum().backward()
    assert a.grad is not None and bb.grad is not None and x.grad is None


def test_lora_bf16_compute_with_fp32_master_params():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(16, 32, generator=gen).bfloat16()
    b = torch.randn(16, generator=gen).bfloat16()
    a = torch.randn(4, 32, generator=gen).requires_grad_()
    bb = torch.randn(16, 4, generator=gen).requires_grad_()
    x = torch.randn(2, 5, 32, generator=gen).bfloat16().requires_grad_()
    out = lora_linear(x, w, b, a, bb, 0.25, 0.1, True)
    assert out.dtype == torch.bfloat16 and out.shape == (2, 5, 16)
    # No fp32 activation is kept for backward.
    saved = [t for t in out.grad_fn.saved_tensors if t is not None]
    assert all(t.dtype != torch.float32 for t in saved)
    out.float().square().sum().backward()
    assert a.grad.dtype == torch.float32 and bb.grad.dtype == torch.float32
    assert x.grad.dtype == torch.bfloat16

    # Without dropout, compare against an fp32 reference on the same bf16-rounded inputs.
    a.grad = bb.grad = None
    xr = x.detach().float().requires_grad_()
    ar, br = a.detach().clone().requires_grad_(), bb.detach().clone().requires_grad_()
    out = lora_linear(x, w, b, a, bb, 0.25, 0.0, True)
    ref = _ref_lora(xr, w.float(), b.float(), ar, br, 0.25)
    torch.testing.assert_close(out.float(), ref, rtol=2e-2, atol=2e-2)
    g = torch.randn(out.shape, generator=gen)
    got = torch.autograd.grad(out, (a, bb), g.bfloat16())
    want = torch.autograd.grad(ref, (ar, br), g.bfloat16().float())
    for gg, ww in zip(got, want):
        torch.testing.assert_close(gg, ww, rtol=2e-2, atol=5e-2 * ww.abs().max().item())


def test_lora_rejects_bad_dropout():
    w, b, a, bb = _lora_params(torch.float32)
    with pytest.raises(ValueError):
        lora_linear(torch.randn(2, 12), w, b, a, bb, 1.0, 1.0, True)


def test_lora_delta_weight_merges_exactly():
    w, b, a, bb = _lora_params(torch.float64, bias=False)
    x = torch.randn(3, 12, dtype=torch.float64)
    delta = lora_delta_weight(a.detach(), bb.detach(), 0.5)
    assert delta.dtype == torch.float32 and delta.shape == w.shape
    merged = F.linear(x, w + delta.double())
    torch.testing.assert_close(merged, lora_linear(x, w, None, a, bb, 0.5, 0.0, False).detach(), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- chunked loss


def _ref_loss(hidden, weight, labels, num_items_in_batch=None, softcap=None):
    """HF transformers' ForCausalLMLoss on full fp32 logits."""
    logits = F.linear(hidden, weight).float()
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    shift = F.pad(labels, (0, 1), value=-100)[..., 1:]
    reduction = "sum" if num_items_in_batch is not None else "mean"
    loss = F.cross_entropy(logits.view(-1, logits.shape[-1]), shift.reshape(-1), ignore_index=-100, reduction=reduction)
    return loss / num_items_in_batch if num_items_in_batch is not None else loss


def _loss_inputs(dtype, b=2, t=9, h=8, v=17, seed=0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(b, t, h, generator=gen, dtype=dtype).requires_grad_()
    weight = torch.randn(v, h, generator=gen, dtype=dtype).requires_grad_()
    labels = torch.randint(0, v, (b, t), generator=gen)
    labels[0, :3] = -100  # a masked prompt
    labels[1, -2:] = -100  # right padding
    return hidden, weight, labels


def _check_loss(hidden, weight, labels, tol, upstream=1.0, **kw):
    """Value and both gradients against the reference; ``upstream`` != 1 checks the rescale in backward."""
    ref_kw = dict(num_items_in_batch=kw.get("num_items_in_batch"), softcap=kw.get("logit_softcap"))
    got = chunked_causal_lm_loss(hidden, weight, labels, **kw)
    want = _ref_loss(hidden, weight, labels, **ref_kw)
    assert got.dtype == torch.float32 and got.dim() == 0
    torch.testing.assert_close(got, want.float(), **tol)
    got_grads = torch.autograd.grad(got * upstream, (hidden, weight))
    for g, w in zip(got_grads, torch.autograd.grad(want * upstream, (hidden, weight))):
        torch.testing.assert_close(g, w, **tol)


MODES = pytest.mark.parametrize("grad_in_forward", [True, False], ids=["fused", "recompute"])


@MODES
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("chunk", [1, 4, 5, 2048])  # 5 does not divide the 13 counted tokens
def test_loss_matches_reference(dtype, chunk, grad_in_forward):
    hidden, weight, labels = _loss_inputs(dtype)
    # The fp32 loss (as in HF) caps fp64 agreement at fp32 precision.
    _check_loss(hidden, weight, labels, TOL[torch.float32], 2.5, chunk_tokens=chunk, grad_in_forward=grad_in_forward)


@MODES
@pytest.mark.parametrize("num_items", [7, torch.tensor(40)])
def test_loss_num_items_in_batch(num_items, grad_in_forward):
    hidden, weight, labels = _loss_inputs(torch.float64)
    _check_loss(
        hidden, weight, labels, TOL[torch.float32], chunk_tokens=3, num_items_in_batch=num_items,
        grad_in_forward=grad_in_forward,
    )


@MODES
def test_loss_softcap(grad_in_forward):
    hidden, weight, labels = _loss_inputs(torch.float64)
    _check_loss(
        hidden, weight, labels, TOL[torch.float32], 0.5, chunk_tokens=4, logit_softcap=2.5,
        grad_in_forward=grad_in_forward,
    )


def test_loss_no_grad_mode_matches():
    """Under no_grad (evaluation) the fused mode must not spend time on gradients, and values agree."""
    hidden, weight, labels = _loss_inputs(torch.float32)
    with torch.no_grad():
        loss = chunked_causal_lm_loss(hidden, weight, labels, chunk_tokens=4)
    assert loss.grad_fn is None
    torch.testing.assert_close(loss, _ref_loss(hidden, weight, labels).detach(), **TOL[torch.float32])


@MODES
def test_loss_long_ignored_span_and_all_ignored(grad_in_forward):
    hidden, weight, labels = _loss_inputs(torch.float32, t=20)
    labels[:, 2:15] = -100  # an ignored span longer than a chunk
    _check_loss(hidden, weight, labels, TOL[torch.float32], chunk_tokens=4, grad_in_forward=grad_in_forward)

    labels[:] = -100
    loss = chunked_causal_lm_loss(hidden, weight, labels, chunk_tokens=4, grad_in_forward=grad_in_forward)
    assert loss.item() == 0.0  # HF would give NaN here
    gh, gw = torch.autograd.grad(loss, (hidden, weight))
    assert not gh.any() and not gw.any()


@MODES
def test_loss_frozen_head_gets_no_grad_and_ignored_tokens_zero_grad(grad_in_forward):
    hidden, weight, labels = _loss_inputs(torch.float32)
    weight = weight.detach()
    loss = chunked_causal_lm_loss(hidden, weight, labels, chunk_tokens=4, grad_in_forward=grad_in_forward)
    (gh,) = torch.autograd.grad(loss, (hidden,))
    assert weight.grad is None
    # Position t is scored only when labels[t + 1] counts; the last position never is.
    assert not gh[:, -1].any() and not gh[0, :2].any()


@MODES
def test_loss_bf16(grad_in_forward):
    hidden, weight, labels = _loss_inputs(torch.float32, h=16, v=33)
    hb, wb = hidden.detach().bfloat16().requires_grad_(), weight.detach().bfloat16().requires_grad_()
    got = chunked_causal_lm_loss(hb, wb, labels, chunk_tokens=5, grad_in_forward=grad_in_forward)
    want = _ref_loss(hb, wb, labels)  # HF: bf16 logits, fp32 cross entropy
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    gh, gw = torch.autograd.grad(got, (hb, wb))
    rh, rw = torch.autograd.grad(want, (hb, wb))
    assert gh.dtype == torch.bfloat16 and gw.dtype == torch.bfloat16
    torch.testing.assert_close(gh.float(), rh.float(), rtol=2e-2, atol=1e-2)
    torch.testing.assert_close(gw.float(), rw.float(), rtol=2e-2, atol=1e-2)


def test_lora_layers_train_under_bf16_autocast_over_fp32_weights(tiny_llama):
    """`train.bf16: true` with fp32 weights runs the model under autocast: every LoRA layer (all-linear, DoRA
    too) must compute in bf16 and give gradients close to the fp32 run's."""
    from transformers import AutoModelForCausalLM

    from peftcli.methods.lora import LoraConfig

    ids = torch.randint(5, 50, (2, 12), generator=torch.Generator().manual_seed(0))
    for dora in (False, True):
        grads = []
        for autocast in (False, True):
            torch.manual_seed(0)
            model = prepare_model(AutoModelForCausalLM.from_pretrained(tiny_llama), "lora",
                                       LoraConfig(target_modules="all-linear", use_dora=dora))
            with torch.no_grad():
                for name, p in model.named_parameters():
                    if name.endswith("lora_B"):
                        p.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(name)))
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
        assert grads[0].keys() == grads[1].keys()
        for name, want in grads[0].items():
            assert grads[1][name].dtype == torch.float32  # fp32 master weights keep fp32 gradients
            error = torch.linalg.vector_norm(grads[1][name] - want) / torch.linalg.vector_norm(want)
            assert error < 0.05, (name, float(error))  # bf16 rounding, not a wrong gradient


# The Triton cross-entropy kernel (kernels/loss.py, fused_loss_and_grad): on CUDA, or on the CPU under Triton's
# interpreter (`TRITON_INTERPRET=1 python -m pytest tests/test_kernels.py -k fused_cross` with triton installed).
_KERNEL_DEVICE = "cuda" if torch.cuda.is_available() else ("cpu" if os.environ.get("TRITON_INTERPRET") else None)


@pytest.mark.skipif(fused.triton is None or _KERNEL_DEVICE is None, reason="Triton on CUDA or its CPU interpreter")
@MODES
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_cross_entropy_kernel_matches_reference(grad_in_forward, dtype, monkeypatch):
    from peftcli.models.kernels import loss as loss_module

    calls = []
    monkeypatch.setattr(loss_module, "_fused_applies", lambda logits, softcap: calls.append(1) or softcap is None)
    hidden, weight, labels = _loss_inputs(torch.float32, h=16, v=5000)  # vocab > the kernel's 4096 block
    hidden, weight = (t.detach().to(_KERNEL_DEVICE, dtype).requires_grad_() for t in (hidden, weight))
    labels = labels.remainder(5000).to(_KERNEL_DEVICE)
    labels[0, :3] = -100
    got = chunked_causal_lm_loss(hidden, weight, labels, chunk_tokens=5, num_items_in_batch=11,
                                 grad_in_forward=grad_in_forward)
    want = _ref_loss(hidden, weight, labels, num_items_in_batch=11)
    assert calls
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=1e-2)
    torch.testing.assert_close(got, want.float(), rtol=1e-5, atol=1e-5)
    for g, w in zip(torch.autograd.grad(got * 2.5, (hidden, weight)), torch.autograd.grad(want * 2.5, (hidden, weight))):
        assert g.dtype == w.dtype
        torch.testing.assert_close(g.float(), w.float(), **tol)
