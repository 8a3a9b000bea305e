"""AdapterFusion (Pfeiffer et al. 2021): frozen adapters from earlier runs, combined per layer by learned attention."""
from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from ..errors import UserError
from ..config.schema import Where, build, field
from ..config.yamlio import read_yaml_file
from ..files import RECIPE, TENSORS, read_record
from . import bottleneck as bn
from .adapter import UNMERGEABLE, AdapterConfig, AdapterDropConfig, resolved
from .registry import Method

logger = logging.getLogger("peftcli")
SOURCE_CONFIGS = {"adapter": AdapterConfig, "adapter_drop": AdapterDropConfig}
SOURCE_METHODS = tuple(SOURCE_CONFIGS)
# The sources' placement and shapes, saved with the run as JSON bytes (a uint8 tensor) beside the frozen source
# tensors, so the run rebuilds after its source runs are moved or deleted.
SPEC_KEY = "adapter_fusion.spec"
# Pfeiffer et al. 2021, Sec. 3.2: Value starts as the identity (plus small noise) so fusion first averages the
# adapters' outputs; Query and Key start random.
VALUE_NOISE = 1e-6
QK_STD = 0.02


def check_sources(value) -> str | None:
    return None if len(value) >= 2 else "list at least two adapter run directories to fuse"


@dataclasses.dataclass
class AdapterFusionConfig:
    sources: list[str] = field(factory=list, check=check_sources,
                               doc="run directories of `adapter` runs to fuse (same base model and placement)")


class Fusion(nn.Module):
    """z_n = h + f_n(h) for each frozen source adapter n; out = sum_n softmax_n(hQ · z_nK) z_nV (Sec. 3.2).
    Returns out - h, since the wrapping layer adds h back."""

    def __init__(self, dim: int, sources: list[bn.Bottleneck], device):
        super().__init__()
        self.sources = nn.ModuleList(sources)
        self.sources.requires_grad_(False)
        self.query = nn.Linear(dim, dim, device=device)
        self.key = nn.Linear(dim, dim, device=device)
        self.value = nn.Linear(dim, dim, device=device)
        with torch.no_grad():
            for proj in (self.query, self.key):
                nn.init.normal_(proj.weight, std=QK_STD)
                nn.init.zeros_(proj.bias)
            self.value.weight.copy_(torch.eye(dim, device=device) + torch.randn(dim, dim, device=device) * VALUE_NOISE)
            nn.init.zeros_(self.value.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        h = h.float()
        z = torch.stack([h + source(h) for source in self.sources], dim=-2)  # [..., N, d]
        scores = torch.einsum("...d,...nd->...n", self.query(h), self.key(z))
        weights = scores.softmax(dim=-1).unsqueeze(-1)
        return (weights * self.value(z)).sum(dim=-2) - h


def read_sources(cfg: AdapterFusionConfig, dim: int) -> tuple[dict, list[Path]]:
    """The spec (shared placement; each source's bottleneck size and nonlinearity) and the tensor files of the
    listed runs."""
    adapters, placements, files = [], set(), []
    for source in cfg.sources:
        try:
            record = read_record(source)
        except UserError as exc:  # name the recipe key, so users know which line to fix
            raise UserError(f"method.sources: {exc} (train the source runs first)") from None
        if record["method"] not in SOURCE_METHODS:
            raise UserError(f"method.sources: {source} is a '{record['method']}' run; fuse runs of "
                            f"{' or '.join(SOURCE_METHODS)}")
        source_cfg = source_config(Path(source), record["method"])
        size, placement, norms = resolved(source_cfg, dim)
        if norms:
            raise UserError(f"method.sources: {source} trained block norms (houlsby); fuse adapters trained with "
                            f"variant: pfeiffer or train_norms: false, whose base norms they share")
        adapters.append({"bottleneck_size": size, "nonlinearity": source_cfg.nonlinearity})
        placements.add(tuple(placement))
        files.append(Path(source) / TENSORS)
    if len(placements) > 1:
        raise UserError(f"method.sources: the runs place adapters differently ({sorted(placements)}); fuse runs "
                        f"with the same placement")
    return {"placement": list(placements.pop()), "adapters": adapters}, files


def source_config(run_dir: Path, method: str):
    """The source run's method settings, read back from the recipe it saved."""
    path = run_dir / RECIPE
    section = read_yaml_file(path).get("method") or {}
    options = {k: v for k, v in section.items() if k not in ("name", "share_across_layers")}
    return build(SOURCE_CONFIGS[method], options, Where(str(path), "method"))


def inject(model: nn.Module, cfg: AdapterFusionConfig) -> nn.Module:
    sites = bn.find_sites(model)
    device = model.get_submodule(sites[0].ffn_out).weight.device
    try:
        spec, files = read_sources(cfg, bn.hidden_size(model, sites[0]))
    except UserError as exc:
        if device.type == "meta":
            raise  # validating a training plan (no weights): the source runs must be there to train
        # Reloading a finished run: unpack_state attaches the fusion from the copy saved in the run's tensors.
        logger.info("%s; using the copy of the source adapters saved with the run", exc)
        return model
    attach(model, spec)
    if device.type != "meta":  # validation builds the model without weights: nothing to load
        load_sources(model, files)
    return model


def attach(model: nn.Module, spec: dict) -> None:
    """A Fusion over frozen source adapters of the spec's shapes at every site of its placement."""
    sites = bn.find_sites(model)
    dim = bn.hidden_size(model, sites[0])
    device = model.get_submodule(sites[0].ffn_out).weight.device
    drop = bn.DropState()
    for site in sites:
        for where in spec["placement"]:
            sources = [bn.Bottleneck(dim, a["bottleneck_size"], a["nonlinearity"], device) for a in spec["adapters"]]
            fusion = Fusion(dim, sources, device)
            fusion.spec = spec
            bn.attach(model, site, where, fusion, parallel=False, scale=1.0, drop=drop)


def load_sources(model: nn.Module, files: list[Path]) -> None:
    """Copy each source run's adapter weights into its frozen slot of every Fusion module."""
    for n, path in enumerate(files):
        tensors = load_file(str(path))
        for name, module in model.named_modules():
            if isinstance(module, Fusion):
                for part in ("down.weight", "down.bias", "up.weight", "up.bias"):
                    key = f"{name.rpartition('.')[0]}.adapter.{part}"
                    if key not in tensors:
                        raise UserError(f"method.sources: {path} lacks {key}; was it trained on this base model?")
                    target = module.sources[n].get_parameter(part)
                    if target.shape != tensors[key].shape:
                        raise UserError(f"method.sources: {path}: {key} has shape {tuple(tensors[key].shape)}, "
                                        f"expected {tuple(target.shape)}; it was trained on another base model")
                    with torch.no_grad():
                        target.copy_(tensors[key])


def fusions(model: nn.Module) -> list[Fusion]:
    return [m for m in model.modules() if isinstance(m, Fusion)]


def source_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if ".adapter.sources." in k}


def saved_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The frozen source adapters and their spec, saved with the run: it reloads without the source runs and
    reproduces even if one is retrained."""
    spec = json.dumps(fusions(model)[0].spec, sort_keys=True).encode("utf-8")
    return {**source_state(model), SPEC_KEY: torch.tensor(list(spec), dtype=torch.uint8)}


def unpack_state(model: nn.Module, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Take the saved spec out of the tensors; attach the fusion from it when inject could not read the sources."""
    tensors = dict(tensors)
    packed = tensors.pop(SPEC_KEY, None)
    built = fusions(model)
    if packed is None:
        if not built:
            raise UserError("method.sources: the source runs are unavailable and this run's tensors hold no copy of "
                            "their spec (saved by older peftcli); restore the source runs to load it")
        return tensors
    spec = json.loads(bytes(packed.tolist()).decode("utf-8"))
    if not built:
        attach(model, spec)
    elif json.dumps(built[0].spec, sort_keys=True) != json.dumps(spec, sort_keys=True):
        raise UserError(f"method.sources: the source runs no longer match the adapters this run fused "
                        f"({built[0].spec} now, {spec} then); restore them, or move them away so the run loads "
                        f"its saved copy")
    return tensors


METHOD = Method(
    name="adapter_fusion", summary="learned attention over frozen adapters from earlier runs (two-stage)",
    config_cls=AdapterFusionConfig, inject=inject, merge=None, merge_hint=UNMERGEABLE, extra_state=saved_state,
    unpack_state=unpack_state,
    paper="Pfeiffer et al. 2021, AdapterFusion: Non-Destructive Task Composition for Transfer Learning")
