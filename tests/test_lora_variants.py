"""LoRA options against the papers: identity at init, DoRA's decomposition, PiSSA's residual, patterns, targets."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import test_lifecycle as lc
from peftcli.errors import UserError
from peftcli.methods.lora import LoraConfig, METHOD, inject
from peftcli.methods.lora_layers import LoraConv1D, LoraEmbedding, LoraLinear
from peftcli.files import FORMAT_VERSION, TENSORS
from peftcli.methods.install import prepare_model
from peftcli.methods.tensors import load_tensors_into, save_trained


def linear(seed: int = 0, out_features: int = 12, in_features: int = 20, dtype=torch.float32) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(in_features, out_features).to(dtype)


def test_lora_with_b_zero_is_the_identity():
    base = linear()
    x = torch.randn(3, 5, 20)
    expected = base(x)
    layer = LoraLinear(base, r=4, scale=2.0, dropout=0.0)
    assert torch.count_nonzero(layer.lora_B) == 0 and torch.count_nonzero(layer.lora_A) > 0
    torch.testing.assert_close(layer(x), expected, rtol=0, atol=1e-6)


def test_dora_decomposition_reproduces_w_at_init():
    base = linear()
    weight = base.weight.detach().clone()
    layer = LoraLinear(base, r=4, scale=2.0, dropout=0.0)
    layer.enable_dora()
    # Liu et al. 2024, Eq. 2: W = m · V / ||V||_c with m = ||W||_c and V = W at init.
    torch.testing.assert_close(layer.lora_magnitude.detach(), weight.norm(dim=1))
    torch.testing.assert_close(layer.merged_weight(), weight)
    x = torch.randn(4, 20)
    torch.testing.assert_close(layer(x), x @ weight.t() + base.bias, rtol=1e-5, atol=1e-5)


def test_dora_norm_without_the_full_matrix_equals_the_direct_norm():
    layer = LoraLinear(linear(), r=4, scale=2.0, dropout=0.0)
    with torch.no_grad():
        layer.lora_B.normal_()
    direct = (layer.weight + layer.delta_weight()).norm(dim=1)
    torch.testing.assert_close(layer.weight_norm(), direct, rtol=1e-5, atol=1e-5)


def test_dora_magnitude_learns_and_norm_is_detached():
    layer = LoraLinear(linear(), r=4, scale=2.0, dropout=0.0)
    layer.enable_dora()
    with torch.no_grad():
        layer.lora_B.normal_()
    layer(torch.randn(6, 20)).square().sum().backward()
    assert layer.lora_magnitude.grad is not None and layer.lora_A.grad is not None
    assert not layer.weight_norm().requires_grad  # Sec. 4.3: the norm is a constant for backprop


def test_pissa_residual_plus_adapter_reproduces_w_at_init():
    base = linear(out_features=16, in_features=24)
    weight = base.weight.detach().clone()
    x = torch.randn(5, 24)
    expected = base(x)
    layer = LoraLinear(base, r=4, scale=0.5, dropout=0.0)
    layer.pissa_init()
    u, s, vh = torch.linalg.svd(weight)
    # Meng et al. 2024, Sec. 3: the adapter holds the top-r singular part, the frozen weight the rest.
    torch.testing.assert_close(layer.delta_weight(), u[:, :4] @ torch.diag(s[:4]) @ vh[:4], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(layer.weight + layer.delta_weight(), weight, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.merged().weight, weight, rtol=1e-5, atol=1e-5)


def test_merge_computes_in_fp32_and_casts_once():
    base = linear(dtype=torch.bfloat16)
    layer = LoraLinear(base, r=4, scale=2.0, dropout=0.0)
    with torch.no_grad():
        layer.lora_B.normal_(std=1e-3)  # an update below bf16's resolution per element, unless added in fp32
    expected = (base.weight.float() + layer.lora_B @ layer.lora_A * 2.0).to(torch.bfloat16)
    assert torch.equal(layer.merged().weight, expected)


VARIANTS = {
    "dora": {"use_dora": True},
    "pissa": {"init": "pissa"},
    "rslora-patterns": {"use_rslora": True, "target_modules": "all-linear",
                        "rank_pattern": {r".*\.0\..*": 2}, "alpha_pattern": {"query|q_proj": 4.0}},
}


@pytest.mark.parametrize("task", ["sequence-classification", "causal-lm"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_variant_lifecycle(variant, task, tiny_models, tmp_path):
    """inject -> perturb -> save -> reload -> merge, as tests/test_lifecycle.py does for the defaults."""
    folder, cfg = tiny_models[task], LoraConfig(**VARIANTS[variant])
    base_out = lc.outputs(lc.load_base(folder, task), lc.sample_inputs(task))
    model = prepare_model(lc.load_base(folder, task), "lora", cfg)
    # Every variant starts as the base model (PiSSA up to the SVD's rounding).
    torch.testing.assert_close(lc.outputs(model, lc.sample_inputs(task)), base_out, rtol=1e-4, atol=1e-4)
    lc.perturb(model)
    trained = lc.outputs(model, lc.sample_inputs(task))
    save_trained(model, tmp_path, {"method": "lora", "format_version": FORMAT_VERSION})
    reloaded = prepare_model(lc.load_base(folder, task), "lora", cfg)
    load_tensors_into(reloaded, tmp_path / TENSORS)
    torch.testing.assert_close(lc.outputs(reloaded.eval(), lc.sample_inputs(task)), trained, rtol=0, atol=0)
    merged = METHOD.merge(reloaded, cfg)
    assert set(merged.state_dict()) == set(lc.load_base(folder, task).state_dict())
    torch.testing.assert_close(lc.outputs(merged, lc.sample_inputs(task)), trained, rtol=1e-4, atol=1e-4)


def test_rank_and_alpha_patterns_pick_per_module_values(tiny_bert):
    cfg = LoraConfig(r=8, alpha=16, rank_pattern={r"layer\.1\..*value": 2}, alpha_pattern={"query": 4})
    model = inject(lc.load_base(tiny_bert, "sequence-classification"), cfg)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, LoraLinear)}
    value1 = layers["bert.encoder.layer.1.attention.self.value"]
    assert value1.lora_A.shape[0] == 2 and value1.scale == 16 / 2
    assert layers["bert.encoder.layer.0.attention.self.value"].lora_A.shape[0] == 8
    assert layers["bert.encoder.layer.0.attention.self.query"].scale == 4 / 8


def test_patterns_that_match_nothing_or_do_not_compile_are_user_errors(tiny_bert):
    with pytest.raises(UserError, match="rank_pattern: 'k_proj' matches none"):
        inject(lc.load_base(tiny_bert, "sequence-classification"), LoraConfig(rank_pattern={"k_proj": 2}))
    assert "alpha_pattern" in METHOD.validate(LoraConfig(alpha_pattern={"query(": 2.0}))


def test_embedding_target_starts_at_identity_and_merges(tiny_llama):
    task = "causal-lm"
    base_out = lc.outputs(lc.load_base(tiny_llama, task), lc.sample_inputs(task))
    cfg = LoraConfig(r=4, target_modules=["embed_tokens"])
    model = inject(lc.load_base(tiny_llama, task), cfg)
    assert isinstance(model.model.embed_tokens, LoraEmbedding)
    torch.testing.assert_close(lc.outputs(model, lc.sample_inputs(task)), base_out, rtol=0, atol=0)
    lc.perturb(model)
    trained = lc.outputs(model, lc.sample_inputs(task))
    merged = METHOD.merge(model, cfg)
    assert type(merged.model.embed_tokens) is nn.Embedding
    torch.testing.assert_close(lc.outputs(merged, lc.sample_inputs(task)), trained, rtol=1e-5, atol=1e-5)


def test_tied_embedding_and_dora_on_embedding_are_refused(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    tied = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, tie_word_embeddings=True))
    with pytest.raises(UserError, match="tied"):
        inject(tied, LoraConfig(target_modules=["embed_tokens"]))
    with pytest.raises(UserError, match="use_dora applies to linear layers"):
        inject(tied, LoraConfig(target_modules=["embed_tokens"], use_dora=True))


def test_conv1d_targets_of_gpt2_merge_back_to_conv1d():
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=2, n_positions=32)).eval()
    ids = torch.randint(0, 64, (2, 10))
    base = model(ids).logits
    cfg = LoraConfig(r=4, target_modules="all-linear", use_dora=True)
    inject(model, cfg)
    wrapped = [m for m in model.modules() if isinstance(m, LoraConv1D)]
    assert len(wrapped) == 8  # c_attn, attn.c_proj, c_fc, mlp.c_proj in 2 blocks; lm_head is left alone
    torch.testing.assert_close(model(ids).logits, base, rtol=1e-5, atol=1e-5)
    lc.perturb(model)
    trained = model(ids).logits
    merged = METHOD.merge(model, cfg)
    assert type(merged.transformer.h[0].attn.c_attn) is Conv1D
    torch.testing.assert_close(merged(ids).logits, trained, rtol=1e-4, atol=1e-4)
