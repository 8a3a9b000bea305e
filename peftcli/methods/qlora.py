"""QLoRA (Dettmers et al. 2023): frozen base weights stored 4-bit NF4 (double-quantised) or 8-bit, LoRA on top.

Quantisation is bitsandbytes' (the QLoRA authors' library; 0.50 runs its NF4/int8 kernels on CPU as well as
CUDA). The base weight is quantised when the method is injected; the fp32 copy is dropped."""
from __future__ import annotations

import dataclasses
import logging
import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError
from ..config.schema import field, open_fraction, positive
from .lora import DEFAULT_TARGETS
from .registry import Method, match_targets, target_error
from ..models.modules import replace_module

logger = logging.getLogger("peftcli")
# NF4 block size 64 and second-level (double quantisation) block 256: QLoRA Sec. 3.
BLOCK_SIZE = 64


@dataclasses.dataclass
class QLoraConfig:
    r: int = field(8, check=positive, doc="rank of the LoRA update")
    alpha: float = field(16.0, check=positive, doc="scale numerator: update = (alpha / r) · B·A")
    dropout: float = field(0.0, check=open_fraction, doc="dropout on the adapter's input")
    target_modules: list[str] | str = field(factory=lambda: list(DEFAULT_TARGETS),
                                            doc="name suffixes, a regex, or all-linear")
    bits: Literal[4, 8] = field(4, doc="base weight precision: 4 (NF4/FP4 blocks of 64) or 8 (int8 per row)")
    quant_type: Literal["nf4", "fp4"] = field("nf4", doc="4-bit code: nf4 (QLoRA Sec. 3) or fp4")
    double_quant: bool = field(True, doc="quantise the 4-bit block scales again to 8 bits (QLoRA Sec. 3)")


def _bnb():
    try:
        import bitsandbytes
        import bitsandbytes.functional
    except ImportError as exc:
        raise UserError("method qlora needs bitsandbytes: pip install 'peftcli[qlora]' "
                        "(or pip install bitsandbytes)") from exc
    return bitsandbytes


class QLoraLinear(nn.Module):
    """A quantised frozen linear layer (non-persistent buffers, rebuilt from the base weights on inject) plus
    fp32 `lora_A`/`lora_B`. Forward: bnb's k-bit matmul of x with the base, plus scale · dropout(x)·Aᵀ·Bᵀ."""

    def __init__(self, base: nn.Linear, cfg: QLoraConfig):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.bits, self.dtype = cfg.bits, base.weight.dtype
        self.quant_type, self.double_quant = cfg.quant_type, cfg.double_quant
        device = base.weight.device
        self.bias = base.bias
        self.quant_state = None
        if base.weight.is_meta:  # shape-only skeleton (recipe validation): nothing to quantise
            self.register_buffer("qweight", torch.empty(0, device="meta"), persistent=False)
            self.register_buffer("row_scale", None, persistent=False)
        else:
            self._quantize(base.weight.data)
        r = cfg.r
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, device=device, dtype=torch.float32))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, device=device, dtype=torch.float32))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # B = 0: the update starts at zero (LoRA Sec. 4.1)
        self.scale, self.dropout = cfg.alpha / r, nn.Dropout(cfg.dropout)

    def dequantized(self) -> torch.Tensor:
        """The base weight as the forward pass sees it, in fp32."""
        functional = _bnb().functional
        if self.bits == 4:
            return functional.dequantize_4bit(self.qweight, self._state(self.qweight.device)).float()
        return functional.int8_vectorwise_dequant(self.qweight, self.row_scale).float()

    def _quantize(self, weight: torch.Tensor) -> None:
        """(Re)build the quantised buffers from a dense weight on its device."""
        functional = _bnb().functional
        if self.bits == 4:
            qweight, self.quant_state = functional.quantize_4bit(
                weight, blocksize=BLOCK_SIZE, quant_type=self.quant_type, compress_statistics=self.double_quant)
            row_scale = None
        else:  # bnb's CUDA int8 kernel takes fp16 only; a weight row's absmax fits fp16 for real models
            qweight, row_scale, _ = functional.int8_vectorwise_quant(weight.to(torch.float16))
        self.register_buffer("qweight", qweight, persistent=False)
        self.register_buffer("row_scale", row_scale, persistent=False)

    def _state(self, device):
        """The 4-bit state for `device`. `.to()` moves the code bytes but not the QuantState, and bnb's CPU and
        CUDA kernels need not share a code layout, so a moved layer is dequantised with the state it was built
        with and quantised again on its new device (NF4 values re-quantise to the same codes)."""
        old = self.quant_state.absmax.device
        if old != device:
            functional = _bnb().functional
            dense = functional.dequantize_4bit(self.qweight.to(old), self.quant_state)
            self._quantize(dense.to(device))
        return self.quant_state

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        if self.bits == 4:
            state = self._state(x.device)
            base = _bnb().matmul_4bit(x.to(self.dtype), self.qweight.t(), state, bias=bias).to(x.dtype)
        else:
            base = F.linear(x, self.dequantized().to(x.dtype), bias)
        update = (self.dropout(x).to(torch.float32) @ self.lora_A.T) @ self.lora_B.T
        return base + (update * self.scale).to(x.dtype)

    def merged(self) -> nn.Linear:
        """Dequantise, fold B·A in fp32, cast to the base dtype: the result carries the quantisation error."""
        plain = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                          device=self.qweight.device, dtype=self.dtype)
        with torch.no_grad():
            delta = (self.lora_B.float() @ self.lora_A.float()) * self.scale
            plain.weight.copy_((self.dequantized() + delta).to(self.dtype))
            if self.bias is not None:
                plain.bias.copy_(self.bias)
        return plain

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, bits={self.bits}, r={self.lora_A.shape[0]}"


def inject(model: nn.Module, cfg: QLoraConfig) -> nn.Module:
    names = match_targets(model, cfg.target_modules)
    if not names:
        raise UserError(f"method.{target_error(model, cfg.target_modules)}")
    for name in names:
        replace_module(model, name, QLoraLinear(model.get_submodule(name), cfg))
    return model


def merge(model: nn.Module, cfg: QLoraConfig) -> nn.Module:
    logger.warning("qlora merge: the base weights are dequantised from %d-bit, so the merged model differs from "
                   "the original base by the quantisation error (merging itself is fp32)", cfg.bits)
    for name, module in list(model.named_modules()):
        if isinstance(module, QLoraLinear):
            replace_module(model, name, module.merged())
    return model


METHOD = Method(
    name="qlora", summary="LoRA over 4-bit NF4 (double-quantised) or 8-bit frozen base weights (bitsandbytes)",
    config_cls=QLoraConfig, inject=inject, merge=merge,
    paper="Dettmers et al. 2023, QLoRA: Efficient Finetuning of Quantized LLMs")
