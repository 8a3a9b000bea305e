"""Optimizer parameter groups from rules: regex lr_groups, layer-wise LR decay, LoRA+ ratio, no decay on bias/norm."""
from __future__ import annotations

import re
from collections import OrderedDict

from torch import nn

from ..methods.registry import layer_index, num_layers
from ..config.sections import OptimSection
from .importance import importance_unit

NO_DECAY = re.compile(r"(bias|norm|LayerNorm|layernorm|ln_\w+|\.ln\d?)(\.|$)|(^|\.)(bias)$")


def lr_multiplier(name: str, rules: OptimSection, depth: int, base_lr: float) -> tuple[float, str]:
    """(lr multiplier, the rule that set it) for one parameter. Rules compose: a matching lr_groups rule
    (first match wins) x layer decay x LoRA+ ratio."""
    scale, why = 1.0, []
    for rule in rules.lr_groups:
        if re.search(rule.pattern, name):
            scale = rule.lr / base_lr if rule.lr is not None else (rule.lr_scale or 1.0)
            why.append(f"lr_groups[{rule.pattern}]")
            break
    if rules.layer_decay is not None and depth > 0:
        index = layer_index(name)
        # Embeddings sit below layer 0; heads and anything above the stack keep the full rate
        # (layer-wise LR decay as in ELECTRA, Clark et al. 2020, Sec. 3.1 / BEiT fine-tuning).
        level = index + 1 if index is not None else (0 if "embed" in name else depth + 1)
        scale *= rules.layer_decay ** (depth + 1 - level)
        why.append("layer_decay")
    if rules.lora_plus_ratio is not None and "lora_B" in name:
        scale *= rules.lora_plus_ratio  # LoRA+ (Hayou et al. 2024): B learns faster than A
        why.append("lora_plus")
    return scale, "+".join(why) or "base"


def build_param_groups(model: nn.Module, rules: OptimSection, base_lr: float, weight_decay: float) -> list[dict]:
    """Group trainable parameters by (lr, weight decay). Each group records its multiplier and a readable name,
    so schedules, importance scaling and logs can find it at call time."""
    depth = num_layers(model)
    groups: OrderedDict[tuple, dict] = OrderedDict()
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        scale, why = lr_multiplier(name, rules, depth, base_lr)
        decay = 0.0 if param.ndim < 2 or NO_DECAY.search(name) else weight_decay
        for rule in rules.lr_groups:
            if re.search(rule.pattern, name):
                decay = rule.weight_decay if rule.weight_decay is not None else decay
                break
        # Importance scoring needs one group per scored unit (tensor / module / layer).
        unit = importance_unit(name, rules.importance.granularity) if rules.importance else None
        key = (round(scale, 12), decay, why, unit)
        label = f"{why} x{scale:.4g} wd={decay:g}" + (f" [{unit}]" if unit else "")
        group = groups.setdefault(key, {"params": [], "param_names": [], "lr": base_lr * scale, "weight_decay": decay,
                                        "lr_multiplier": scale, "lr_scale": 1.0, "importance_unit": unit,
                                        "name": label})
        group["params"].append(param)
        group["param_names"].append(name)
    return list(groups.values())


def describe_groups(groups: list[dict]) -> list[str]:
    return [f"{g['name']}: {len(g['params'])} tensors, {sum(p.numel() for p in g['params']):,} params, "
            f"lr {g['lr']:.3g}" for g in groups]
