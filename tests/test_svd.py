"""SVD compression: rank from an energy fraction, Eckart-Young error, compression report, merge."""
from __future__ import annotations

import torch

import test_lifecycle as lc
from peftcli.methods.svd import SvdConfig, SvdLinear, compression_report, rank_for
from peftcli.methods.install import prepare_model


def weight_with_spectrum(sigma: torch.Tensor, out_f: int = 12, in_f: int = 10) -> torch.Tensor:
    torch.manual_seed(0)
    u = torch.linalg.qr(torch.randn(out_f, out_f))[0][:, :len(sigma)]
    v = torch.linalg.qr(torch.randn(in_f, in_f))[0][:, :len(sigma)]
    return u @ torch.diag(sigma) @ v.T


def test_energy_picks_the_smallest_rank_reaching_it():
    w = weight_with_spectrum(torch.tensor([3.0, 2.0, 1.0, 0.5, 0.1]))  # energies 9, 4, 1, .25, .01 of 14.26
    assert rank_for(w, SvdConfig(energy=0.6)) == 1
    assert rank_for(w, SvdConfig(energy=0.9)) == 2
    assert rank_for(w, SvdConfig(energy=0.95)) == 3
    assert rank_for(w, SvdConfig(rank=4)) == 4


def test_rank_k_error_is_the_dropped_energy():
    sigma = torch.tensor([3.0, 2.0, 1.0, 0.5, 0.1])
    base = torch.nn.Linear(10, 12)
    with torch.no_grad():
        base.weight.copy_(weight_with_spectrum(sigma))
    layer = SvdLinear(base, SvdConfig(rank=2, lora_r=0))
    error = torch.linalg.matrix_norm(layer.dense_weight() - base.weight) ** 2
    torch.testing.assert_close(error, (sigma[2:] ** 2).sum(), rtol=1e-4, atol=1e-5)
    x = torch.randn(3, 10)
    torch.testing.assert_close(layer.merged()(x), layer(x), rtol=1e-5, atol=1e-5)


def test_compression_report(tiny_bert):
    cfg = SvdConfig(rank=4, target_modules=["intermediate.dense"])
    model = prepare_model(lc.load_base(tiny_bert, "sequence-classification"), "svd", cfg)
    report = compression_report(model)
    assert report["compressed_layers"] == 2
    assert report["dense_params"] == 2 * 32 * 64 and report["factored_params"] == 2 * 4 * (32 + 64)
    assert report["compression_ratio"] == (32 * 64) / (4 * 96)
    assert report["model_params_before"] - report["model_params_after"] == 2 * (32 * 64 - 4 * 96)
