"""Configs for the lifecycle test where a method's defaults cannot stand alone (AdapterFusion needs source runs)."""
from __future__ import annotations

from pathlib import Path

import torch

from peftcli.methods.adapter import AdapterConfig
from peftcli.models.loading import auto_class
from peftcli.files import FORMAT_VERSION, RECIPE
from peftcli.methods.install import prepare_model
from peftcli.methods.tensors import save_trained


def write_adapter_run(folder: Path, task: str, out: Path, seed: int, cfg: AdapterConfig | None = None) -> Path:
    """A finished `adapter` run directory (recipe.yaml, method.json, adapter.safetensors) on the tiny model, its
    adapters moved away from their init so that fused sources differ."""
    cfg = cfg or AdapterConfig(variant="pfeiffer")
    model = prepare_model(auto_class(task).from_pretrained(folder), "adapter", cfg)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=generator) * 0.05)
    out.mkdir(parents=True, exist_ok=True)
    save_trained(model, out, {"method": "adapter", "format_version": FORMAT_VERSION})
    (out / RECIPE).write_text(
        f"model: {{name_or_path: {folder}, task: {task}}}\ndata: {{train: {out}/train.jsonl}}\n"
        f"method: {{name: adapter, variant: {cfg.variant}, train_norms: false}}\n"
        f"train: {{output_dir: {out}}}\n", encoding="utf-8")
    return out


def lifecycle_config(name: str, method, folder: Path, task: str, tmp_path: Path):
    if name == "adapter_fusion":
        sources = [str(write_adapter_run(folder, task, tmp_path / f"source{i}", seed=i)) for i in range(2)]
        return method.config_cls(sources=sources)
    return method.config_cls()
