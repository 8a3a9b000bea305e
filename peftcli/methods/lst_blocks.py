"""Ladder side-tuning's side blocks: reduced-width transformer blocks pruned from the backbone's (Sung et al. 2022)."""
from __future__ import annotations

import copy
import dataclasses

import torch
from torch import nn
from torch.nn import functional as F

from ..errors import UserError


@dataclasses.dataclass(frozen=True)
class Family:
    """Where one architecture keeps a block's weights (names relative to the block) and how the block is wired."""

    q: str
    k: str
    v: str
    o: str
    ffn_in: tuple[str, ...]  # (gate, up) for gated FFNs, else (in,)
    ffn_out: str
    act: str
    norms: tuple[str, str]  # (attention norm, FFN norm)
    post_norm: bool  # BERT normalises after each residual add; Llama and ViT before each sublayer
    rotary: bool  # rotary position embeddings, handed to each block as `position_embeddings`


FAMILIES = (
    Family("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
           ("intermediate.dense",), "output.dense", "intermediate.intermediate_act_fn",
           ("attention.output.LayerNorm", "output.LayerNorm"), post_norm=True, rotary=False),  # BERT, MiniLM
    Family("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           ("mlp.gate_proj", "mlp.up_proj"), "mlp.down_proj", "mlp.act_fn",
           ("input_layernorm", "post_attention_layernorm"), post_norm=False, rotary=True),  # Llama, Mistral, Qwen2
    Family("attention.q_proj", "attention.k_proj", "attention.v_proj", "attention.o_proj",
           ("mlp.fc1",), "mlp.fc2", "mlp.activation_fn",
           ("layernorm_before", "layernorm_after"), post_norm=False, rotary=False),  # ViT (transformers 5)
)


def family_of(block: nn.Module) -> Family:
    names = dict(block.named_modules())
    for family in FAMILIES:
        if all(n in names for n in (family.q, family.k, family.v, family.o, *family.ffn_in, family.ffn_out,
                                    family.act, *family.norms)):
            return family
    raise UserError("method.name: lst builds its side blocks from BERT-like (attention.self.query, ...), "
                    "Llama-like (self_attn.q_proj, mlp.gate_proj, ...) or ViT blocks; this model's blocks are "
                    "none of these, pick another method")


@dataclasses.dataclass(frozen=True)
class Geometry:
    """Backbone attention shape and the side block's reduced one."""

    heads: int
    kv_heads: int
    head_dim: int
    side_heads: int
    ffn: int  # side FFN size: the backbone's intermediate size / r

    def side_head_dim(self, width: int) -> int:
        return width // self.side_heads


def side_heads(width: int, heads: int, head_dim: int, rotary: bool) -> int:
    """The most heads (at most the backbone's) that split the side width evenly; rotary heads need even sizes."""
    for count in range(min(heads, width), 0, -1):
        size = width // count
        if width % count == 0 and size <= head_dim and (not rotary or size % 2 == 0):
            return count
    raise UserError(f"method.reduction_factor: a side width of {width} cannot be split into attention heads of "
                    f"this model (at most {heads} heads of {head_dim}{', even' if rotary else ''}); "
                    "pick a reduction_factor that leaves an even width divisible by a head count")


def importance(weight: torch.Tensor) -> torch.Tensor:
    """Importance of each output unit: the L1 norm of its weights (Li et al. 2017), as LST's pruning does."""
    return weight.detach().float().abs().sum(dim=1)


def top(scores: torch.Tensor, count: int) -> torch.Tensor:
    """Indices of the `count` largest scores, in their original order. A meta-device model (parameter counting
    before loading) has no values to rank, only shapes: any `count` indices do."""
    if scores.is_meta:
        return torch.arange(count, device="cpu")
    return scores.topk(count).indices.sort().values


def _qk_dims(scores: torch.Tensor, size: int, rotary: bool) -> torch.Tensor:
    """The query/key dims one side head keeps. Rotary embeddings rotate dim t with dim t + head_dim/2, so those
    are kept as pairs, in the same half-split order, so that rotate_half still pairs them."""
    if not rotary:
        return top(scores, size)
    half = scores.numel() // 2
    pairs = top(scores[:half] + scores[half:], size // 2)
    return torch.cat([pairs, pairs + half])


def attention_indices(block: nn.Module, family: Family, geo: Geometry, width: int):
    """Rows of q, k, v and columns of o kept for the side heads, plus each side head's kept query/key dims.
    Keeps the side_heads most important backbone heads, then in each the most important dims; grouped key/value
    heads are copied per query head, so the side attention is plain multi-head."""
    wq, wk, wv = (block.get_submodule(n).weight for n in (family.q, family.k, family.v))
    dim, group = geo.head_dim, geo.heads // geo.kv_heads
    qk = importance(wq).view(geo.heads, dim) + importance(wk).view(geo.kv_heads, dim).repeat_interleave(group, 0)
    v = importance(wv).view(geo.kv_heads, dim).repeat_interleave(group, 0)
    rows = {"q": [], "k": [], "v": [], "o": [], "dims": []}
    size = geo.side_head_dim(width)
    for head in top((qk + v).sum(dim=1), geo.side_heads).tolist():
        dims, kv = _qk_dims(qk[head], size, family.rotary), head // group
        kept_v = top(v[head], size)
        rows["q"].append(head * dim + dims)
        rows["k"].append(kv * dim + dims)
        rows["v"].append(kv * dim + kept_v)
        rows["o"].append(head * dim + kept_v)
        rows["dims"].append(dims)
    return {name: torch.stack(parts) if name == "dims" else torch.cat(parts) for name, parts in rows.items()}


def pruned_linear(linear: nn.Linear, rows: torch.Tensor, cols: torch.Tensor) -> nn.Linear:
    """A new fp32 linear layer holding linear's weight[rows][:, cols] (and bias[rows])."""
    weight = linear.weight.detach()[rows][:, cols].float()
    out = nn.Linear(len(cols), len(rows), bias=linear.bias is not None, device=weight.device)
    with torch.no_grad():
        out.weight.copy_(weight)
        if linear.bias is not None:
            out.bias.copy_(linear.bias.detach()[rows].float())
    return out


def pruned_norm(norm: nn.Module, keep: torch.Tensor) -> nn.Module:
    """The backbone norm restricted to the kept hidden dims: LayerNorm, or RMSNorm (no bias, `variance_epsilon`)."""
    weight = norm.weight.detach()[keep].float()
    if isinstance(norm, nn.LayerNorm):
        out = nn.LayerNorm(len(keep), eps=norm.eps, bias=norm.bias is not None, device=weight.device)
    else:
        out = nn.RMSNorm(len(keep), eps=getattr(norm, "variance_epsilon", None), device=weight.device)
    with torch.no_grad():
        out.weight.copy_(weight)
        if getattr(out, "bias", None) is not None:
            out.bias.copy_(norm.bias.detach()[keep].float())
    return out


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat([-second, first], dim=-1)


class SideAttention(nn.Module):
    """Multi-head self-attention of the side width. `mask` is a boolean [batch, 1, L, L] (True = may attend);
    `rope` the backbone's (cos, sin), [batch, L, head_dim], of which each head takes its kept dims."""

    def __init__(self, q: nn.Linear, k: nn.Linear, v: nn.Linear, o: nn.Linear, heads: int, rope_dims):
        super().__init__()
        self.q, self.k, self.v, self.o, self.heads = q, k, v, o, heads
        # Which backbone head dims each side head kept, to pick their rotary frequencies; rebuilt by inject, so
        # not part of the saved state.
        self.register_buffer("rope_dims", rope_dims, persistent=False)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, rope) -> torch.Tensor:
        batch, length, _ = x.shape
        q, k, v = (proj(x).view(batch, length, self.heads, -1).transpose(1, 2) for proj in (self.q, self.k, self.v))
        if rope is not None:
            cos, sin = (t[..., self.rope_dims].transpose(1, 2) for t in rope)  # [batch, heads, L, side head dim]
            q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.o(out.transpose(1, 2).reshape(batch, length, -1))


class SideBlock(nn.Module):
    """One side transformer block: attention + FFN with the backbone family's norms and residuals."""

    def __init__(self, attn: SideAttention, ffn_in: list[nn.Linear], ffn_out: nn.Linear, act: nn.Module,
                 norms: list[nn.Module], post_norm: bool):
        super().__init__()
        self.attn, self.ffn_in, self.ffn_out, self.act = attn, nn.ModuleList(ffn_in), ffn_out, act
        self.norms, self.post_norm = nn.ModuleList(norms), post_norm

    def ffn(self, x: torch.Tensor) -> torch.Tensor:
        if len(self.ffn_in) == 2:  # gated (SwiGLU): act(gate(x)) * up(x)
            return self.ffn_out(self.act(self.ffn_in[0](x)) * self.ffn_in[1](x))
        return self.ffn_out(self.act(self.ffn_in[0](x)))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, rope) -> torch.Tensor:
        if self.post_norm:
            x = self.norms[0](x + self.attn(x, mask, rope))
            return self.norms[1](x + self.ffn(x))
        x = x + self.attn(self.norms[0](x), mask, rope)
        return x + self.ffn(self.norms[1](x))


def pruned_block(block: nn.Module, family: Family, geo: Geometry, keep: torch.Tensor) -> SideBlock:
    """A side block initialised by structural pruning of `block` (LST, Sec. 3 "network pruning"): every weight
    matrix keeps the side hidden dims `keep` and its most important output units by L1 norm (Li et al. 2017)."""
    get = block.get_submodule
    idx = attention_indices(block, family, geo, len(keep))
    attn = SideAttention(pruned_linear(get(family.q), idx["q"], keep), pruned_linear(get(family.k), idx["k"], keep),
                         pruned_linear(get(family.v), idx["v"], keep), pruned_linear(get(family.o), keep, idx["o"]),
                         geo.side_heads, idx["dims"])
    scores = sum(importance(get(name).weight) for name in family.ffn_in)
    units = top(scores, geo.ffn)
    ffn_in = [pruned_linear(get(name), units, keep) for name in family.ffn_in]
    norms = [pruned_norm(get(name), keep) for name in family.norms]
    return SideBlock(attn, ffn_in, pruned_linear(get(family.ffn_out), keep, units), copy.deepcopy(get(family.act)),
                     norms, family.post_norm)
