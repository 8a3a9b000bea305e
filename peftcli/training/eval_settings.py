"""Evaluation during training: checks of eval/save strategies, best-model selection and early stopping."""
from __future__ import annotations

from ..errors import UserError
from ..config.recipe import Recipe
from .spans import ENTITY_METRICS, check_tag_scheme
from .text_metrics import EVALUATE_PREFIX, GENERATION

LOWER_IS_BETTER = {"loss", "perplexity", "mse"}


def _name(metric: str) -> str:
    return metric[len("eval_"):] if metric.startswith("eval_") else metric


def best_metric(recipe: Recipe) -> str | None:
    """metric_for_best_model without its eval_ prefix; early stopping without one watches the eval loss."""
    named = recipe.train.get("metric_for_best_model")
    if named:
        return _name(str(named))
    if recipe.data.tasks and (recipe.eval.early_stopping_patience or recipe.train.get("load_best_model_at_end")):
        return "macro/score"  # multi-task: the mean over tasks of each task's first metric (multitask.py)
    return "loss" if recipe.eval.early_stopping_patience else None


def check_training_eval(recipe: Recipe, metrics: list[str], labels: list[str] | None, has_eval: bool,
                        watchable: set[str] | None = None) -> None:
    """Everything TrainingArguments and the Trainer would reject late (after the weights load) or not at all.
    `watchable`: the metric names evaluation reports, where they are not the recipe's metrics (multi-task)."""
    train = recipe.train
    evals, saves = str(train.get("eval_strategy", "no")), str(train.get("save_strategy", "no"))
    if evals != "no" and not has_eval:
        raise UserError(f"train.eval_strategy: {evals} needs eval data; set data.eval or data.eval_fraction")
    if any(m in ENTITY_METRICS for m in metrics) and labels:
        check_tag_scheme(labels, "eval.metrics")
    watched = best_metric(recipe)
    if watched and watchable is not None:
        if watched not in watchable:
            raise UserError(f"train.metric_for_best_model: '{watched}' is not computed during training; choose one "
                            f"of {', '.join(sorted(watchable))}")
    elif watched:
        _check_watched(watched, recipe.model.task, metrics)
    if recipe.eval.early_stopping_patience and evals == "no":
        raise UserError("eval.early_stopping_patience: needs evaluations during training; set train.eval_strategy: "
                        "steps (with train.eval_steps) or epoch")
    if train.get("load_best_model_at_end"):
        _check_best_model_strategies(train, evals, saves)


def _check_watched(watched: str, task: str, metrics: list[str]) -> None:
    if any(m.startswith(EVALUATE_PREFIX) for m in metrics):
        return  # evaluate: metrics name their own result keys; the Trainer reports a missing one
    during = {"loss", "perplexity"} if task == "causal-lm" else set(metrics) | {"loss"}
    if watched not in during:
        why = " (generation metrics are computed after training, not during it)" if watched in GENERATION else ""
        raise UserError(f"train.metric_for_best_model: '{watched}' is not computed during training{why}; "
                        f"choose one of {', '.join(sorted(during))}")


def _check_best_model_strategies(train: dict, evals: str, saves: str) -> None:
    if evals == "no":
        raise UserError("train.load_best_model_at_end: needs evaluations; set train.eval_strategy: steps or epoch")
    if saves == "best":
        return
    if saves != evals:
        raise UserError(f"train.load_best_model_at_end: checkpoints must be saved where evaluations happen; "
                        f"set train.save_strategy: {evals} (it is {saves})")
    if evals == "steps":
        eval_steps = train.get("eval_steps") or train.get("logging_steps", 10)  # the Trainer's own fallback
        save_steps = train.get("save_steps", 500)
        if save_steps % eval_steps:
            raise UserError(f"train.save_steps: {save_steps} is not a multiple of train.eval_steps {eval_steps}; "
                            f"load_best_model_at_end picks among saved evaluations: set save_steps: {eval_steps}")


def training_eval_args(recipe: Recipe) -> dict:
    """TrainingArguments for best-model tracking. perplexity = exp(loss) ranks runs like the loss, which is what
    the Trainer reports for causal LMs; lower is better for losses and errors (the Trainer knows only 'loss')."""
    watched = best_metric(recipe)
    if not watched:
        return {}
    out = {"metric_for_best_model": "loss" if watched == "perplexity" else watched}
    if "greater_is_better" not in recipe.train:
        out["greater_is_better"] = watched.rsplit("/", 1)[-1] not in LOWER_IS_BETTER  # multi-task: task/metric
    return out


def training_callbacks(recipe: Recipe) -> list:
    if not recipe.eval.early_stopping_patience:
        return []
    from transformers import EarlyStoppingCallback

    return [EarlyStoppingCallback(recipe.eval.early_stopping_patience, recipe.eval.early_stopping_threshold)]
