"""Knowledge distillation (Hinton et al. 2015): a frozen teacher's softened logits supervise the student."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import TrainerCallback

from ..errors import UserError


def distill_loss(student_logits, teacher_logits, task_loss, alpha: float, temperature: float, mask=None):
    """(1 - alpha) task + alpha T^2 KL(softmax(t/T) || softmax(s/T)); T^2 keeps the soft-target gradients on
    the task loss's scale (Hinton et al. 2015, Sec. 2). `mask` (causal LM) selects the positions that count."""
    s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    kl = (t.exp() * (t - s)).sum(-1)
    kl = kl[mask].mean() if mask is not None else kl.mean()
    return (1 - alpha) * task_loss + alpha * temperature ** 2 * kl


class DistillCallback(TrainerCallback):
    """While training, the student's forward also runs the teacher (without gradients) on the batch as the data
    collator made it, and the output's loss becomes the distillation mix (the Trainer then uses it as is).

    A pre-hook registered ahead of every other one keeps the student's inputs before any method rewrites them
    (prompt methods splice their virtual tokens into `inputs_embeds`, prefix methods add a key/value cache, both
    widen the attention mask): the teacher must never see the student's prompts or prefixes."""

    def __init__(self, student: nn.Module, teacher: nn.Module, cfg):
        self.student, self.teacher, self.cfg = student, teacher, cfg
        self.handles: list = []
        self._inputs: tuple[tuple, dict] | None = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.teacher.to(next(self.student.parameters()).device)
        self.on_train_end(args, state, control)
        self.handles = [self.student.register_forward_pre_hook(self._keep_inputs, with_kwargs=True, prepend=True),
                        self.student.register_forward_hook(self._hook, with_kwargs=True)]

    def on_train_end(self, args, state, control, **kwargs):
        for handle in self.handles:
            handle.remove()
        self.handles, self._inputs = [], None

    def _keep_inputs(self, module, args, kwargs):
        """First of the student's pre-hooks: the inputs as given (a shallow copy: the methods' hooks replace
        entries, they never modify the tensors in place)."""
        self._inputs = (tuple(args), dict(kwargs)) if module.training else None

    def _hook(self, module, args, kwargs, output):
        kept, self._inputs = self._inputs, None
        if kept is None or not module.training or getattr(output, "loss", None) is None:
            return output
        args, original = kept
        inputs = {k: v for k, v in original.items() if k not in ("labels", "num_items_in_batch")}
        with torch.no_grad():
            teacher_logits = self.teacher(*args, **inputs).logits
        student_logits = output.logits
        if teacher_logits.shape != student_logits.shape:
            raise UserError(f"distill.teacher: its logits have shape {tuple(teacher_logits.shape)}, the student's "
                            f"{tuple(student_logits.shape)}; use a teacher with the same labels / vocabulary"
                            + (" and tokenizer" if teacher_logits.dim() == 3 else ""))
        labels, mask = original.get("labels"), None
        if labels is not None and student_logits.dim() == 3:  # token-level: only positions with a target
            if labels.shape != student_logits.shape[:2]:
                raise UserError(f"distill: the student's per-token logits cover {student_logits.shape[1]} "
                                f"positions, its labels {labels.shape[1]}; this method cannot be distilled "
                                f"token by token")
            # a causal LM's position i predicts token i + 1
            mask = F.pad(labels[..., 1:] != -100, (0, 1), value=False) if _is_causal(module) else labels != -100
        output.loss = distill_loss(student_logits, teacher_logits, output.loss, self.cfg.alpha,
                                   self.cfg.temperature, mask)
        return output


def _is_causal(model: nn.Module) -> bool:
    return "CausalLM" in type(model).__name__
