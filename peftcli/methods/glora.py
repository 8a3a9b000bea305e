"""GLoRA (Chang et al. 2023): W = W0 + W0⊙A + B, b = b0 + b0⊙D + E + W0·C, each of A..E a chosen path per layer
(low-rank, vector, scalar or none); a supernet samples paths while training and `peft glora-search` picks them."""
from __future__ import annotations

import dataclasses
import math
import random
import re
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from ..errors import UserError
from ..config.schema import field, positive
from .lora import DEFAULT_TARGETS
from .registry import Method, MethodCallback, match_targets, target_error
from ..models.modules import replace_module

# Path choices per component (paper Sec. 3, Table 1 search space): A and B scale / shift the weight, C is a
# prompt in input space projected by W0, D and E scale / shift the bias and have no low-rank form. "lora" is the
# low-rank path at rank r; "lora<k>" (k <= r) the same path at rank k, as the official code's "LoRA_<k>" path
# (Arnav0400/ViT-Slim, GLoRA/layer.py prepare_path), which reads the leading k columns of d and rows of u.
CHOICES = {"A": ("lora", "vector", "scalar", "none"), "B": ("lora", "vector", "scalar", "none"),
           "C": ("lora", "vector", "scalar", "none"), "D": ("vector", "scalar", "none"),
           "E": ("vector", "scalar", "none")}
LOW_RANK = re.compile(r"lora(\d*)")
FULL_PATH = {"A": "lora", "B": "lora", "C": "lora", "D": "vector", "E": "vector"}
BIAS_PARTS = ("C", "D", "E")  # these change the bias: only on layers that have one, so merging keeps the layout


@dataclasses.dataclass
class GloraConfig:
    r: int = field(4, check=positive, doc="rank of the low-rank (lora) paths: the largest one; lora<k> uses k <= r")
    # The official scripts build a supernet at one rank (--rank, default 4) and slice LoRA_<k> from it; sampling
    # several ranks from the shared factors is the same weight sharing, so the search also picks each path's rank.
    ranks: list[int] | None = field(None, doc="supernet: low-rank path ranks sampled per component and layer, "
                                              "e.g. [4, 8, 16] (each <= r); unset = [r]")
    target_modules: list[str] | str = field(factory=lambda: list(DEFAULT_TARGETS),
                                            doc="name suffixes, a regex, or all-linear")
    supernet: bool = field(False, doc="train the supernet: every step samples a path per component and layer")
    default_path: dict[str, str] = field(factory=lambda: dict(FULL_PATH),
                                         doc="path per component (A..E) for layers not listed in paths")
    paths: dict[str, dict[str, str]] = field(factory=dict, doc="per-layer paths, {layer: {A: lora, ..., E: none}}")
    init_from: str | None = field(None, doc="adapter.safetensors of a supernet run: start from its weights")


def path_rank(choice: str, r: int) -> int | None:
    """The rank of a low-rank path ("lora" = r, "lora8" = 8); None for the other paths."""
    match = LOW_RANK.fullmatch(choice)
    return (int(match.group(1)) if match.group(1) else r) if match else None


def validate(cfg: GloraConfig) -> str | None:
    for rank in cfg.ranks or []:
        if not 1 <= rank <= cfg.r:
            return f"ranks: {rank} is not in 1..r ({cfg.r}); r is the largest rank, so raise r or drop {rank}"
    for where, path in [("default_path", cfg.default_path)] + [(f"paths.{k}", v) for k, v in cfg.paths.items()]:
        for part, choice in path.items():
            if part not in CHOICES:
                return f"{where}: unknown component {part!r}; components are A, B, C, D, E"
            rank = path_rank(choice, cfg.r) if "lora" in CHOICES[part] else None
            if choice not in CHOICES[part] and rank is None:
                return f"{where}.{part}: {choice!r} is not a path of {part}; choose one of {', '.join(CHOICES[part])}"
            if rank is not None and not 1 <= rank <= cfg.r:
                return f"{where}.{part}: {choice} has rank {rank}, outside 1..r ({cfg.r}); raise r or lower the rank"
    if cfg.init_from and not Path(cfg.init_from).is_file():
        return f"init_from: {cfg.init_from} does not exist; point it at a supernet run's adapter.safetensors"
    if cfg.supernet and cfg.paths:
        return "supernet: true samples paths itself; remove paths (or set supernet: false to train them)"
    return None


def component_shape(part: str, out_f: int, in_f: int) -> tuple[int, int]:
    """(rows, cols) of a component's full value: A, B act on the out×in weight, C is an in×1 prompt."""
    return {"A": (out_f, in_f), "B": (out_f, in_f), "C": (in_f, 1), "D": (out_f, 1), "E": (out_f, 1)}[part]


class GloraLinear(nn.Module):
    """A frozen nn.Linear (weight/bias keep their names) with GLoRA components. Each component X has `glora_X_d`
    (rows×r, or rows×1 / 1×1 for vector / scalar) and, for lora, `glora_X_u` (r×cols); smaller paths read the
    leading columns / rows / entry of the same tensors, as in the paper's weight-sharing supernet (Sec. 3.3):
    lora<k> is d[:, :k] @ u[:k], vector d[:, :1], scalar d[:1, :1]. A supernet samples its low-rank paths' rank
    from `ranks`; a fixed layer allocates only what its paths read."""

    def __init__(self, base: nn.Linear, r: int, path: dict[str, str], supernet: bool,
                 ranks: tuple[int, ...] | None = None):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        self.supernet, self.r, self.ranks = supernet, r, tuple(sorted(set(ranks or (r,))))
        self.path = {**FULL_PATH, **path}
        if self.bias is None:  # bias paths would add a bias the base layout lacks
            self.path.update({p: "none" for p in BIAS_PARTS})
        allocate = FULL_PATH if supernet else self.path
        device = base.weight.device
        for part, choice in allocate.items():
            if self.bias is None and part in BIAS_PARTS or choice == "none":
                continue
            rows, cols = component_shape(part, self.out_features, self.in_features)
            rank = path_rank(choice, r)
            d_shape = (rows, rank) if rank else {"vector": (rows, 1), "scalar": (1, 1)}[choice]
            # d = 0 makes every path start at zero; u random so the lora path's d gets a gradient (as LoRA's B).
            self.register_parameter(f"glora_{part}_d", nn.Parameter(torch.zeros(d_shape, device=device)))
            if rank:
                u = nn.Parameter(torch.empty(rank, cols, device=device))
                nn.init.kaiming_uniform_(u, a=math.sqrt(5))
                self.register_parameter(f"glora_{part}_u", u)

    def choices(self) -> dict[str, tuple[str, ...]]:
        """The paths this layer can take (what the supernet samples and the search chooses from): the low-rank
        path once per rank in `ranks`."""
        low_rank = tuple(f"lora{k}" for k in self.ranks)
        return {p: ("none",) if self.bias is None and p in BIAS_PARTS else
                low_rank + c[1:] if c[0] == "lora" else c for p, c in CHOICES.items()}

    def sample_path(self) -> dict[str, str]:
        """One uniformly drawn path per component: what a supernet trains in one forward (Sec. 3.3)."""
        return {p: random.choice(c) for p, c in self.choices().items()}

    def value(self, part: str, choice: str) -> torch.Tensor | None:
        if choice == "none":
            return None
        d = getattr(self, f"glora_{part}_d")
        rank = path_rank(choice, self.r)
        if rank:
            return d[:, :rank] @ getattr(self, f"glora_{part}_u")[:rank]
        return d[:, :1] if choice == "vector" else d[:1, :1]

    def effective(self, path: dict[str, str] | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Weight and bias of the adapted layer in fp32 (Eq. 6 of the paper, with ⊙ for A and D)."""
        w0 = self.weight.float()
        values = {p: self.value(p, c) for p, c in (path or self.path).items()}
        weight = w0
        if values["A"] is not None:
            weight = weight + w0 * values["A"]
        if values["B"] is not None:
            weight = weight + values["B"]
        if self.bias is None:
            return weight, None
        b0 = self.bias.float()
        bias = b0
        if values["C"] is not None:
            bias = bias + (w0 @ values["C"].expand(self.in_features, 1)).squeeze(1)
        if values["D"] is not None:
            bias = bias + b0 * values["D"].reshape(-1)
        if values["E"] is not None:
            bias = bias + values["E"].reshape(-1)
        return weight, bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        path = None  # evaluation uses self.path: the full paths, or those set by the search
        if self.supernet and self.training:
            path = self.sample_path()
        weight, bias = self.effective(path)
        return F.linear(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype))

    def merged(self) -> nn.Linear:
        plain = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                          device=self.weight.device, dtype=self.weight.dtype)
        with torch.no_grad():
            weight, bias = self.effective()
            plain.weight.copy_(weight.to(plain.weight.dtype))
            if bias is not None:
                plain.bias.copy_(bias.to(plain.bias.dtype))
        return plain


def glora_modules(model: nn.Module) -> dict[str, GloraLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, GloraLinear)}


def inject(model: nn.Module, cfg: GloraConfig) -> nn.Module:
    names = match_targets(model, cfg.target_modules)
    if not names:
        raise UserError(f"method.{target_error(model, cfg.target_modules)}")
    unknown = sorted(set(cfg.paths) - set(names))
    if unknown:
        raise UserError(f"method.paths: {unknown[0]!r} is not an adapted layer; adapted layers: {', '.join(names)}")
    for name in names:
        path = {**cfg.default_path, **cfg.paths.get(name, {})}
        replace_module(model, name, GloraLinear(model.get_submodule(name), cfg.r, path, cfg.supernet, cfg.ranks))
    return model


def merge(model: nn.Module, cfg: GloraConfig) -> nn.Module:
    for name, module in list(glora_modules(model).items()):
        replace_module(model, name, module.merged())
    return model


def set_paths(model: nn.Module, paths: dict[str, dict[str, str]]) -> None:
    for name, module in glora_modules(model).items():
        module.path = dict(paths[name])


def inherit(model: nn.Module, path: str) -> int:
    """Copy supernet weights into the chosen paths (leading slices of the shared tensors) and the task head."""
    source, copied = load_file(path), 0
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.requires_grad and name in source:
                src = source[name]
                if src.dim() != param.dim() or any(s < p for s, p in zip(src.shape, param.shape)):
                    raise UserError(f"method.init_from: {name} has shape {tuple(src.shape)} in {path}, "
                                    f"which cannot seed {tuple(param.shape)}; use a supernet run of the same model")
                param.copy_(src[tuple(slice(0, n) for n in param.shape)])
                copied += 1
    return copied


class InheritCallback(MethodCallback):
    """Starts a searched configuration from the supernet's weights (not on resume: the checkpoint has them)."""

    def __init__(self, cfg: GloraConfig, model: nn.Module):
        self.cfg, self.model = cfg, model

    def on_train_begin(self, args, state, control, **kwargs):
        if self.cfg.init_from and state.global_step == 0:
            inherit(self.model, self.cfg.init_from)


METHOD = Method(
    name="glora", summary="generalised LoRA: per-layer weight/bias scale-shift paths, supernet + evolutionary search",
    config_cls=GloraConfig, inject=inject, merge=merge, validate=validate,
    callbacks=lambda cfg, model: [InheritCallback(cfg, model)],
    paper="Chang et al. 2023, One-for-All: Generalized LoRA for Parameter-Efficient Fine-tuning")
