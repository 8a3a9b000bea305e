"""LoRA layers: linear (optionally DoRA), GPT-2 Conv1D and embedding wrappers that keep the base parameter names."""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F
from transformers.pytorch_utils import Conv1D

from ..models.kernels import lora_linear
from ..models.kernels.lora import mm_fp32


class LoraLinear(nn.Linear):
    """nn.Linear whose frozen weight/bias keep their names, plus fp32 `lora_A`/`lora_B` (and, for DoRA, a trained
    per-output `lora_magnitude`). Keeping the base parameter names means the injected model's state_dict is the
    base's plus lora keys, and merging gives back exactly the base layout."""

    transposed = False  # Conv1D stores its weight as (in, out)

    def __init__(self, base: nn.Module, r: int, scale: float, dropout: float):
        nn.Module.__init__(self)
        out_features, in_features = _out_in(base.weight, self.transposed)
        self.in_features, self.out_features = in_features, out_features
        self.weight, self.bias = base.weight, base.bias
        device = base.weight.device
        # Master weights stay fp32 whatever the base dtype; forward casts them to the compute dtype.
        self.lora_A = nn.Parameter(torch.empty(r, in_features, device=device, dtype=torch.float32))
        self.lora_B = nn.Parameter(torch.zeros(out_features, r, device=device, dtype=torch.float32))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # B = 0 makes the update start at zero (Sec. 4.1)
        self.scale, self.dropout_p = scale, dropout
        self.lora_magnitude = None

    def enable_dora(self) -> None:
        """DoRA (Liu et al. 2024, Sec. 4.1): a trained magnitude m, initialised to ||W + s·B·A||_c, so the layer
        starts as it was."""
        self.lora_magnitude = nn.Parameter(self.weight_norm().to(self.lora_A.device))

    def base_weight(self) -> torch.Tensor:
        """The frozen weight as (out, in), a view for Conv1D."""
        return self.weight.t() if self.transposed else self.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.lora_magnitude is None:
            return lora_linear(x, self.base_weight(), self.bias, self.lora_A, self.lora_B, self.scale,
                               self.dropout_p, self.training)
        # DoRA: m / ||W + sBA||_c * (x Wᵀ + s x Aᵀ Bᵀ) + bias. The norm is a constant for backprop
        # (Liu et al. 2024, Sec. 4.3), so the LoRA kernel does the matmuls and only an (out,) vector is new.
        out = lora_linear(x, self.base_weight(), None, self.lora_A, self.lora_B, self.scale, self.dropout_p,
                          self.training)
        out = out * (self.lora_magnitude / self.weight_norm()).to(out.dtype)
        return out if self.bias is None else out + self.bias.to(out.dtype)

    @torch.no_grad()
    def weight_norm(self) -> torch.Tensor:
        """Row norms ||W + s·B·A||_c in fp32, without forming the (out, in) sum:
        ||W_i||² + 2s·Σ_k B_ik (W Aᵀ)_ik + s²·B_i (A Aᵀ) B_iᵀ."""
        w = self.base_weight()
        a, b, s = self.lora_A.float(), self.lora_B.float(), self.scale
        sq = torch.linalg.vector_norm(w, dim=1, dtype=torch.float32).square()
        if w.is_meta:
            return sq.to(self.lora_A.device)
        cross = (mm_fp32(w, a.t().to(w.dtype)).float() * b).sum(1)
        low_rank = ((b @ (a @ a.t())) * b).sum(1)
        return (sq + 2 * s * cross + s * s * low_rank).clamp_min(0).sqrt()

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_B.float() @ self.lora_A.float()) * self.scale

    def merged_weight(self) -> torch.Tensor:
        """The folded (out, in) weight in fp32."""
        weight = self.base_weight().float() + self.delta_weight()
        if self.lora_magnitude is not None:
            weight = weight * (self.lora_magnitude.float() / torch.linalg.vector_norm(weight, dim=1))[:, None]
        return weight

    def merged(self) -> nn.Module:
        """A plain nn.Linear with the update folded in (computed in fp32, cast to the base dtype)."""
        plain = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                          device=self.weight.device, dtype=self.weight.dtype)
        return _copy_into(plain, self.merged_weight(), self.bias)

    @torch.no_grad()
    def pissa_init(self) -> None:
        """PiSSA (Meng et al. 2024, Sec. 3): A, B from the top-r singular triplets of W, so s·B·A = U_r S_r V_rᵀ,
        and the frozen weight keeps the residual W - s·B·A."""
        r = self.lora_A.shape[0]
        weight = self.base_weight()
        if weight.is_meta:
            return
        u, s, vh = torch.linalg.svd(weight.float(), full_matrices=False)
        root = (s[:r] / self.scale).sqrt()
        self.lora_A.copy_(root[:, None] * vh[:r])
        self.lora_B.copy_(u[:, :r] * root[None, :])
        residual = weight.float() - self.delta_weight()
        self.weight.copy_((residual.t() if self.transposed else residual).to(self.weight.dtype))

    def extra_repr(self) -> str:
        dora = ", dora" if self.lora_magnitude is not None else ""
        return f"{self.in_features}, {self.out_features}, r={self.lora_A.shape[0]}, scale={self.scale:g}{dora}"


class LoraConv1D(LoraLinear):
    """LoRA on GPT-2's Conv1D (y = x W + b, W stored as (in, out)); A/B keep the linear (out, in) convention."""

    transposed = True

    def __init__(self, base: Conv1D, r: int, scale: float, dropout: float):
        super().__init__(base, r, scale, dropout)
        self.nf, self.nx = self.out_features, self.in_features  # Conv1D's own attribute names

    def merged(self) -> nn.Module:
        plain = Conv1D(self.out_features, self.in_features).to(device=self.weight.device, dtype=self.weight.dtype)
        return _copy_into(plain, self.merged_weight().t(), self.bias)


class LoraEmbedding(nn.Embedding):
    """nn.Embedding plus a low-rank update of its table: row i gains s·(B·A)[:, i]. `lora_A` is
    (r, num_embeddings) and starts at zero, `lora_B` (dim, r) is random, so the update starts at zero."""

    def __init__(self, base: nn.Embedding, r: int, scale: float):
        nn.Module.__init__(self)
        for attr in ("num_embeddings", "embedding_dim", "padding_idx", "max_norm", "norm_type",
                     "scale_grad_by_freq", "sparse"):
            setattr(self, attr, getattr(base, attr))
        self.weight = base.weight
        device = base.weight.device
        self.lora_A = nn.Parameter(torch.zeros(r, self.num_embeddings, device=device, dtype=torch.float32))
        self.lora_B = nn.Parameter(torch.empty(self.embedding_dim, r, device=device, dtype=torch.float32))
        nn.init.normal_(self.lora_B)
        self.scale = scale

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out = super().forward(ids)
        low = F.embedding(ids, self.lora_A.t(), padding_idx=self.padding_idx)  # only the looked-up rows
        return out + (low @ self.lora_B.t()).mul(self.scale).to(out.dtype)

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_B.float() @ self.lora_A.float()).t() * self.scale

    def merged(self) -> nn.Embedding:
        plain = nn.Embedding(self.num_embeddings, self.embedding_dim, padding_idx=self.padding_idx,
                             device=self.weight.device, dtype=self.weight.dtype)
        with torch.no_grad():
            plain.weight.copy_((self.weight.float() + self.delta_weight()).to(self.weight.dtype))
        return plain

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, r={self.lora_A.shape[0]}, scale={self.scale:g}"


def _out_in(weight: torch.Tensor, transposed: bool) -> tuple[int, int]:
    rows, cols = weight.shape
    return (cols, rows) if transposed else (rows, cols)


def _copy_into(plain: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Module:
    with torch.no_grad():
        plain.weight.copy_(weight.to(plain.weight.dtype))
        if bias is not None:
            plain.bias.copy_(bias)
    return plain
