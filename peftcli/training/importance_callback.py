"""The importance callback: EMA of scores per optimizer group, lr_scale updates, logs, plot, resumable state."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import TrainerCallback

from .importance import GRADIENT_SCORES, WEIGHT_SCORES, combine, group_scores, hutchinson_trace, scales_from_scores, unit_layer

LOG_FILE = "importance.jsonl"
PLOT_FILE = "importance.png"


class ImportanceCallback(TrainerCallback):
    """Scores every optimizer group, smooths the scores with an EMA, and every `update_every` steps after
    `warmup_steps` maps them to each group's `lr_scale` (read by ScaledLambdaLR). Groups are looked up at call
    time in the optimizer the Trainer passes (accelerate's wrapper), never cached."""

    def __init__(self, cfg, output_dir: str | None):
        self.cfg = cfg
        self.output_dir = Path(output_dir) if output_dir else None
        self.ema: dict[str, torch.Tensor] = {}
        self.scales: torch.Tensor | None = None
        self.units: list[str] = []
        self.history: list[dict] = []
        self.last_inputs = None
        self.model = None

    # -- hooks called by PeftTrainer --
    def observe(self, model, inputs) -> None:
        """The current micro-batch, kept for the Hessian probe (which needs a double backward on a batch)."""
        self.model, self.last_inputs = model, inputs

    def log_summary(self) -> dict[str, float]:
        if self.scales is None:
            return {}
        out = {"importance/scale_min": float(self.scales.min()), "importance/scale_max": float(self.scales.max())}
        for layer, value in self._per_layer(self.scales.tolist()).items():
            out[f"importance/{layer}"] = value
        return out

    # -- Trainer events --
    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
        self.units = [g.get("importance_unit") or g.get("name", str(i)) for i, g in enumerate(optimizer.param_groups)]
        if self.scales is not None:  # restored by load_state_dict before training resumed
            self._apply(optimizer.param_groups, self.scales)

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, model=None, **kwargs):
        groups = optimizer.param_groups
        kinds = [k for k in self.cfg.scores if k in GRADIENT_SCORES]
        if kinds and state.global_step % self.cfg.score_every == 0:
            self._smooth(group_scores(groups, kinds))
        if "hessian" in self.cfg.scores and state.global_step % self.cfg.hessian_interval == 0 and \
                self.last_inputs is not None:
            self._smooth({"hessian": self._hessian(groups)})

    def on_step_end(self, args, state, control, optimizer=None, **kwargs):
        step = state.global_step
        if step < self.cfg.warmup_steps or step % self.cfg.update_every:
            return
        groups = optimizer.param_groups
        weight_kinds = [k for k in self.cfg.scores if k in WEIGHT_SCORES]
        if weight_kinds:
            self._smooth(group_scores(groups, weight_kinds))
        if any(k not in self.ema for k in self.cfg.scores):
            return  # e.g. the first Hessian probe has not run yet
        scope = self._scope()
        combined = combine(self.ema, self.cfg.scores, scope)
        scales = torch.ones(len(groups))
        if scope.any():
            scales[scope] = scales_from_scores(combined[scope], self.cfg)
        self._apply(groups, scales)
        self._record(step, combined, scales, state.is_world_process_zero)

    def on_train_end(self, args, state, control, **kwargs):
        if state.is_world_process_zero and self.history and self.output_dir:
            plot_importance(self.history, self.output_dir / PLOT_FILE, self._per_layer)

    # -- state for exact checkpoint resume --
    def state_dict(self) -> dict:
        """{"tensors": {name: tensor}, "json": {...}}: the EMAs and current scales, plus units and history."""
        tensors = {f"ema.{k}": v.clone() for k, v in self.ema.items()}
        if self.scales is not None:
            tensors["scales"] = self.scales.clone()
        return {"tensors": tensors, "json": {"units": self.units, "history": self.history}}

    def load_state_dict(self, state: dict) -> None:
        tensors = state["tensors"]
        self.ema = {k[len("ema."):]: v.clone().float() for k, v in tensors.items() if k.startswith("ema.")}
        self.scales = tensors["scales"].clone().float() if "scales" in tensors else None
        self.units = list(state["json"].get("units", []))
        self.history = list(state["json"].get("history", []))

    # -- internals --
    def _smooth(self, fresh: dict[str, torch.Tensor]) -> None:
        beta = self.cfg.ema
        for kind, value in fresh.items():
            old = self.ema.get(kind)
            fresh_start = old is None or old.shape != value.shape
            self.ema[kind] = value.clone() if fresh_start else beta * old + (1 - beta) * value

    def _scope(self) -> torch.Tensor:
        if self.cfg.layers is None:
            return torch.ones(len(self.units), dtype=torch.bool)
        chosen = set(self.cfg.layers)
        return torch.tensor([unit_layer(u) in chosen for u in self.units], dtype=torch.bool)

    def _apply(self, groups: list[dict], scales: torch.Tensor) -> None:
        """Set each group's lr_scale and rescale its current lr by new/old, so lr == initial_lr x schedule x
        lr_scale holds from the very next optimizer step (the scheduler keeps it afterwards)."""
        for group, scale in zip(groups, scales.tolist()):
            old = group.get("lr_scale", 1.0)
            group["lr"] = group["lr"] * scale / old
            group["lr_scale"] = scale
        self.scales = scales.clone()

    def _hessian(self, groups: list[dict]) -> torch.Tensor:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        inputs = self.last_inputs

        def loss_fn():
            return self.model(**inputs).loss

        with sdpa_kernel(SDPBackend.MATH), torch.enable_grad():  # fused attention kernels lack double backward
            return hutchinson_trace(loss_fn, groups, self.cfg.hessian_probes)

    def _record(self, step: int, combined: torch.Tensor, scales: torch.Tensor, main: bool) -> None:
        entry = {"step": step, "units": self.units, "score": [round(v, 8) for v in combined.tolist()],
                 "scale": [round(v, 6) for v in scales.tolist()],
                 **{k: [float(f"{x:.6g}") for x in v.tolist()] for k, v in self.ema.items()}}
        self.history.append({"step": step, "scale": entry["scale"], "score": entry["score"]})
        if main and self.output_dir:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            with open(self.output_dir / LOG_FILE, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(entry) + "\n")

    def _per_layer(self, values: list[float]) -> dict[str, float]:
        """Mean of per-group values by layer (embeddings, layer.i, other)."""
        buckets: dict[str, list[float]] = {}
        for unit, value in zip(self.units, values):
            layer = unit_layer(unit)
            key = f"layer.{layer}" if layer is not None else ("embeddings" if "embed" in unit else "other")
            buckets.setdefault(key, []).append(value)
        return {k: sum(v) / len(v) for k, v in sorted(buckets.items(), key=lambda kv: _layer_order(kv[0]))}


def _layer_order(key: str) -> tuple:
    return (0, 0) if key == "embeddings" else (1, int(key.split(".")[1])) if key.startswith("layer.") else (2, 0)


def plot_importance(history: list[dict], path: Path, per_layer) -> None:
    """LR multiplier and combined score per layer against step."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..files import atomic_write

    steps = [h["step"] for h in history]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), dpi=110)
    for ax, key, label in ((axes[0], "scale", "LR multiplier"), (axes[1], "score", "combined score")):
        series = [per_layer(h[key]) for h in history]
        for layer in series[-1]:
            ax.plot(steps, [s.get(layer, float("nan")) for s in series], label=layer)
        ax.set_xlabel("step")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    atomic_write(path, buffer.getvalue())
