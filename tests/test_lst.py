"""Ladder side-tuning: pruned attention side blocks, masking, causality, and a backbone run without autograd."""
from __future__ import annotations

import re

import pytest
import torch

from peftcli.methods import bottleneck as bn
from peftcli.methods import lst
from peftcli.models.loading import auto_class
from test_lifecycle import perturb
from peftcli.methods.install import prepare_model

TASKS = {"bert": "sequence-classification", "llama": "causal-lm"}


def load(folder, kind: str, r: int = 8):
    base = auto_class(TASKS[kind]).from_pretrained(folder)
    return prepare_model(base, "lst", lst.LstConfig(reduction_factor=r)).eval()


def l1(weight):
    return weight.detach().abs().sum(dim=1)


def top(scores, count):
    return scores.topk(count).indices.sort().values


def test_side_blocks_are_attention_blocks_pruned_from_the_backbone(tiny_bert):
    """Sung et al. 2022, Sec. 3: side weights are the backbone's, keeping the largest-L1 units of each matrix."""
    model = load(tiny_bert, "bert")
    layers = model.bert.encoder.layer
    keep = top(sum(l1(x.attention.output.dense.weight) + l1(x.output.dense.weight) for x in layers), 32 // 8)
    for layer, block in zip(layers, model.lst_side.blocks):
        self_attn = layer.attention.self
        qk = (l1(self_attn.query.weight) + l1(self_attn.key.weight)).view(2, 16)  # 2 heads of 16
        rows = torch.cat([head * 16 + top(qk[head], 2) for head in range(2)])  # side width 4 = 2 heads of 2
        assert torch.equal(block.attn.q.weight, self_attn.query.weight[rows][:, keep])
        assert torch.equal(block.attn.k.weight, self_attn.key.weight[rows][:, keep])
        assert torch.equal(block.attn.q.bias, self_attn.query.bias[rows])
        units = top(l1(layer.intermediate.dense.weight), 64 // 8)
        assert torch.equal(block.ffn_in[0].weight, layer.intermediate.dense.weight[units][:, keep])
        assert torch.equal(block.ffn_out.weight, layer.output.dense.weight[keep][:, units])
        assert torch.equal(block.norms[1].weight, layer.output.LayerNorm.weight[keep])
        assert block.attn.o.weight.shape == (4, 4) and block.post_norm


def capture(model, kind):
    """Run a padded batch; return each backbone block's (input, output) and each side block's (mask, rope)."""
    blocks = [model.get_submodule(s.block) for s in sorted(bn.find_sites(model), key=lambda s: s.layer)]
    seen, hooks = {"backbone": [], "side": []}, []
    for block in blocks:
        hooks.append(block.register_forward_hook(
            lambda m, args, kwargs, out: seen["backbone"].append(
                ((args[0] if args else kwargs["hidden_states"]), out[0] if isinstance(out, tuple) else out)),
            with_kwargs=True))
    for block in model.lst_side.blocks:
        hooks.append(block.register_forward_pre_hook(lambda m, args: seen["side"].append(args[1:])))
    ids = torch.randint(8, 60, (2, 10), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    for hook in hooks:
        hook.remove()
    return seen, mask.bool()


@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_full_width_side_blocks_reproduce_the_backbone_blocks(kind, request):
    """With r = 1 nothing is pruned, so each side block must compute exactly its backbone block: attention with
    the same heads (grouped key/value heads, rotary dims), FFN, norms and residuals."""
    model = load(request.getfixturevalue(f"tiny_{kind}"), kind, r=1)
    seen, real = capture(model, kind)
    for (x, out), (mask, rope), block in zip(seen["backbone"], seen["side"], model.lst_side.blocks):
        side_out = block(x.float(), mask, rope)
        torch.testing.assert_close(side_out[real], out[real], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_side_attention_mixes_tokens_but_ignores_padding(kind, request):
    model = load(request.getfixturevalue(f"tiny_{kind}"), kind)
    side = model.lst_side
    side.padding = torch.tensor([[1] * 6 + [0] * 4])
    mask = side.attention_mask(10, "cpu")
    block = side.blocks[0]
    x = torch.randn(1, 10, block.ffn_out.out_features, generator=torch.Generator().manual_seed(0))
    other_padding, other_token = x.clone(), x.clone()
    other_padding[:, 6:] += 3.0
    other_token[:, 0] += 3.0
    with torch.no_grad():
        out, out_padding, out_token = (block(v, mask, None) for v in (x, other_padding, other_token))
    torch.testing.assert_close(out_padding[:, :6], out[:, :6])
    assert not torch.allclose(out_token[:, 5], out[:, 5]), "token 5 does not attend to token 0"


def test_padding_leaves_the_real_tokens_states_unchanged(tiny_bert):
    """The backbone's last hidden state plus the side network's output, at the real tokens."""
    model = load(tiny_bert, "bert")
    perturb(model)
    last = []
    model.bert.encoder.layer[-1].register_forward_hook(lambda m, args, out: last.append(out))
    ids = torch.randint(8, 60, (1, 6), generator=torch.Generator().manual_seed(0))
    padded = torch.cat([ids, torch.full((1, 4), 9)], dim=1)
    mask = torch.cat([torch.ones(1, 6), torch.zeros(1, 4)], dim=1).long()
    with torch.no_grad():
        model(input_ids=ids)
        model(input_ids=padded, attention_mask=mask)
    torch.testing.assert_close(last[1][:, :6], last[0], atol=1e-6, rtol=1e-5)


def test_causal_side_attention_hides_future_tokens(tiny_llama, tiny_bert):
    model = load(tiny_llama, "llama")
    assert model.lst_side.causal and not load(tiny_bert, "bert").lst_side.causal
    perturb(model)
    block = model.lst_side.blocks[0]
    mask = model.lst_side.attention_mask(8, "cpu")
    x = torch.randn(1, 8, block.ffn_out.out_features, generator=torch.Generator().manual_seed(0))
    future, past = x.clone(), x.clone()
    future[:, 5:] += 3.0
    past[:, 0] += 3.0
    with torch.no_grad():
        out, out_future, out_past = (block(v, mask, None) for v in (x, future, past))
    torch.testing.assert_close(out_future[:, :5], out[:, :5])
    assert not torch.allclose(out_past[:, 4], out[:, 4]), "token 4 does not attend to token 0"
    ids = torch.randint(8, 60, (1, 8), generator=torch.Generator().manual_seed(1))
    changed = ids.clone()
    changed[:, 5:] = 7
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=changed).logits[:, :5], model(input_ids=ids).logits[:, :5])


@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_backbone_runs_without_autograd(kind, request):
    """The memory point of LST (Sec. 1): even with trainable weights, the backbone builds no graph."""
    model = load(request.getfixturevalue(f"tiny_{kind}"), kind).train()
    perturb(model)
    backbone = [p for n, p in model.named_parameters()  # embeddings and blocks; layers after them pass gradients on
                if "lst_side" not in n and re.search(r"\.layers?\.|embed", n)]
    for p in backbone:
        p.requires_grad_(True)
    first = model.get_submodule(bn.find_sites(model)[0].block)
    graphs = []
    first.register_forward_hook(lambda m, args, out: graphs.append((out[0] if isinstance(out, tuple) else out)
                                                                   .requires_grad))
    ids = torch.randint(8, 60, (2, 8))
    labels = torch.tensor([0, 1]) if kind == "bert" else ids
    model(input_ids=ids, labels=labels).loss.backward()
    assert graphs == [False], "the backbone's first block built an autograd graph"
    assert torch.is_grad_enabled()
    assert all(p.grad is None for p in backbone)
    assert all(p.grad is not None for n, p in model.named_parameters() if "lst_side" in n)
    with pytest.raises(IndexError):
        model(input_ids=torch.full((1, 4), 10_000))  # out of vocabulary: fails inside the backbone
    assert torch.is_grad_enabled(), "an error inside the backbone left autograd off"


def test_meta_device_model_gets_the_same_side_network(tiny_bert):
    """`peft train` counts parameters on a meta-device skeleton first: pruning must work without values."""
    config = auto_class(TASKS["bert"]).from_pretrained(tiny_bert).config
    with torch.device("meta"):
        skeleton = prepare_model(auto_class(TASKS["bert"]).from_config(config), "lst", lst.LstConfig())
    real = load(tiny_bert, "bert")
    assert {n: p.shape for n, p in skeleton.named_parameters() if p.requires_grad} == \
        {n: p.shape for n, p in real.named_parameters() if p.requires_grad}
