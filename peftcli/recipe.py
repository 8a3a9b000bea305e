"""The recipe: strict loading, ${...} interpolation, --set overrides, and the typed sections."""
from __future__ import annotations

import copy
import dataclasses
import difflib
import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml

from .errors import UserError
from .schema import (Where, build, check_keys, did_you_mean, field, fraction, init_field_names, non_negative,
                     open_fraction, positive)
from .yamlio import LocDict, parse_scalar, read_yaml_file

TASKS = ("sequence-classification", "causal-lm", "token-classification", "seq2seq", "image-classification")
Task = Literal["sequence-classification", "causal-lm", "token-classification", "seq2seq", "image-classification"]


@dataclasses.dataclass
class ModelSection:
    name_or_path: str = field(doc="hub id | local dir | pkg:<python package>/<subdir>")
    task: Task = field("sequence-classification", doc="what the model is trained to do")
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = field("float32", doc="dtype the base weights load in")
    revision: str | None = field(None, doc="hub revision (commit) to pin")
    trust_remote_code: bool = field(False, doc="run the model repo's own code; needs a pinned revision")
    gguf_file: str | None = field(None, doc="GGUF file inside name_or_path (dequantised on load)")
    num_labels: int | None = field(None, check=positive, doc="classes; 1 = regression. Inferred from data if unset")
    labels: list[str] | None = field(None, doc="label names in id order. Inferred from data if unset")
    attn_implementation: str | None = field(None, doc="eager | sdpa | flash_attention_2 | varlen (per-example "
                                                      "attention for packed rows; the default with data.packing)")
    fused_kernels: bool | None = field(None, doc="swap Llama/Mistral/Qwen RMSNorm, SwiGLU MLPs and rotary "
                                                  "embedding for fused Triton kernels; parameter names unchanged. "
                                                  "Unset: on where CUDA and Triton are available and the model "
                                                  "has such modules; true: required (an error where there is "
                                                  "nothing to fuse; PyTorch math off CUDA); false: off")
    chunked_loss: bool = field(True, doc="causal-lm training: cross entropy from the hidden states chunk by chunk, "
                                         "never the full logits (same loss; Llama/Mistral/Qwen/Phi-3/OLMo-2/Gemma)")
    allow_pickle: bool = field(False, doc="allow pickle-based weight files (.bin/.pt): they can run code on load")


@dataclasses.dataclass
class TaskDataSection:
    """One task of a multi-task run, `data.tasks.<name>` (sequence classification). Keys left out take the value
    the `data:` section gives them (text, text_pair, label, max_length, limit, format, columns, eval_fraction)."""

    train: str = field(doc="file | dir | glob | hub:<id>[:<config>]")
    eval: str | None = field(None, doc="evaluation data (same forms as train); tasks without eval are not scored")
    eval_fraction: float | None = field(None, check=fraction, doc="hold out this fraction of train when eval is unset")
    format: Literal["auto", "csv", "tsv", "json", "jsonl", "parquet", "text"] = field("auto", doc="file format")
    columns: list[str] | None = field(None, doc="column names for header-less csv/tsv files")
    text: str = field("text", doc="text column")
    text_pair: str | None = field(None, doc="second text column for sentence pairs")
    label: str = field("label", doc="label column")
    max_length: int = field(128, check=positive, doc="tokens per example (longer ones are truncated)")
    limit: dict[str, int] = field(factory=dict, doc="row limits per split, e.g. {train: 2000}")
    num_labels: int | None = field(None, check=positive, doc="this task's classes; 1 = regression. Inferred if unset")
    labels: list[str] | None = field(None, doc="this task's label names in id order. Inferred if unset")
    metrics: list[str] | None = field(None, doc="this task's metrics; default eval.metrics, else the task default")


@dataclasses.dataclass
class DataSection:
    train: str | None = field(None, doc="file | dir | glob | hub:<id>[:<config>] (required unless data.tasks)")
    eval: str | None = field(None, doc="evaluation data (same forms as train)")
    eval_fraction: float | None = field(None, check=fraction, doc="hold out this fraction of train when eval is unset")
    format: Literal["auto", "csv", "tsv", "json", "jsonl", "parquet", "text"] = field("auto", doc="file format")
    columns: list[str] | None = field(None, doc="column names for header-less csv/tsv files")
    text: str = field("text", doc="text column (classification, plain-text LM)")
    text_pair: str | None = field(None, doc="second text column for sentence pairs")
    label: str = field("label", doc="label column (classification)")
    image: str = field("image", doc="image column (image classification: a path, bytes or {bytes, path})")
    tokens: str = field("tokens", doc="token column (token classification)")
    tags: str = field("tags", doc="tag column (token classification)")
    prompt: str | None = field(None, doc="prompt column (causal-lm prompt/response data)")
    response: str | None = field(None, doc="response column (causal-lm prompt/response data)")
    lm_format: Literal["auto", "alpaca", "messages", "prompt_response", "text"] = field(
        "auto", doc="causal-lm example format; auto detects from columns")
    train_on_prompt: bool = field(False, doc="causal-lm: also put loss on prompt tokens")
    max_length: int = field(128, check=positive, doc="tokens per example (longer ones are truncated)")
    limit: dict[str, int] = field(factory=dict, doc="row limits per split, e.g. {train: 2000}")
    packing: bool = field(False, doc="causal-lm: pack several examples per row (no cross-attention)")
    tasks: dict[str, TaskDataSection] | None = field(
        None, doc="multi-task: task name -> its data (see data.tasks.<name>); one shared method, one head per task")
    sampling: Literal["proportional", "temperature", "round_robin"] = field(
        "proportional", doc="multi-task: which task each batch comes from: proportional to its rows (one pass over "
                            "every task per epoch), temperature (p ∝ rows^(1/T)), round_robin (tasks in turn)")
    sampling_temperature: float = field(2.0, check=positive, doc="multi-task: T of sampling: temperature (1 = "
                                                                   "proportional, larger = closer to uniform)")


@dataclasses.dataclass
class LrGroupRule:
    pattern: str = field(doc="regex matched against parameter names (re.search)")
    lr_scale: float | None = field(None, check=positive, doc="multiplier on the base learning rate")
    lr: float | None = field(None, check=positive, doc="absolute learning rate")
    weight_decay: float | None = field(None, check=non_negative, doc="weight decay for this group")


IMPORTANCE_SCORES = ("weight_l1", "weight_l2", "grad_norm", "taylor", "fisher", "hessian")


def _check_scores(value: dict) -> str | None:
    unknown = [k for k in value if k not in IMPORTANCE_SCORES]
    if unknown or not value:
        return f"score names must be among {', '.join(IMPORTANCE_SCORES)}; got {', '.join(map(str, value)) or 'none'}"
    return None if all(w >= 0 for w in value.values()) and any(value.values()) else "weights must be >= 0, not all 0"


def _check_range(value: list) -> str | None:
    ok = len(value) == 2 and 0 < value[0] <= 1 <= value[1]
    return None if ok else f"must be [min, max] with 0 < min <= 1 <= max, got {value}"


@dataclasses.dataclass
class ImportanceSection:
    scores: dict[str, float] = field(
        factory=lambda: {"taylor": 1.0}, check=_check_scores,
        doc="score -> weight: weight_l1 | weight_l2 | grad_norm | taylor | fisher | hessian")
    granularity: Literal["tensor", "module", "layer"] = field("layer", doc="what one LR multiplier covers")
    ema: float = field(0.9, check=open_fraction, doc="EMA factor of the scores (0 = latest batch only)")
    mapping: Literal["rank", "power"] = field("rank", doc="rank: exp((u-1/2)/T), u = normalised rank; "
                                                          "power: (score/geo-mean)^(1/T)")
    temperature: float = field(1.0, check=positive, doc="T: larger = flatter multipliers")
    scale_range: list[float] = field(factory=lambda: [0.5, 2.0], check=_check_range, doc="[min, max] clamp")
    invert: bool = field(False, doc="give the least important groups the largest rate")
    warmup_steps: int = field(20, check=non_negative, doc="steps of base rates before the first update")
    update_every: int = field(10, check=positive, doc="K: recompute the multipliers every K steps")
    score_every: int = field(1, check=positive, doc="fold gradient scores into the EMA every k-th step only "
                                                    "(their per-step cost divides by k)")
    layers: list[int] | None = field(None, doc="scale only these layer indices; the rest keep the base rate")
    hessian_probes: int = field(1, check=positive, doc="Hutchinson probes per Hessian estimate")
    hessian_interval: int = field(50, check=positive, doc="steps between Hessian estimates (a double backward)")


@dataclasses.dataclass
class OptimSection:
    lr_groups: list[LrGroupRule] = field(factory=list, doc="first matching rule wins")
    layer_decay: float | None = field(None, check=lambda v: None if 0 < v <= 1 else f"must be in (0, 1], got {v}",
                                      doc="layer-wise LR decay: layer i of L gets decay^(L-i)")
    lora_plus_ratio: float | None = field(None, check=positive, doc="LoRA+: lr of lora_B = ratio x lr of lora_A")
    importance: ImportanceSection | None = field(None, doc="importance-scored LR multipliers per group")


@dataclasses.dataclass
class EvalSection:
    metrics: list[str] | None = field(None, doc="metric names; default depends on the task")
    batch_size: int = field(64, check=positive, doc="evaluation batch size")
    early_stopping_patience: int | None = field(None, check=positive, doc="stop after this many evaluations "
                                                "without improving train.metric_for_best_model")
    early_stopping_threshold: float = field(0.0, check=non_negative, doc="smallest change that counts as improving")
    max_new_tokens: int = field(64, check=positive, doc="causal-lm generation metrics: tokens generated per prompt")


def _check_prune(value) -> str | None:
    return None if value == "every_other" or isinstance(value, list) else "must be every_other or a list of indices"


@dataclasses.dataclass
class LayerDropSection:
    """Works with any method: layers are skipped at random while training (Fan et al. 2019, LayerDrop).
    Skipped layers get no gradient: multi-GPU DDP runs need train.ddp_find_unused_parameters: true."""

    rate: float = field(0.1, check=open_fraction, doc="probability of skipping a layer (0.1-0.2 in Fan et al.)")
    schedule: Literal["constant", "linear"] = field("constant", doc="linear: ramp the rate up from 0 over training")
    depth_scaling: Literal["uniform", "linear"] = field("uniform", doc="linear: layer l of L drops at rate*(l+1)/L "
                                                                      "(stochastic depth, Huang et al. 2016)")
    prune_layers: list[int] | Literal["every_other"] | None = field(
        None, check=_check_prune, doc="at eval / merge-export remove these layers (every_other: odd layers)")


@dataclasses.dataclass
class DistillSection:
    teacher: str = field(doc="teacher model: a model path/id or a finished run directory")
    alpha: float = field(0.5, check=fraction, doc="loss = (1 - alpha) task + alpha T^2 KL(teacher || student)")
    temperature: float = field(2.0, check=positive, doc="T: softens both distributions (Hinton et al. 2015, Sec. 2)")


@dataclasses.dataclass
class Recipe:
    source: str
    raw: dict
    model: ModelSection
    data: DataSection
    method_name: str
    method: Any
    train: dict
    optim: OptimSection
    eval: EvalSection
    layerdrop: LayerDropSection | None = None
    distill: DistillSection | None = None
    share_across_layers: bool = False  # method.share_across_layers: one set of method tensors for every layer

    @property
    def output_dir(self) -> Path:
        return Path(self.train["output_dir"])


SECTIONS = {"model": ModelSection, "data": DataSection, "method": None, "train": None, "optim": OptimSection,
            "eval": EvalSection, "layerdrop": LayerDropSection, "distill": DistillSection}
_INTERP = re.compile(r"\$\{([^}]*)\}")
# Whole name parts only: hub_token / HF_TOKEN / WANDB_API_KEY are secrets, average_tokens_across_devices is not.
SECRET_KEY = re.compile(r"(?:^|_)(?:token|api_key|apikey|password|secret)(?:$|_)", re.I)


def load_recipe(path: str | Path, overrides: list[str] = (), output_dir: str | None = None) -> Recipe:
    """Read, interpolate, override and validate a recipe. Raises UserError on any problem."""
    path = Path(path)
    data = read_yaml_file(path)
    return recipe_from_dict(data, str(path), path.parent, overrides, output_dir)


def recipe_from_dict(data, source: str, recipe_dir: Path, overrides=(), output_dir=None) -> Recipe:
    if not isinstance(data, dict):
        raise UserError(f"{source}: the top level must be a mapping with model/data/method/train sections")
    data = copy.deepcopy(data)
    for item in overrides:
        apply_override(data, item)
    if output_dir:
        data.setdefault("train", LocDict())["output_dir"] = output_dir
    data = interpolate(data, Where(source, "", None), recipe_dir)
    root = Where(source, "", None)
    check_keys(data, SECTIONS, root, "a recipe")
    for required in ("model", "data", "method"):
        if required not in data:
            raise root.error(f"missing section '{required}'; see recipes/quickstart.yaml for a complete recipe")
    model = build(ModelSection, data["model"], root.child("model", data))
    data_section = build_data(data["data"], root.child("data", data))
    method_name, method_cfg, share = build_method(data["method"], root.child("method", data), model.task)
    train = build_train(data.get("train") or {}, root.child("train", data), source)
    optim = build(OptimSection, data.get("optim"), root.child("optim", data))
    eval_section = build(EvalSection, data.get("eval"), root.child("eval", data))
    check_model_safety(model, root.child("model", data))
    check_packing(model, data_section, method_name, root.child("data", data), data["data"])
    raw = plain(data)
    raw["train"] = {**(raw.get("train") or {}), "output_dir": train["output_dir"]}  # `train:` may be empty
    extras = {key: build(SECTIONS[key], data[key], root.child(key, data)) for key in ("layerdrop", "distill")
              if data.get(key) is not None}
    recipe = Recipe(source, raw, model, data_section, method_name, method_cfg, train, optim, eval_section, **extras,
                    share_across_layers=share)
    if data_section.tasks is not None:
        from .multitask import check_recipe

        check_recipe(recipe, data, root)
    return recipe


def build_data(section, where: Where) -> DataSection:
    """The data section; with `tasks`, the section's own keys are the defaults of every task's keys."""
    if isinstance(section, dict) and isinstance(section.get("tasks"), dict):
        from .multitask import inherit_defaults

        section = inherit_defaults(section, where)
    built = build(DataSection, section, where)
    if built.tasks is None and built.train is None:
        raise where.child("train", section).error("is required (or list several datasets under data.tasks)")
    for key in ("sampling", "sampling_temperature"):
        if built.tasks is None and key in section:
            raise where.child(key, section).error("picks among the tasks of data.tasks; a single-task run has none: "
                                                  "drop it or list the datasets under data.tasks")
    return built


# A method-section key every method accepts (handled by sharing.py after injection, not by the method itself).
SHARE_KEY = "share_across_layers"


def build_method(section, where: Where, task: str):
    from .methods import get_method, METHODS

    if not isinstance(section, dict) or "name" not in section:
        raise where.error(f"needs 'name:' (one of {', '.join(METHODS)})")
    name = section["name"]
    if not isinstance(name, str):
        raise where.child("name", section).error(f"expected a method name (text), got {name!r}; registered: "
                                                 f"{', '.join(METHODS)}")
    method = get_method(name, where.child("name", section))
    if task not in method.tasks:
        raise where.child("name", section).error(
            f"method '{name}' does not support task '{task}' (it supports: {', '.join(sorted(method.tasks))})")
    options = {k: v for k, v in section.items() if k not in ("name", SHARE_KEY)}
    if isinstance(section, LocDict):
        options = LocDict(options)
        options.lines, options.origins = section.lines, section.origins
    cfg = build(method.config_cls, options, where)
    if method.validate:
        message = method.validate(cfg)
        if message:
            raise where.error(message)
    share = section.get(SHARE_KEY, False)
    if not isinstance(share, bool):
        raise where.child(SHARE_KEY, section).error(f"expected true or false, got {share!r}")
    return name, cfg, share


def training_args_docs() -> str:
    """The TrainingArguments reference of the installed transformers release."""
    from importlib.metadata import version

    return (f"https://huggingface.co/docs/transformers/v{version('transformers')}/en/main_classes/trainer"
            f"#transformers.TrainingArguments")


def build_train(section, where: Where, source: str) -> dict:
    """The train section is passed to TrainingArguments: keys are checked against its fields."""
    if not isinstance(section, dict):
        raise where.error("expected a mapping of TrainingArguments keys")
    allowed = init_field_names("transformers.training_args", "TrainingArguments")
    for key in section:
        if key not in allowed:
            hint = did_you_mean(key, allowed)
            others = [c for c in difflib.get_close_matches(key, allowed, n=4, cutoff=0.6) if f"'{c}'" not in hint]
            hint += f" (also close: {', '.join(others)})" if others else ""
            raise where.child(key, section).error(
                f"unknown key{hint}; 'train' takes transformers.TrainingArguments keys: {training_args_docs()}")
    for key, value in section.items():
        if SECRET_KEY.search(key) and value not in (None, "", False):
            raise where.child(key, section).error(
                "secrets do not belong in a recipe (it is saved with the run); set them in the environment")
    out = dict(section)
    checks = {"learning_rate": positive, "per_device_train_batch_size": positive, "per_device_eval_batch_size": positive,
              "num_train_epochs": positive, "gradient_accumulation_steps": positive, "weight_decay": non_negative,
              "warmup_steps": non_negative, "max_grad_norm": non_negative}
    for key, check in checks.items():
        if key in out:
            if isinstance(out[key], bool) or not isinstance(out[key], (int, float)):
                raise where.child(key, section).error(f"expected a number, got {out[key]!r}")
            message = check(out[key])
            if message:
                raise where.child(key, section).error(message)
    out.setdefault("output_dir", str(Path("runs") / Path(source).stem))
    if not isinstance(out["output_dir"], str) or not out["output_dir"].strip():
        raise where.child("output_dir", section).error(
            f"expected a folder path, got {out['output_dir']!r}; e.g. output_dir: runs/my-run")
    return out


# Methods that put virtual tokens or a key/value prefix in front of each row: in a packed row only the first
# example would see them.
ROW_PREFIX_METHODS = ("prompt_tuning", "p_tuning", "prefix_tuning", "p_tuning_v2", "trigger_tokens",
                      "soft_trigger_tokens", "mam", "unipelt")


def check_packing(model: ModelSection, data: DataSection, method_name: str, where: Where, section) -> None:
    """Packed rows run varlen attention unless the recipe names another implementation."""
    if not data.packing:
        return
    if method_name in ROW_PREFIX_METHODS:
        raise where.child("packing", section).error(
            f"method '{method_name}' prepends virtual tokens or a prefix to each row; in a packed row only the "
            f"first example would see them: set data.packing: false")
    if model.attn_implementation is None:
        model.attn_implementation = "varlen"


def check_model_safety(model: ModelSection, where: Where) -> None:
    if model.trust_remote_code and not model.revision:
        raise where.error("trust_remote_code: true runs the model repository's code: pin it with "
                          "'revision: <commit sha>' (or set trust_remote_code: false)")


def interpolate(value, where: Where, recipe_dir: Path):
    """Resolve ${env:NAME,default} and ${recipe_dir} inside every string, keeping line information."""
    if isinstance(value, dict):
        out = LocDict({k: interpolate(v, where.child(k, value), recipe_dir) for k, v in value.items()})
        if isinstance(value, LocDict):
            out.lines, out.line, out.origins = value.lines, value.line, value.origins
        return out
    if isinstance(value, list):
        return [interpolate(v, where, recipe_dir) for v in value]
    if not isinstance(value, str):
        return value

    def replace(match: re.Match) -> str:
        expr = match.group(1)
        if expr == "recipe_dir":
            return str(recipe_dir)
        if expr.startswith("env:"):
            name, _, default = expr[4:].partition(",")
            name = name.strip()
            if SECRET_KEY.search(name):
                raise where.error(f"${{env:{name}}} would copy a secret into the recipe saved with the run; leave "
                                  f"{name} in the environment, where the libraries read it")
            if name not in os.environ and not _:
                raise where.error(f"environment variable {name} is not set (write ${{env:{name},default}} "
                                  f"to give a default)")
            return os.environ.get(name, default)
        raise where.error(f"unknown interpolation ${{{expr}}}; use ${{env:NAME,default}} or ${{recipe_dir}}")

    return _INTERP.sub(replace, value)


def apply_override(data: dict, item: str) -> None:
    """`--set key.path=value`: value parsed as a YAML scalar with the recipe's rules."""
    key, sep, text = item.partition("=")
    if not sep or not key.strip():
        raise UserError(f"--set {item!r}: expected key.path=value, e.g. --set train.learning_rate=3e-4")
    parts = key.strip().split(".")
    node = data
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = LocDict()
            _remember_origin(node, part, item)
        if not isinstance(child, dict):
            raise UserError(f"--set {item!r}: '{part}' is not a section")
        node = child
    node[parts[-1]] = parse_scalar(text, f"--set {key}") if text.strip() else ""
    _remember_origin(node, parts[-1], item)


def _remember_origin(node: dict, key: str, item: str) -> None:
    """Errors about this key then name the `--set` argument instead of a line of the recipe file."""
    if isinstance(node, LocDict):
        node.origins[key] = f"--set {item}"


def plain(value):
    """Drop LocDict wrappers so the resolved recipe dumps as plain YAML."""
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [plain(v) for v in value]
    return value


def dump_recipe(raw: dict) -> str:
    return yaml.safe_dump(raw, sort_keys=False, allow_unicode=True)
