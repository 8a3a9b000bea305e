"""The recipe: strict loading, ${...} interpolation, --set overrides, and the typed sections."""
from __future__ import annotations

import copy
import dataclasses
import difflib
import os
import re
from pathlib import Path
from typing import Any, Mapping

import yaml

from ..errors import UserError
from .schema import Where, build, check_keys, did_you_mean, init_field_names, non_negative, positive
from .yamlio import LocDict, parse_scalar, read_yaml_file

from .sections import DataSection, DistillSection, EvalSection, LayerDropSection, ModelSection, OptimSection


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


def load_recipe(path: str | Path, methods: Mapping, overrides: list[str] = (), output_dir: str | None = None) -> Recipe:
    """Read, interpolate, override and validate a recipe. Raises UserError on any problem. `methods`: the method
    registry (name -> record with config_cls, tasks, validate), which the methods layer passes in
    (methods.recipes.load_recipe), so this layer needs no method code."""
    path = Path(path)
    data = read_yaml_file(path)
    return recipe_from_dict(data, str(path), path.parent, methods, overrides, output_dir)


def recipe_from_dict(data, source: str, recipe_dir: Path, methods: Mapping, overrides=(), output_dir=None) -> Recipe:
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
    method_name, method_cfg, share = build_method(data["method"], root.child("method", data), model.task, methods)
    train = build_train(data.get("train") or {}, root.child("train", data), source)
    optim = build(OptimSection, data.get("optim"), root.child("optim", data))
    eval_section = build(EvalSection, data.get("eval"), root.child("eval", data))
    check_model_safety(model, root.child("model", data))
    check_pooling(model, root.child("model", data), data["model"])
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


def build_method(section, where: Where, task: str, methods: Mapping):
    if not isinstance(section, dict) or "name" not in section:
        raise where.error(f"needs 'name:' (one of {', '.join(methods)})")
    name = section["name"]
    if not isinstance(name, str):
        raise where.child("name", section).error(f"expected a method name (text), got {name!r}; registered: "
                                                 f"{', '.join(methods)}")
    if name not in methods:
        raise where.child("name", section).error(
            f"unknown method {name!r}{did_you_mean(name, methods)}; registered: {', '.join(methods)}")
    method = methods[name]
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


def check_pooling(model: ModelSection, where: Where, section) -> None:
    if model.pooling not in ("auto", "pooler") and model.task != "sequence-classification":
        raise where.child("pooling", section).error(
            f"{model.pooling} pooling applies to sequence-classification; for {model.task} leave it at auto")


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
