"""The recipe's typed sections (model, data, optim, eval, layerdrop, distill): every key typed, documented and
range-checked where it is declared."""
from __future__ import annotations

import dataclasses
from typing import Literal

from .schema import field, fraction, non_negative, open_fraction, positive

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
    head: Literal["auto", "classifier", "none"] = field(
        "auto", doc="what trains besides the method (classification tasks): auto = the architecture's whole task "
                    "head (e.g. BERT's pooler + classifier, RoBERTa's classifier, Llama's score); classifier = "
                    "only the modules beside the backbone; none = nothing (a base whose head is already trained)")
    pooling: Literal["auto", "pooler", "cls", "mean", "max", "last"] = field(
        "auto", doc="the vector the sequence-classification head reads: auto = the pooling the model folder "
                    "declares (sentence-transformers' 1_Pooling), else pooler = the architecture's own ([CLS] "
                    "through BERT's pooler, Llama's last token); cls | mean | max | last over the tokens. Only "
                    "pooler merges into a plain HF model")


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
    trust_metric_code: bool = field(False, doc="allow `evaluate:<folder or .py>` metrics: they run that Python "
                                               "script, which can do anything your account can")


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
