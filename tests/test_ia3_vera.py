"""IA3 and VeRA: where they act, identity at init, folding into the weights, VeRA's shared frozen projection."""
from __future__ import annotations

import torch
from torch import nn

import test_lifecycle as lc
from peftcli.methods import ia3, vera
from peftcli.files import FORMAT_VERSION, TENSORS
from peftcli.methods.install import prepare_model
from peftcli.methods.tensors import load_tensors_into, save_trained


def test_ia3_default_targets_are_keys_values_and_ffn_down_projections(tiny_models):
    bert = ia3.inject(lc.load_base(tiny_models["sequence-classification"], "sequence-classification"),
                      ia3.Ia3Config())
    scaled = {n: m.feedforward for n, m in bert.named_modules() if isinstance(m, ia3.Ia3Linear)}
    assert scaled == {f"bert.encoder.layer.{i}.{name}": ff for i in range(2) for name, ff in
                      [("attention.self.key", False), ("attention.self.value", False), ("output.dense", True)]}
    llama = ia3.inject(lc.load_base(tiny_models["causal-lm"], "causal-lm"), ia3.Ia3Config())
    scaled = {n.split(".", 3)[-1]: m.feedforward for n, m in llama.named_modules() if isinstance(m, ia3.Ia3Linear)}
    assert scaled == {"self_attn.k_proj": False, "self_attn.v_proj": False, "mlp.down_proj": True}


def test_ia3_starts_at_identity_and_folds_into_weight_and_bias():
    torch.manual_seed(0)
    base = nn.Linear(6, 4)
    x = torch.randn(3, 6)
    expected = base(x)
    for feedforward in (False, True):
        layer = ia3.Ia3Linear(base, feedforward)
        assert layer.ia3_l.shape == ((1, 6) if feedforward else (4, 1)) and bool((layer.ia3_l == 1).all())
        torch.testing.assert_close(layer(x), expected, rtol=0, atol=0)
        with torch.no_grad():
            layer.ia3_l.uniform_(0.5, 1.5)
        l = layer.ia3_l.flatten()
        by_hand = (x * l) @ base.weight.t() + base.bias if feedforward else (x @ base.weight.t() + base.bias) * l
        torch.testing.assert_close(layer(x), by_hand)
        torch.testing.assert_close(layer.merged()(x), by_hand, rtol=1e-6, atol=1e-6)


def test_vera_shares_one_frozen_projection_and_starts_at_identity(tiny_llama):
    task = "causal-lm"
    base_out = lc.outputs(lc.load_base(tiny_llama, task), lc.sample_inputs(task))
    cfg = vera.VeraConfig(r=16)
    model = prepare_model(lc.load_base(tiny_llama, task), "vera", cfg)
    layers = [m for m in model.modules() if isinstance(m, vera.VeraLinear)]
    assert len(layers) == 4  # q_proj and v_proj in 2 layers
    projection = model.vera_projection
    assert all(m._projection[0] is projection for m in layers)
    assert not projection.vera_A.requires_grad and projection.vera_A.shape == (16, 32)
    assert projection.vera_B.shape == (32, 16)  # q_proj's 32 outputs: the largest (v_proj has 16)
    assert all(bool((m.vera_lambda_d == 0.1).all()) and not m.vera_lambda_b.any() for m in layers)
    torch.testing.assert_close(lc.outputs(model, lc.sample_inputs(task)), base_out, rtol=0, atol=0)
    trainable = {n.rsplit(".", 1)[-1] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"vera_lambda_d", "vera_lambda_b"}


def test_vera_projection_is_seeded_saved_and_restored_from_the_run(tiny_llama, tmp_path):
    task = "causal-lm"
    first = prepare_model(lc.load_base(tiny_llama, task), "vera", vera.VeraConfig(r=16, projection_seed=3))
    again = prepare_model(lc.load_base(tiny_llama, task), "vera", vera.VeraConfig(r=16, projection_seed=3))
    other = prepare_model(lc.load_base(tiny_llama, task), "vera", vera.VeraConfig(r=16, projection_seed=4))
    assert torch.equal(first.vera_projection.vera_A, again.vera_projection.vera_A)
    assert not torch.equal(first.vera_projection.vera_A, other.vera_projection.vera_A)
    lc.perturb(first)
    trained = lc.outputs(first, lc.sample_inputs(task))
    save_trained(first, tmp_path, {"method": "vera", "format_version": FORMAT_VERSION})
    # The saved A, B win over whatever the generator gives at load time.
    load_tensors_into(other, tmp_path / TENSORS)
    torch.testing.assert_close(lc.outputs(other, lc.sample_inputs(task)), trained, rtol=0, atol=0)


def test_vera_merge_adds_b_B_d_A_and_drops_the_projection(tiny_bert):
    task = "sequence-classification"
    cfg = vera.VeraConfig(r=8)
    model = prepare_model(lc.load_base(tiny_bert, task), "vera", cfg)
    lc.perturb(model)
    layer = model.bert.encoder.layer[0].attention.self.query
    a, b = model.vera_projection.vera_A, model.vera_projection.vera_B
    by_hand = layer.weight + torch.diag(layer.vera_lambda_b) @ b @ torch.diag(layer.vera_lambda_d) @ a
    merged = vera.merge(model, cfg)
    assert not hasattr(merged, "vera_projection")
    torch.testing.assert_close(merged.bert.encoder.layer[0].attention.self.query.weight, by_hand)
