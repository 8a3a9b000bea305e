"""The Trainer's checkpoint save/load replaced by committed, pickle-free checkpoints; NaN and signal stops."""
from __future__ import annotations

import json
import logging
import os
import signal
from pathlib import Path

import torch
from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

from . import checkpoints as checkpoint
from ..errors import TrainingDiverged, TrainingInterrupted, TrainingOutOfMemory, UserError
from ..files import TENSORS
from ..methods.tensors import load_tensors_into
from .state_io import load_state, rng_state, save_state, set_rng_state

logger = logging.getLogger("peftcli")
TRAINER_STATE = "trainer_state.json"


class CheckpointingMixin:
    """Mixed into PeftTrainer ahead of transformers.Trainer. Overrides every method through which the Trainer
    pickles (optimizer/scheduler/scaler/RNG state, training_args.bin) or reads a checkpoint."""

    def __init__(self, *args, recipe_sha256: str = "", **kwargs):
        super().__init__(*args, **kwargs)
        self.recipe_sha256 = recipe_sha256

    def _save_checkpoint(self, model, trial) -> None:
        self.store_flos()
        step, run_dir = self.state.global_step, Path(self.args.output_dir)
        main = self.is_world_process_zero()
        if main:
            checkpoint.begin(run_dir, step)
        self.accelerator.wait_for_everyone()
        staging = checkpoint.staging_path(run_dir, step)
        if main:
            self._save(str(staging))
            save_state(self.optimizer.state_dict(), staging / "optimizer")
            save_state(self.lr_scheduler.state_dict(), staging / "scheduler")
            scaler = getattr(self.accelerator, "scaler", None)
            if scaler is not None:
                save_state(scaler.state_dict(), staging / "scaler")
            save_state(self._callback_states(), staging / "callbacks")
            self._export_hf_callback_states()
            self.state.save_to_json(str(staging / TRAINER_STATE))
        # Every process saves its own RNG streams (dropout differs per rank).
        save_state(rng_state(), staging / f"rng_state_{self.args.process_index}")
        checkpoint.maybe_kill("staged", step)
        self.accelerator.wait_for_everyone()
        if main:
            final = checkpoint.commit(staging, step, self.args.world_size, self.recipe_sha256)
            checkpoint.maybe_kill("before_rotate", step)
            best = self.state.best_model_checkpoint  # load_best_model_at_end needs it to survive rotation
            keep = {final} | ({Path(best)} if best else set())
            for path in checkpoint.rotate(run_dir, self.args.save_total_limit, keep=keep):
                logger.info("removed old checkpoint %s (save_total_limit=%s)", path.name, self.args.save_total_limit)
        self.accelerator.wait_for_everyone()

    def _export_hf_callback_states(self) -> None:
        """transformers' own stateful callbacks (TrainerControl, early stopping) ride in trainer_state.json."""
        for cb in self.callback_handler.callbacks + [self.control]:
            if isinstance(cb, ExportableState):
                name = cb.__class__.__name__
                if isinstance(self.state.stateful_callbacks.get(name), list):
                    self.state.stateful_callbacks[name].append(cb.state())
                else:
                    self.state.stateful_callbacks[name] = cb.state()

    def _stateful_callbacks(self) -> dict:
        """Callbacks exposing state_dict()/load_state_dict() (e.g. importance scores), keyed by class name."""
        found: dict[str, TrainerCallback] = {}
        for cb in self.callback_handler.callbacks:
            if callable(getattr(cb, "state_dict", None)) and callable(getattr(cb, "load_state_dict", None)):
                name, i = cb.__class__.__name__, 1
                while name in found:
                    name, i = f"{cb.__class__.__name__}#{i}", i + 1
                found[name] = cb
        return found

    def _callback_states(self) -> dict:
        return {name: cb.state_dict() for name, cb in self._stateful_callbacks().items()}

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None) -> None:
        path = Path(resume_from_checkpoint)
        load_tensors_into(self.accelerator.unwrap_model(model or self.model), path / TENSORS)
        saved = load_state(path / "callbacks")
        for name, cb in self._stateful_callbacks().items():
            if name not in saved:
                raise UserError(f"{path}: holds no state for callback {name}; it was saved by a run with other "
                                f"callbacks: resume from a checkpoint of this configuration or start a new run")
            cb.load_state_dict(saved.pop(name))
        for name in saved:
            logger.warning("%s: state of callback %s ignored: this run has no such callback", path, name)

    def _load_optimizer_and_scheduler(self, checkpoint_dir) -> None:
        if checkpoint_dir is None:
            return
        self.optimizer.load_state_dict(load_state(Path(checkpoint_dir) / "optimizer"))
        self.lr_scheduler.load_state_dict(load_state(Path(checkpoint_dir) / "scheduler"))

    def _load_scaler(self, checkpoint_dir) -> None:
        scaler = getattr(self.accelerator, "scaler", None)
        if checkpoint_dir is None or scaler is None:
            return
        scaler.load_state_dict(load_state(Path(checkpoint_dir) / "scaler"))

    def _load_rng_state(self, checkpoint_dir) -> None:
        if checkpoint_dir is None:
            return
        base = Path(checkpoint_dir) / f"rng_state_{self.args.process_index}"
        if not base.with_suffix(".json").is_file():
            raise UserError(f"{checkpoint_dir}: no RNG state for process {self.args.process_index}; resuming "
                            f"without it would not reproduce the run: resume with the run's number of processes")
        set_rng_state(load_state(base))

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        if not torch.isfinite(loss).all():
            raise TrainingDiverged(self._divergence_message(float(loss.detach().float().mean())))
        return loss

    def _divergence_message(self, value: float) -> str:
        scaler = getattr(self.accelerator, "scaler", None)
        scale = f"{scaler.get_scale():g}" if scaler is not None else "none"
        dtype = next(self.model.parameters()).dtype
        latest = checkpoint.find_latest(Path(self.args.output_dir))
        kept = f"the last good checkpoint is {latest}" if latest else "no checkpoint was saved yet"
        return (f"loss became {value} at step {self.state.global_step + 1} (dtype {str(dtype).replace('torch.', '')}"
                f", loss scale {scale}); training stopped and {kept}; lower train.learning_rate, set "
                f"train.max_grad_norm, or use float32/bfloat16 weights")


class StopOnSignal(TrainerCallback):
    """First SIGTERM/SIGINT: finish the current step, commit a checkpoint, stop. Second: die at once."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.received: int | None = None
        self.stopped_at: int | None = None
        self._previous = {}

    def _handle(self, signum, frame):
        if self.received is not None:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.received = signum
        logger.warning("%s received: finishing this step and saving a checkpoint (send it again to stop at once)",
                       signal.Signals(signum).name)

    def on_train_begin(self, args, state, control, **kwargs):
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)

    def on_train_end(self, args, state, control, **kwargs):
        self.restore()

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def on_step_end(self, args, state, control, **kwargs):
        checkpoint.maybe_kill("step_end", state.global_step)
        if self._any_rank_signalled(args):
            self.stopped_at = state.global_step
            control.should_save = True
            control.should_training_stop = True
        return control

    def _any_rank_signalled(self, args) -> bool:
        flag = self.received is not None
        if args.world_size > 1 and torch.distributed.is_initialized():
            # All ranks must stop at the same step, or the others wait forever in the next collective.
            tensor = torch.tensor([1.0 if flag else 0.0], device=args.device)
            torch.distributed.all_reduce(tensor)
            flag = bool(tensor.item())
        return flag


def train_with_stops(trainer, resume_from: Path | None, resume_command: str, max_length: int) -> None:
    """trainer.train() with signal stops, NaN stops and out-of-memory turned into TrainingStopped exits."""
    stop = StopOnSignal()
    trainer.add_callback(stop)
    try:
        trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    except torch.OutOfMemoryError:
        raise TrainingOutOfMemory(oom_message(trainer.args, next(trainer.model.parameters()).dtype,
                                              max_length)) from None
    except ValueError as exc:
        if "DeepSpeed config values that mismatch" not in str(exc):
            raise
        raise UserError(deepspeed_mismatch_message(str(exc))) from None
    finally:
        stop.restore()
    if stop.stopped_at is not None:
        latest = checkpoint.find_latest(Path(trainer.args.output_dir))
        raise TrainingInterrupted(f"{signal.Signals(stop.received).name} at step {stop.stopped_at}: checkpoint "
                                  f"committed at {latest}; continue with: {resume_command}")


def reached_the_end(checkpoint_dir: Path) -> bool:
    """The checkpoint was saved at the run's last step (max_steps, or the last step of the last epoch)."""
    state = json.loads((Path(checkpoint_dir) / TRAINER_STATE).read_text(encoding="utf-8"))
    return 0 < state.get("max_steps", 0) <= state.get("global_step", 0)


def finish_from_checkpoint(trainer, checkpoint_dir: Path) -> None:
    """The trainer as trainer.train() leaves it after the last step, rebuilt from a checkpoint saved there: its
    tensors (the best checkpoint's under load_best_model_at_end) and state (log history, best metric). Resuming
    instead would run one more step: the Trainer resumes a finished schedule into an extra step."""
    from transformers import TrainerState

    trainer._load_from_checkpoint(str(checkpoint_dir))
    trainer.state = TrainerState.load_from_json(str(Path(checkpoint_dir) / TRAINER_STATE))
    # As train() sets them: the saved state says which process saved it, not which one this is.
    trainer.state.is_local_process_zero = trainer.is_local_process_zero()
    trainer.state.is_world_process_zero = trainer.is_world_process_zero()
    if trainer.args.load_best_model_at_end and trainer.state.best_model_checkpoint:
        trainer._load_best_model()
    logger.info("%s was saved at the last step (%d): finishing the run without training", Path(checkpoint_dir).name,
                trainer.state.global_step)


def deepspeed_mismatch_message(text: str) -> str:
    """transformers lists the DeepSpeed settings (from the accelerate config) that disagree with the recipe's."""
    items = [line.strip(" -") for line in text.splitlines() if line.strip().startswith("- ")]
    return (f"train: the recipe disagrees with the DeepSpeed config of the launch ({'; '.join(items) or text[:200]}): "
            f"make them agree, e.g. train.bf16: true for `mixed_precision: bf16`, or the same "
            f"gradient_accumulation_steps in both")


def oom_message(args, dtype, max_length: int) -> str:
    return (f"out of memory (per_device_train_batch_size {args.per_device_train_batch_size}, max_length "
            f"{max_length}, dtype {str(dtype).replace('torch.', '')}); nothing partial was committed. Reduce memory "
            f"with: a smaller train.per_device_train_batch_size and a larger train.gradient_accumulation_steps, "
            f"a smaller data.max_length, train.gradient_checkpointing: true, or model.dtype: bfloat16")
