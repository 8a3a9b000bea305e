"""PeftTrainer: the HF Trainer with rule-based LR groups, method regularisers and pickle-free saving."""
from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from ..config.sections import OptimSection
from ..files import TENSORS
from ..methods.tensors import load_tensors_into
from .consistency import consistency_weight, second_pass
from .crash_safety import CheckpointingMixin
from .importance import ScaledLambdaLR, scaled_scheduler
from .importance_callback import ImportanceCallback
from .lr_groups import build_param_groups, describe_groups
from .multitask import TaskBatchesMixin

logger = logging.getLogger("peftcli")


class PeftTrainer(TaskBatchesMixin, CheckpointingMixin, Trainer):
    """Trainer for a model whose method modules are already injected.

    - create_optimizer: parameter groups from `optim` rules (see optim/lr_groups.py);
    - compute_loss: adds every module's `peft_aux_loss()` (method regularisers such as orthogonality or L0
      penalties) during training, and a second pass's consistency loss where modules ask for one
      (`peft_consistency_weight`, consistency.py);
    - _save: writes only the trainable tensors (safetensors) and never pickles TrainingArguments;
    - checkpoints (CheckpointingMixin, crash_safety.py): committed atomically with a manifest, pickle-free;
    - multi-task runs (TaskBatchesMixin, multitask.py): single-task batches and per-task metrics.
    """

    def __init__(self, *args, optim_rules: OptimSection | None = None, save_trained=None, chunked_loss=False,
                 **kwargs):
        super().__init__(*args, **kwargs)
        # Two-pass consistency (e.g. AdaMix) compares the passes' logits, which the chunked loss never makes.
        self._consistency = consistency_weight(self.model)
        self._causal = "CausalLM" in type(self.model).__name__
        if chunked_loss and self._consistency:
            logger.info("model.chunked_loss: off, the method's consistency loss needs the logits")
        # model.chunked_loss (speedups.py): the head whose training forward hands hidden states to the loss
        self._loss_head = self._chunked_loss_head() if chunked_loss and not self._consistency else None
        self.optim_rules = optim_rules or OptimSection()
        self.save_trained = save_trained  # (model, output_dir) -> None, writes the run's tensors + configs
        self._aux_modules = [m for m in self.model.modules() if hasattr(m, "peft_aux_loss")]
        # Importance-scored LR multipliers (optim/importance.py): the callback sets each group's lr_scale,
        # the scheduler multiplies it in.
        self.importance = None
        if self.optim_rules.importance is not None:
            self.importance = ImportanceCallback(self.optim_rules.importance, self.args.output_dir)
            self.add_callback(self.importance)

    def create_optimizer(self, model=None):
        if self.optimizer is not None:
            return self.optimizer
        opt_model = self.model if model is None else model
        groups = build_param_groups(opt_model, self.optim_rules, self.args.learning_rate, self.args.weight_decay)
        optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
        optimizer_kwargs.pop("lr", None)  # each group carries its own
        self.optimizer = optimizer_cls(groups, **optimizer_kwargs)
        for line in describe_groups(groups):
            logger.info("param group %s", line)
        return self.optimizer

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        scheduler = super().create_scheduler(num_training_steps, optimizer)
        if self.importance is not None and not isinstance(scheduler, ScaledLambdaLR):
            self.lr_scheduler = scaled_scheduler(scheduler)
        return self.lr_scheduler

    def training_step(self, model, inputs, *args, **kwargs):
        if self.importance is not None:
            self.importance.observe(model, inputs)
        return super().training_step(model, inputs, *args, **kwargs)

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        if self.importance is not None and "loss" in logs:
            logs.update(self.importance.log_summary())
        super().log(logs, *args, **kwargs)

    def _chunked_loss_head(self):
        from ..models.speedups import install_chunked_loss

        if self.is_fsdp_enabled or self.is_deepspeed_enabled or self.args.label_smoothing_factor:
            logger.info("model.chunked_loss: off under FSDP / DeepSpeed / label smoothing (the model's own loss)")
            return None
        head = install_chunked_loss(self.model)
        logger.info("model.chunked_loss: %s", "on" if head is not None else
                    f"not available for {type(self.model).__name__} (the model's own loss)")
        return head

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        from ..models.speedups import hidden_states_to_loss

        chunked = self._loss_head if model.training and not return_outputs and "labels" in inputs else None
        two_pass = bool(self._consistency) and model.training and "labels" in inputs
        with hidden_states_to_loss(chunked):  # a copy of inputs for two passes: label smoothing pops the labels
            result = super().compute_loss(model, dict(inputs) if two_pass else inputs,
                                          return_outputs=return_outputs or two_pass,
                                          num_items_in_batch=num_items_in_batch)
        if not (model.training and (self._aux_modules or two_pass)):
            return result
        loss, outputs = result if return_outputs or two_pass else (result, None)
        if two_pass:
            loss = loss + self._consistency * self._second_pass(model, inputs, outputs, num_items_in_batch)
        for module in self._aux_modules:
            aux = module.peft_aux_loss()
            if aux is not None:
                loss = loss + aux
        return (loss, outputs) if return_outputs else loss

    def _second_pass(self, model, inputs, outputs, num_items_in_batch):
        """The consistency loss of a second forward pass on the batch against the first pass's logits."""
        tokens = None
        if self.model_accepts_loss_kwargs and num_items_in_batch is not None:
            # the task loss is a token sum over the step's count (Trainer.compute_loss): normalise alike
            share = self.accelerator.num_processes // self.get_tp_size()
            tokens = num_items_in_batch / share if self.args.average_tokens_across_devices else num_items_in_batch
        return second_pass(model, inputs, outputs.logits, self._causal, tokens)

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        output_dir = output_dir or self.args.output_dir
        if not self.args.should_save:
            return
        os.makedirs(output_dir, exist_ok=True)
        model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        if state_dict:  # gathered from all ranks by the Trainer under FSDP / ZeRO-3
            self.save_trained(model, output_dir, state_dict)
        else:
            self.save_trained(model, output_dir)

    def _save_checkpoint(self, model, trial) -> None:
        # The Trainer records best_model_checkpoint inside its own _save_checkpoint, which CheckpointingMixin
        # replaces: record it here, before the save, so the checkpoint's state and its rotation both know it.
        best = self.state.best_global_step
        if best:
            path = Path(self.args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{best}"
            if best == self.state.global_step or path.is_dir():
                self.state.best_model_checkpoint = str(path)
        super()._save_checkpoint(model, trial)

    def _load_best_model(self) -> None:
        """The Trainer looks for full model weights; our checkpoints hold only the trained tensors."""
        path = Path(self.state.best_model_checkpoint) / TENSORS
        logger.info("loading the best checkpoint %s (%s %s)", path.parent.name, self.args.metric_for_best_model,
                    self.state.best_metric)
        load_tensors_into(self.accelerator.unwrap_model(self.model), path)


class JsonlLogCallback(TrainerCallback):
    """Appends every logged dict (loss, lr, eval metrics) to <run>/log.jsonl on the main process."""

    def __init__(self, path: str):
        self.path = path

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            with open(self.path, "a", encoding="utf-8") as handle:
                record = {"step": state.global_step, "epoch": state.epoch, "time": round(time.time(), 3)}
                handle.write(json.dumps({**record, **_floats(logs)}) + "\n")


def _floats(logs: dict) -> dict:
    return {k: (float(v) if isinstance(v, (int, float, torch.Tensor)) else v) for k, v in logs.items()}
