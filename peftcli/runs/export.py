"""`peft export`: a run's adapter in HF peft's own layout (one function per method), or its raw tensors."""
from __future__ import annotations

import dataclasses
import json
import re
from collections import Counter
from pathlib import Path
from typing import Callable

import torch

from ..errors import UserError
from ..run_lock import hold_run_lock
from ..files import METHOD_JSON, TENSORS, write_folder_atomically
from ..methods.install import prepare_model
from ..methods.registry import trainable_state
from ..methods.tensors import load_tensors_into
from ..models.heads import in_head, trained_head
from ..models.loading import load_model, refuse_unmergeable_pooling
from .folder import check_output_folder, read_run

FORMATS = ("peft", "tensors")
PREFIX = "base_model.model."  # where PeftModel keeps the wrapped base model
PEFT_TASK_TYPES = {"sequence-classification": "SEQ_CLS", "causal-lm": "CAUSAL_LM",
                   "token-classification": "TOKEN_CLS", "seq2seq": "SEQ_2_SEQ_LM"}


@dataclasses.dataclass
class Trained:
    """A run rebuilt for export: the trained model plus its tensors as they were right after injection."""

    recipe: object
    record: dict
    model: torch.nn.Module
    initial: dict[str, torch.Tensor]
    run_dir: Path | None = None


def export(run_dir: str, out: str, fmt: str = "peft", overwrite: bool = False) -> Path:
    with hold_run_lock(Path(out).expanduser(), f"peft export {run_dir} --out {out}", "--out"):  # check to write
        return _export(run_dir, out, fmt, overwrite)


def _export(run_dir: str, out: str, fmt: str, overwrite: bool) -> Path:
    recipe, record = read_run(run_dir)
    target = check_output_folder(run_dir, out, overwrite, "export")
    if fmt == "tensors":
        if not (Path(run_dir) / TENSORS).is_file():
            raise UserError(f"{run_dir}: no {TENSORS}; the run did not finish saving (resume it first)")
        files = {TENSORS: (Path(run_dir) / TENSORS).read_bytes(),
                 METHOD_JSON: (Path(run_dir) / METHOD_JSON).read_bytes()}
    else:
        refuse_unmergeable_pooling(recipe.model, "peft export --format peft")
        exporter = PEFT_EXPORTERS.get(record["method"])
        if exporter is None:
            raise UserError(f"method '{record['method']}' has no HF peft equivalent (peft format supports: "
                            f"{', '.join(PEFT_EXPORTERS)}); use --format tensors for the raw trained tensors")
        config, tensors = exporter(load_trained(run_dir))
        files = {"adapter_config.json": json.dumps(config, indent=2),
                 "adapter_model.safetensors": _safetensors_bytes(tensors)}
    _write_folder(target, files)
    return target


def load_trained(run_dir: str) -> Trained:
    recipe, record = read_run(run_dir)
    if record.get("tasks"):
        raise UserError(f"{run_dir}: a multi-task run has one head per task, which HF peft's adapter format cannot "
                        f"hold; use --format tensors, or `peft merge-export` for one plain model per task")
    model = load_model(recipe.model, record.get("num_labels"), record.get("labels"))
    model = prepare_model(model, recipe.method_name, recipe.method, recipe.share_across_layers, head=recipe.model.head)
    initial = {k: v.clone() for k, v in trainable_state(model).items()}
    load_tensors_into(model, Path(run_dir) / TENSORS)
    return Trained(recipe, record, model.eval(), initial, Path(run_dir))


def peft_common(trained: Trained, peft_type: str, target_modules: list[str]) -> tuple[dict, dict]:
    """The config keys every peft method shares, and the task head saved through `modules_to_save`."""
    from ..models.loading import resolve_model_path

    heads = sorted(trained_head(trained.model))
    tensors = {PREFIX + n: p for n, p in trained.model.named_parameters() if in_head(n, heads)}
    model = trained.recipe.model
    config = {"peft_type": peft_type, "task_type": PEFT_TASK_TYPES.get(model.task),
              "base_model_name_or_path": resolve_model_path(model.name_or_path), "revision": model.revision,
              "inference_mode": True, "target_modules": sorted(target_modules), "modules_to_save": heads or None}
    return config, tensors


def peft_lora(trained: Trained) -> tuple[dict, dict]:
    """LoRA/rsLoRA/DoRA, embedding and Conv1D targets. PiSSA is exported as a plain LoRA of rank 2r on the
    original weights: W_res + s·B·A = W + s·[B, -B0]·[A; A0] (the conversion HF peft documents for PiSSA)."""
    from ..methods.lora_layers import LoraConv1D, LoraEmbedding, LoraLinear

    cfg = trained.recipe.method
    modules = {n: m for n, m in trained.model.named_modules() if isinstance(m, (LoraLinear, LoraEmbedding))}
    config, tensors = peft_common(trained, "LORA", list(modules))
    ranks, alphas = {}, {}
    for name, module in modules.items():
        a, b = module.lora_A.detach(), module.lora_B.detach()
        if cfg.init == "pissa":
            a = torch.cat([a, trained.initial[f"{name}.lora_A"]], dim=0)
            b = torch.cat([b, -trained.initial[f"{name}.lora_B"]], dim=1)
        ranks[name] = a.shape[0]
        alphas[name] = module.scale * (ranks[name] ** 0.5 if cfg.use_rslora else ranks[name])
        if isinstance(module, LoraEmbedding):
            tensors.update({f"{PREFIX}{name}.lora_embedding_A": a, f"{PREFIX}{name}.lora_embedding_B": b})
        else:
            tensors.update({f"{PREFIX}{name}.lora_A.weight": a, f"{PREFIX}{name}.lora_B.weight": b})
        if getattr(module, "lora_magnitude", None) is not None:
            tensors[f"{PREFIX}{name}.lora_magnitude_vector"] = module.lora_magnitude.detach()
    (r, alpha), _ = Counter(zip(ranks.values(), alphas.values())).most_common(1)[0]
    config.update({
        "r": r, "lora_alpha": alpha, "use_rslora": cfg.use_rslora, "use_dora": cfg.use_dora,
        "lora_dropout": cfg.dropout, "bias": "none", "init_lora_weights": True,
        "fan_in_fan_out": any(isinstance(m, LoraConv1D) for m in modules.values()),
        # Exact module names, so peft's suffix-regex matching picks out exactly these modules.
        "rank_pattern": {re.escape(n): v for n, v in ranks.items() if v != r},
        "alpha_pattern": {re.escape(n): v for n, v in alphas.items() if v != alpha}})
    return config, tensors


def peft_ia3(trained: Trained) -> tuple[dict, dict]:
    from ..methods.ia3 import Ia3Linear

    modules = {n: m for n, m in trained.model.named_modules() if isinstance(m, Ia3Linear)}
    config, tensors = peft_common(trained, "IA3", list(modules))
    tensors.update({f"{PREFIX}{n}.ia3_l": m.ia3_l.detach() for n, m in modules.items()})
    config.update({"feedforward_modules": sorted(n for n, m in modules.items() if m.feedforward),
                   "fan_in_fan_out": False, "init_ia3_weights": True})
    return config, tensors


def peft_vera(trained: Trained) -> tuple[dict, dict]:
    """VeRA with `save_projection: true`: the shared A, B travel in the file, so peft never regenerates them."""
    from ..methods.vera import PROJECTION, VeraLinear

    cfg = trained.recipe.method
    modules = {n: m for n, m in trained.model.named_modules() if isinstance(m, VeraLinear)}
    config, tensors = peft_common(trained, "VERA", list(modules))
    for name, module in modules.items():
        tensors[f"{PREFIX}{name}.vera_lambda_d"] = module.vera_lambda_d.detach()
        tensors[f"{PREFIX}{name}.vera_lambda_b"] = module.vera_lambda_b.detach()
    projection = getattr(trained.model, PROJECTION)
    tensors.update({"base_model.vera_A": projection.vera_A, "base_model.vera_B": projection.vera_B})
    config.update({"r": cfg.r, "projection_prng_key": cfg.projection_seed, "save_projection": True,
                   "vera_dropout": cfg.dropout, "d_initial": cfg.d_initial, "bias": "none",
                   "fan_in_fan_out": False, "init_weights": True})
    return config, tensors


def peft_adalora(trained: Trained) -> tuple[dict, dict]:
    """AdaLoRA as peft's SVDLinear: delta = B·(A ⊙ E)·lora_alpha / (ranknum + 1e-5), ranknum = init_r. Our
    update is scale·P·diag(Λ⊙mask)·Q, so the mask and the scale ratio are folded into lora_E; pruned triplets
    are dropped and `rank_pattern` ({module}.lora_E -> keep flags, as peft saves it) restores the shapes."""
    from ..methods.adalora import adalora_modules

    cfg = trained.recipe.method
    modules = adalora_modules(trained.model)
    config, tensors = peft_common(trained, "ADALORA", list(modules))
    rank_pattern = {}
    for name, module in modules.items():
        mask = module.adalora_mask.detach().float().cpu()
        keep = mask != 0
        ranknum = float(module.lora_A.shape[0])  # peft keeps the initial rank as the divisor after resizing
        # fp32 like peft's ranknum parameter, so the folded factor cancels its epsilon exactly
        divisor = (torch.tensor(ranknum, dtype=torch.float32) + 1e-5).double().item()
        e = module.lora_E.detach().double().cpu() * mask.double() * module.scale * divisor / cfg.alpha
        tensors.update({f"{PREFIX}{name}.lora_A": module.lora_A.detach().cpu()[keep],
                        f"{PREFIX}{name}.lora_B": module.lora_B.detach().cpu()[:, keep],
                        f"{PREFIX}{name}.lora_E": e[keep].float().unsqueeze(1)})
        rank_pattern[f"{name}.lora_E"] = keep.tolist()
    total = 0
    if trained.run_dir is not None and (trained.run_dir / "trainer_state.json").is_file():
        total = json.loads((trained.run_dir / "trainer_state.json").read_text(encoding="utf-8")).get("max_steps", 0)
    total = max(int(total or 0), 1)  # peft requires total_step > 0; it only matters for further training
    tinit, tfinal = int(cfg.warmup * total), int(cfg.final * total)
    if tinit >= total - tfinal:
        tinit = tfinal = 0
    config.update({
        "init_r": cfg.init_r, "target_r": cfg.target_r, "lora_alpha": cfg.alpha, "lora_dropout": cfg.dropout,
        "tinit": tinit, "tfinal": tfinal, "deltaT": cfg.delta_t, "beta1": cfg.beta1, "beta2": cfg.beta2,
        "orth_reg_weight": cfg.orth_reg_weight, "total_step": total, "rank_pattern": rank_pattern,
        "bias": "none", "fan_in_fan_out": False, "init_lora_weights": True})
    return config, tensors


# One function per method: (Trained) -> (adapter_config dict, adapter_model tensors).
PEFT_EXPORTERS: dict[str, Callable[[Trained], tuple[dict, dict]]] = {
    "lora": peft_lora, "ia3": peft_ia3, "vera": peft_vera, "adalora": peft_adalora}


def _safetensors_bytes(tensors: dict[str, torch.Tensor]) -> bytes:
    from safetensors.torch import save

    return save({k: v.detach().float().contiguous().cpu() for k, v in tensors.items()}, metadata={"format": "pt"})


def _write_folder(target: Path, files: dict[str, bytes | str]) -> None:
    def fill(staging: Path) -> None:
        for name, data in files.items():
            (staging / name).write_bytes(data.encode("utf-8") if isinstance(data, str) else data)

    write_folder_atomically(target, fill)
