"""`peft glora-search`: evolutionary search over per-layer GLoRA paths of a trained supernet (Chang et al. 2023,
Sec. 3.3), scored on the run's eval data; writes the best configuration as a recipe for `peft train`."""
from __future__ import annotations

import copy
import dataclasses
import json
import logging
import random
import tempfile
from pathlib import Path

from . import runs
from .commands import Plan, build_trainer, final_metrics
from .data import load_rows, load_splits
from .errors import UserError
from .methods.glora import GloraLinear, glora_modules, set_paths
from .metrics import DEFAULT_METRICS
from .recipe import dump_recipe
from .tasks import Prepared, prepare

logger = logging.getLogger("peftcli")
Config = dict[str, dict[str, str]]  # layer -> component -> path


@dataclasses.dataclass
class SearchOptions:
    population: int = 10
    generations: int = 5
    mutation: float = 0.1  # per-component resampling probability of a child
    max_params: int | None = None  # parameter budget of the chosen paths (the paper's constraint)
    limit: int | None = None  # eval rows used for scoring
    seed: int = 0


def path_params(module: GloraLinear, path: dict[str, str]) -> int:
    from .methods.glora import _shape

    total = 0
    for part, choice in path.items():
        rows, cols = _shape(part, module.out_features, module.in_features)
        total += {"lora": module.r * (rows + cols), "vector": rows, "scalar": 1, "none": 0}[choice]
    return total


def config_params(modules: dict[str, GloraLinear], config: Config) -> int:
    return sum(path_params(m, config[n]) for n, m in modules.items())


def random_config(modules: dict[str, GloraLinear], rng: random.Random) -> Config:
    return {n: {p: rng.choice(c) for p, c in m.choices().items()} for n, m in modules.items()}


def child_of(a: Config, b: Config, modules, rng: random.Random, mutation: float) -> Config:
    """Per-layer crossover of two parents, then per-component mutation."""
    child = {n: dict(rng.choice((a, b))[n]) for n in modules}
    for name, module in modules.items():
        for part, choices in module.choices().items():
            if rng.random() < mutation:
                child[name][part] = rng.choice(choices)
    return child


def evolve(modules, score, options: SearchOptions) -> tuple[Config, float, list[dict]]:
    """Keep the better half of each generation as parents; fill the rest with their mutated crossovers."""
    rng = random.Random(options.seed)
    fits = (lambda c: options.max_params is None or config_params(modules, c) <= options.max_params)
    population = [_sample(lambda: random_config(modules, rng), fits) for _ in range(options.population)]
    scored: list[tuple[float, Config]] = []
    history = []
    for generation in range(options.generations):
        scored += [(score(c), c) for c in population]
        scored.sort(key=lambda item: item[0], reverse=True)
        scored = scored[:max(2, options.population // 2)]
        history.append({"generation": generation, "best": scored[0][0], "params": config_params(modules,
                                                                                                   scored[0][1])})
        logger.info("glora search generation %d: best score %.4f", generation, scored[0][0])
        parents = [c for _, c in scored]
        population = [_sample(lambda: child_of(*rng.sample(parents, 2), modules, rng, options.mutation), fits)
                      for _ in range(options.population - len(scored))]
    return scored[0][1], scored[0][0], history


def _sample(make, fits, tries: int = 1000) -> Config:
    for _ in range(tries):
        config = make()
        if fits(config):
            return config
    raise UserError("--max-params: no path configuration fits this budget; raise it")


def search(run_dir: str, out: str, output_dir: str | None, options: SearchOptions) -> dict:
    recipe, record, model, tokenizer = runs.load_trained(run_dir)
    if record["method"] != "glora":
        raise UserError(f"{run_dir}: a '{record['method']}' run; glora-search needs a GLoRA supernet run")
    modules = glora_modules(model)
    with tempfile.TemporaryDirectory(prefix="glora-search-") as scratch:
        trainer, the_plan = _scorer(recipe, record, model, tokenizer, options.limit, Path(scratch))
        best, best_score, history, key, sign = _run(model, trainer, the_plan, modules, options)
    target = write_recipe(recipe, run_dir, best, out, output_dir)
    result = {"recipe": str(target), "metric": key, "score": sign * best_score,
              "params": config_params(modules, best), "history": history, "paths": best}
    runs.atomic_write(target.with_suffix(".search.json"), json.dumps(result, indent=2))
    return result


def _run(model, trainer, the_plan: Plan, modules, options: SearchOptions):
    key = the_plan.metrics[0] if the_plan.recipe.model.task != "causal-lm" else "loss"
    sign = -1.0 if key in ("loss", "perplexity") else 1.0  # the search maximises

    def score(config: Config) -> float:
        set_paths(model, config)
        return sign * final_metrics(trainer, the_plan)[key]

    return (*evolve(modules, score, options), key, sign)


def _scorer(recipe, record, model, tokenizer, limit, scratch: Path):
    section = recipe.data
    if section.eval:
        rows = load_rows(section.eval, section, "eval")
    elif section.eval_fraction:
        rows = load_splits(section, recipe.train.get("seed", 42))[1]
    else:
        raise UserError("the supernet's recipe has no eval data to score candidates on; set data.eval")
    rows = rows[:limit] if limit else rows
    prepared = prepare(recipe.model.task, tokenizer, section, recipe.model, rows, None, labels=record.get("labels"))
    num_labels = record.get("num_labels")
    metrics = recipe.eval.metrics or DEFAULT_METRICS["regression" if num_labels == 1 else recipe.model.task]
    the_plan = Plan(recipe, tokenizer, Prepared(prepared.train[:1], prepared.train, prepared.labels, {}),
                    num_labels, metrics)
    return build_trainer(the_plan, model, scratch, record), the_plan


def write_recipe(recipe, run_dir: str, best: Config, out: str, output_dir: str | None) -> Path:
    raw = copy.deepcopy(recipe.raw)
    method = {k: v for k, v in raw["method"].items() if k not in ("supernet", "paths", "default_path")}
    method.update({"supernet": False, "paths": best,
                   "init_from": str((Path(run_dir) / runs.TENSORS).resolve())})
    raw["method"] = method
    raw.setdefault("train", {})["output_dir"] = output_dir or str(Path(run_dir).resolve()) + "-searched"
    target = Path(out)
    header = (f"# GLoRA paths chosen by `peft glora-search {run_dir}` on the supernet's eval data; fine-tunes the\n"
              f"# chosen subnet from the supernet's weights. Run: peft train {target}\n")
    runs.atomic_write(target, header + dump_recipe(raw))
    return target
