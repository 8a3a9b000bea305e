"""The bottleneck-adapter family's shared parts: finding attention/FFN sites, the bottleneck, wrappers, AdapterDrop."""
from __future__ import annotations

import dataclasses
import random
import re

import torch
from torch import nn
from torch.nn import functional as F

from ..errors import UserError
from .registry import MethodCallback
from .signatures import require_hidden_states_first

# Per transformer block: (attention input, attention output projection, FFN input, FFN output projection).
# Wrapping the output projections puts an adapter right after the projection and before BERT's
# dropout + residual + LayerNorm, which is the Houlsby placement (Houlsby et al. 2019, Fig. 2).
ARCHITECTURES = (
    ("attention", "attention.output.dense", "intermediate", "output.dense"),  # BERT, RoBERTa, MiniLM, ELECTRA
    ("self_attn", "self_attn.o_proj", "mlp", "mlp.down_proj"),               # Llama, Mistral, Qwen2, Gemma
    ("attention", "attention.o_proj", "mlp", "mlp.fc2"),                     # ViT (transformers 5 layout)
)
_BLOCK = re.compile(r"(?:.*\.)?(?:layers?|h|blocks?)\.(\d+)")
NORM_SUFFIXES = ("LayerNorm", "RMSNorm", "Norm")
# Houlsby et al. 2019, Sec. 3.6: near-identity init, weights ~ N(0, 1e-2) truncated at two standard deviations.
INIT_STD = 1e-2


@dataclasses.dataclass(frozen=True)
class Site:
    """One transformer block: its index, its name and the four module names adapters hook into."""

    layer: int
    block: str
    attn_in: str
    attn_out: str
    ffn_in: str
    ffn_out: str


def find_sites(model: nn.Module) -> list[Site]:
    """Every transformer block whose attention-output and FFN-output projections are recognised."""
    modules = dict(model.named_modules())
    sites = []
    for name in modules:
        match = _BLOCK.fullmatch(name)
        if not match:
            continue
        for arch in ARCHITECTURES:
            full = [f"{name}.{suffix}" for suffix in arch]
            if all(f in modules for f in full) and all(isinstance(modules[f], nn.Linear) for f in full[1::2]):
                sites.append(Site(int(match.group(1)), name, *full))
                break
    if not sites:
        raise UserError("method.name: found no transformer block with a known attention-output / FFN-output layer; "
                        "adapters support BERT-like (attention.output.dense, output.dense) and Llama-like "
                        "(self_attn.o_proj, mlp.down_proj) models")
    return sites


def activations() -> dict:
    # Imported on use: transformers.activations loads its kernel hub and model-loading stack (~0.7 s), which
    # `peft methods` and `--help` never need.
    from transformers.activations import ACT2FN

    return ACT2FN


def check_activation(name: str) -> str | None:
    return None if name in activations() else f"unknown nonlinearity {name!r}; use one of relu, gelu, silu, tanh"


class Bottleneck(nn.Module):
    """down-projection -> nonlinearity -> up-projection (fp32 master weights, computed in fp32)."""

    def __init__(self, dim: int, size: int, nonlinearity: str, device, init_std: float = INIT_STD,
                 zero_up: bool = False):
        super().__init__()
        self.down = nn.Linear(dim, size, device=device, dtype=torch.float32)
        self.up = nn.Linear(size, dim, device=device, dtype=torch.float32)
        self.act = activations()[nonlinearity]
        for linear in (self.down, self.up):
            nn.init.trunc_normal_(linear.weight, std=init_std, a=-2 * init_std, b=2 * init_std)
            nn.init.zeros_(linear.bias)
        if zero_up:  # parallel adapters start as a zero update (Chen et al. 2022, Sec. 3.2)
            nn.init.zeros_(self.up.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.act(self.down(x.float())))


class DropState:
    """Which lower layers skip their adapters (AdapterDrop, Rücklé et al. 2021): `train_skip` is redrawn each
    training step by DropCallback; `eval_skip` is fixed by the recipe."""

    def __init__(self, eval_skip: int = 0):
        self.train_skip, self.eval_skip = 0, eval_skip

    def skips(self, layer: int, training: bool) -> bool:
        return layer < (self.train_skip if training else self.eval_skip)


class AdaptedLinear(nn.Linear):
    """A frozen output projection (weight/bias keep their names) plus `adapter`, added to its output.
    serial: adapter(projection output) (Houlsby); parallel: adapter(the sublayer's input), captured by a pre-hook
    on the sublayer (He et al. 2022, Sec. 3.3)."""

    def __init__(self, base: nn.Linear, layer: int, adapter: nn.Module, parallel: bool, scale, drop: DropState):
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        self.adapter, self.layer, self.parallel, self.drop = adapter, layer, parallel, drop
        self.adapter_scale = scale
        self.captured: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight, self.bias)
        source, self.captured = (self.captured if self.parallel else out), None
        if self.drop.skips(self.layer, self.training):
            return out  # a skipped adapter costs nothing: AdapterDrop's inference speed-up
        return out + (self.adapter_scale * self.adapter(source)).to(out.dtype)

    def capture(self, module, args, kwargs) -> None:
        self.captured = args[0] if args else kwargs["hidden_states"]

    def extra_repr(self) -> str:
        kind = "parallel" if self.parallel else "serial"
        return f"{self.in_features}, {self.out_features}, layer={self.layer}, {kind}"


def attach(model: nn.Module, site: Site, where: str, adapter: nn.Module, parallel: bool, scale,
           drop: DropState) -> AdaptedLinear:
    """Wrap the site's attention- or FFN-output projection; parallel adapters also hook the sublayer input."""
    out_name, in_name = (site.attn_out, site.attn_in) if where == "attention" else (site.ffn_out, site.ffn_in)
    parent_name, _, child = out_name.rpartition(".")
    wrapped = AdaptedLinear(model.get_submodule(out_name), site.layer, adapter, parallel, scale, drop)
    setattr(model.get_submodule(parent_name), child, wrapped)
    if parallel:
        sublayer = model.get_submodule(in_name)
        require_hidden_states_first(sublayer, "a parallel adapter")
        sublayer.register_forward_pre_hook(wrapped.capture, with_kwargs=True)
    return wrapped


def hidden_size(model: nn.Module, site: Site) -> int:
    return model.get_submodule(site.ffn_out).out_features


def bottleneck_size(dim: int, size: int | None, reduction_factor: int | None, default: int) -> int:
    if size:
        return size
    return max(1, dim // reduction_factor) if reduction_factor else default


def unfreeze_norms(model: nn.Module, sites: list[Site]) -> None:
    """Train each block's normalisation layers (Houlsby et al. 2019, Sec. 2.1 trains them per task)."""
    for site in sites:
        for name, module in model.get_submodule(site.block).named_modules():
            if type(module).__name__.endswith(NORM_SUFFIXES) and "adapter" not in name:
                for p in module.parameters(recurse=False):
                    p.requires_grad_(True)


def drop_states(model: nn.Module) -> list[DropState]:
    return list({id(m.drop): m.drop for m in model.modules() if isinstance(m, AdaptedLinear)}.values())


class DropCallback(MethodCallback):
    """Robust AdapterDrop (Rücklé et al. 2021, Sec. 3): each training step skips the adapters of the lowest n
    layers, n ~ U{0, ..., max_layers}."""

    def __init__(self, states: list[DropState], max_layers: int):
        self.states, self.max_layers, self.rng = states, max_layers, random.Random(0)

    def on_train_begin(self, args, state, control, **kwargs):
        self.rng = random.Random(args.seed)  # reproducible with the run's seed

    def on_step_begin(self, args, state, control, **kwargs):
        n = self.rng.randint(0, self.max_layers)
        for drop in self.states:
            drop.train_skip = n

    def on_train_end(self, args, state, control, **kwargs):
        for drop in self.states:
            drop.train_skip = 0


def drop_callbacks(cfg, model: nn.Module) -> list:
    """The DropCallback for configs with `drop_train_layers` (0 = off, None = all but the top layer)."""
    if cfg.drop_train_layers == 0:
        return []
    layers = {m.layer for m in model.modules() if isinstance(m, AdaptedLinear)}
    top = max(layers, default=0)
    max_layers = top if cfg.drop_train_layers is None else min(cfg.drop_train_layers, top)
    return [DropCallback(drop_states(model), max_layers)]
