"""`method.share_across_layers`: one set of a method's tensors for every layer (cross-layer parameter sharing).

After injection, the method's new trainable tensors that differ only by their layer number
(`...layer.3.attention.self.query.lora_A.weight`) are replaced by the first layer's tensor, so every layer holds
the same Parameter object: one copy is saved, optimised and counted, and its gradient sums over all layers
(ALBERT-style sharing, Lan et al. 2020, applied to the method's parameters only).
"""
from __future__ import annotations

import logging
import re
from collections import defaultdict

from torch import nn

from ..errors import UserError
from ..models.modules import get_submodule_parent

logger = logging.getLogger("peftcli")
KEY = "method.share_across_layers"
# The same layer numbering as registry.layer_index: `.layer.3.`, `.layers.3.`, `.h.3.`, `.block.3.`, `.blocks.3.`.
_LAYER = re.compile(r"\.(layers?|h|blocks?)\.\d+\.")

# Methods whose per-layer state would be wrong with one tensor for all layers.
REFUSED = {
    "adalora": "AdaLoRA prunes each layer's ranks on its own budget; one shared tensor has no per-layer ranks",
    "glora": "GLoRA's search picks a different path per layer from per-layer supernet weights",
    "svd": "SVD compression factors each layer's own weight, which differs per layer",
    "adapter_fusion": "AdapterFusion loads each layer's adapters from finished runs; they differ per layer",
}


def refusal(method_name: str, cfg) -> str | None:
    """Why sharing cannot apply to this method (configuration), or None."""
    if method_name in REFUSED:
        return REFUSED[method_name]
    if getattr(cfg, "init", None) == "pissa":
        return "init: pissa starts each layer's A, B from that layer's own weight; use init: default"
    if getattr(cfg, "use_dora", False):
        return "DoRA's magnitude starts from each layer's own weight norms; set use_dora: false"
    return None


def layer_key(name: str) -> str | None:
    """The parameter name with its layer number replaced by `*`, or None outside numbered layers."""
    dotted = "." + name
    if not _LAYER.search(dotted):
        return None
    return _LAYER.sub(lambda m: f".{m.group(1)}.*.", dotted, count=1)[1:]


def tie_across_layers(model: nn.Module, method_name: str, cfg, base_ids: set[int]) -> int:
    """Tie the method's new per-layer tensors (base_ids: ids of the parameters before injection); returns how many
    tensors were replaced by a shared one."""
    reason = refusal(method_name, cfg)
    if reason:
        raise UserError(f"{KEY}: cannot apply to method '{method_name}': {reason}")
    groups = _groups(model, method_name, base_ids)
    for key, members in groups.items():
        shapes = {tuple(p.shape) for _, p in members}
        if len(shapes) > 1:
            raise UserError(f"{KEY}: {key} has different shapes across layers ({', '.join(map(str, sorted(shapes)))})"
                            f"; give every layer the same size (e.g. drop rank_pattern) or set it to false")
    tied = 0
    for members in groups.values():
        shared = members[0][1]
        for name, _ in members[1:]:
            parent, attr = get_submodule_parent(model, name)
            setattr(parent, attr, shared)
            tied += 1
    logger.info("share_across_layers: %d per-layer tensors tied into %d shared ones", tied + len(groups), len(groups))
    return tied


def _groups(model: nn.Module, method_name: str, base_ids: set[int]) -> dict[str, list]:
    """The method's new trainable tensors in numbered layers, grouped by their name without the layer number."""
    groups: dict[str, list] = defaultdict(list)
    new = [(n, p) for n, p in model.named_parameters() if p.requires_grad and id(p) not in base_ids]
    for name, param in new:
        key = layer_key(name)
        if key is not None:
            groups[key].append((name, param))
    groups = {k: v for k, v in groups.items() if len(v) > 1}
    if not groups:
        what = "it trains only the base model's own weights" if not new else \
            "its new tensors are not repeated in numbered layers"
        raise UserError(f"{KEY}: method '{method_name}' has no per-layer tensors to share ({what}); set it to false")
    return groups
