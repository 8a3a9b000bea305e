"""QLoRA: NF4 blocks with double quantisation (bitsandbytes), forward = LoRA on the dequantised base, merge, 8-bit."""
from __future__ import annotations

import logging

import pytest
import torch

from peftcli.methods.qlora import QLoraConfig, QLoraLinear

bnb = pytest.importorskip("bitsandbytes")
# The 16 NF4 code values, QLoRA (Dettmers et al. 2023) Appendix E.
NF4 = torch.tensor([-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
                    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
                    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
                    0.7229568362236023, 1.0])


def layer(bits=4, **kw):
    torch.manual_seed(0)
    base = torch.nn.Linear(128, 64).requires_grad_(False)  # frozen, as prepare_model leaves it
    q = QLoraLinear(base, QLoraConfig(bits=bits, r=4, **kw))
    with torch.no_grad():
        q.lora_B.normal_(std=0.1)
    return base, q


def test_nf4_blocks_of_64_with_double_quantised_scales():
    base, q = layer()
    state = q.quant_state
    assert q.qweight.dtype == torch.uint8 and q.qweight.numel() == 64 * 128 // 2  # two 4-bit codes per byte
    assert state.blocksize == 64 and state.nested and state.state2.blocksize == 256
    torch.testing.assert_close(state.code.cpu().float(), NF4)
    # Every dequantised weight is a code value times its block's absmax.
    blocks = q.dequantized().reshape(-1, 64)
    scale = blocks.abs().amax(dim=1, keepdim=True)
    codes = blocks / scale
    assert (codes[..., None] - NF4).abs().amin(-1).max() < 1e-5
    error = torch.linalg.matrix_norm(q.dequantized() - base.weight) / torch.linalg.matrix_norm(base.weight)
    assert 0 < error < 0.15  # 4 bits of a uniform-ish weight: about 10% relative error


@pytest.mark.parametrize("bits", [4, 8])
def test_forward_is_lora_on_the_dequantised_base_and_merges(bits, caplog):
    base, q = layer(bits)
    x = torch.randn(5, 128)
    expected = x @ q.dequantized().T + base.bias + q.scale * (x @ q.lora_A.T) @ q.lora_B.T
    torch.testing.assert_close(q(x), expected, rtol=1e-4, atol=1e-4)
    merged = q.merged()
    assert type(merged) is torch.nn.Linear and merged.weight.dtype == torch.float32
    torch.testing.assert_close(merged(x), q(x), rtol=1e-4, atol=1e-4)
    assert not any(p.requires_grad for n, p in q.named_parameters() if not n.startswith("lora_"))


def test_merge_warns_about_quantisation_error(caplog):
    from peftcli.methods import qlora

    _, q = layer()
    model = torch.nn.Sequential(q)
    with caplog.at_level(logging.WARNING, logger="peftcli"):
        qlora.merge(model, QLoraConfig())
    assert "quantisation error" in caplog.text and type(model[0]) is torch.nn.Linear


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (bitsandbytes' CUDA kernels)")
@pytest.mark.parametrize("quantised_on", ["cpu", "cuda"])
@pytest.mark.parametrize("bits", [4, 8])
def test_cuda_bf16_forward_backward_match_the_dequantised_base(bits, quantised_on):
    """The Trainer quantises on the CPU at inject time and moves the model to the GPU afterwards: both routes
    must give bnb's CUDA matmul the same answer as the dequantised weights, with gradients reaching only LoRA."""
    torch.manual_seed(0)
    base = torch.nn.Linear(256, 128).requires_grad_(False).to(quantised_on, torch.bfloat16)
    q = QLoraLinear(base, QLoraConfig(bits=bits, r=8)).to("cuda")
    with torch.no_grad():
        q.lora_B.normal_(std=0.1)
    x = torch.randn(4, 16, 256, device="cuda", dtype=torch.bfloat16)
    out = q(x)
    expected = (x.float() @ q.dequantized().T + base.bias.float().cuda()
                + q.scale * (x.float() @ q.lora_A.T) @ q.lora_B.T)
    assert out.dtype == torch.bfloat16 and out.is_cuda
    torch.testing.assert_close(out.float(), expected, rtol=3e-2, atol=3e-2)
    out.float().square().mean().backward()
    assert q.lora_A.grad is not None and q.lora_B.grad.abs().sum() > 0
    torch.testing.assert_close(q.merged()(x).float(), out.float(), rtol=3e-2, atol=3e-2)
