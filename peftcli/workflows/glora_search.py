"""`peft glora-search`: evolutionary search over per-layer GLoRA paths and ranks of a trained supernet (Chang et al.
2023, Sec. 3.3), scored on a search split disjoint from the eval split; writes the best as a recipe for `peft train`."""
from __future__ import annotations

import copy
import dataclasses
import json
import logging
import random
import tempfile
from pathlib import Path

from ..files import TENSORS, atomic_write
from ..runs.folder import load_trained
from .plan import Plan
from .evaluate import final_scores
from .train import build_trainer
from ..data.readers import load_rows, load_splits
from ..errors import UserError
from ..methods.glora import GloraLinear, component_shape, glora_modules, path_rank, set_paths
from ..training.metrics import DEFAULT_METRICS
from ..training.text_metrics import check_metrics_code
from ..config.recipe import dump_recipe
from ..data.prepare import Prepared, prepare

logger = logging.getLogger("peftcli")
Config = dict[str, dict[str, str]]  # layer -> component -> path
DEFAULT_SEARCH_ROWS = 1000  # enough to rank candidates on GLUE-sized data; each candidate is one pass over them


@dataclasses.dataclass
class SearchOptions:
    population: int = 10
    generations: int = 5
    mutation: float = 0.1  # per-component resampling probability of a child
    max_params: int | None = None  # parameter budget of the chosen paths (the paper's constraint)
    search_rows: int = DEFAULT_SEARCH_ROWS  # rows of the search split that score candidates (a seeded sample)
    search_data: str | None = None  # a separate search split (file or glob); default: held-out train rows
    seed: int = 0


def path_params(module: GloraLinear, path: dict[str, str]) -> int:
    total = 0
    for part, choice in path.items():
        rows, cols = component_shape(part, module.out_features, module.in_features)
        rank = path_rank(choice, module.r)
        total += rank * (rows + cols) if rank else {"vector": rows, "scalar": 1, "none": 0}[choice]
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


def unused_train_rows(section, data_seed: int) -> list[dict]:
    """Train rows that neither the supernet nor a recipe with its data section trains on: those past
    data.limit.train (load_splits keeps a prefix, after any eval_fraction carve-out). Never reads data.eval."""
    if "train" not in section.limit:
        return []
    carve = None if section.eval else section.eval_fraction  # a separate eval file means no carve-out
    train_only = dataclasses.replace(section, eval=None, eval_fraction=carve, limit={})
    return load_splits(train_only, data_seed)[0][section.limit["train"]:]


def search_split(section, data_seed: int, options: SearchOptions) -> tuple[list[dict], str]:
    """The rows that score candidates, a seeded sample of --search-rows of them, and a line naming their source.
    The eval split is what results are reported on, so it never takes part in choosing paths."""
    if options.search_data:
        rows, source = _search_file(options.search_data, section), f"--search-data {options.search_data}"
    else:
        rows = unused_train_rows(section, data_seed)
        if not rows:
            raise UserError("data.limit.train: the supernet trained on every train row, so none is left to search "
                            "on; set data.limit.train below the train size in the supernet recipe (rows past it "
                            "become the search split) or pass --search-data FILE")
        source = f"train rows past data.limit.train ({section.limit['train']})"
    rows = rows[:]
    random.Random(options.seed).shuffle(rows)
    rows = rows[:options.search_rows]
    return rows, f"{len(rows)} {source}"


def _search_file(spec: str, section) -> list[dict]:
    if spec.startswith("hub:") or Path(spec).expanduser().is_dir():
        raise UserError(f"--search-data: {spec} is a hub id or folder, whose split would be guessed; name the "
                        f"search split's file (or a glob)")
    if section.eval and not section.eval.startswith("hub:") and \
            Path(spec).expanduser().resolve() == Path(section.eval).expanduser().resolve():
        raise UserError(f"--search-data: {spec} is the supernet's data.eval, the split results are reported on; "
                        f"pass a split disjoint from it")
    try:
        return load_rows(spec, section, "eval")
    except UserError as exc:  # load_rows names the recipe key; this split comes from the command line
        raise UserError(str(exc).replace("data.eval", "--search-data", 1)) from None


def search(run_dir: str, out: str, output_dir: str | None, options: SearchOptions) -> dict:
    recipe, record, model, tokenizer = load_trained(run_dir)
    if record["method"] != "glora":
        raise UserError(f"{run_dir}: a '{record['method']}' run; glora-search needs a GLoRA supernet run")
    if recipe.data.train is None:
        raise UserError(f"{run_dir}: a multi-task run; glora-search needs a single-task supernet run")
    modules = glora_modules(model)
    rows, split = search_split(recipe.data, recipe.train.get("seed", 42), options)
    logger.info("glora search: scoring candidates on %s", split)
    with tempfile.TemporaryDirectory(prefix="glora-search-") as scratch:
        trainer, the_plan = _scorer(recipe, record, model, tokenizer, rows, Path(scratch))
        best, best_score, history, key, sign = _run(model, trainer, the_plan, modules, options)
    keep = "" if options.search_data else "; training never reads them: keep data.limit.train as it is"
    target = write_recipe(recipe, run_dir, best, out, output_dir, split + keep)
    result = {"recipe": str(target), "metric": key, "score": sign * best_score, "search_split": split,
              "params": config_params(modules, best), "history": history, "paths": best}
    atomic_write(target.with_suffix(".search.json"), json.dumps(result, indent=2))
    return result


def _run(model, trainer, the_plan: Plan, modules, options: SearchOptions):
    key = the_plan.metrics[0] if the_plan.recipe.model.task != "causal-lm" else "loss"
    sign = -1.0 if key in ("loss", "perplexity") else 1.0  # the search maximises

    def score(config: Config) -> float:
        set_paths(model, config)
        return sign * final_scores(trainer, the_plan)[key]

    return (*evolve(modules, score, options), key, sign)


def _scorer(recipe, record, model, tokenizer, rows: list[dict], scratch: Path):
    section = recipe.data
    prepared = prepare(recipe.model.task, tokenizer, section, recipe.model, rows, None, labels=record.get("labels"))
    num_labels = record.get("num_labels")
    metrics = recipe.eval.metrics or DEFAULT_METRICS["regression" if num_labels == 1 else recipe.model.task]
    check_metrics_code(metrics, recipe.eval.trust_metric_code)  # scoring runs them
    the_plan = Plan(recipe, tokenizer, Prepared(prepared.train[:1], prepared.train, prepared.labels, {}),
                    num_labels, metrics)
    return build_trainer(the_plan, model, scratch, record), the_plan


def write_recipe(recipe, run_dir: str, best: Config, out: str, output_dir: str | None, split: str) -> Path:
    raw = copy.deepcopy(recipe.raw)
    dropped = ("supernet", "paths", "default_path", "ranks")  # the chosen paths name their ranks (lora<k>)
    method = {k: v for k, v in raw["method"].items() if k not in dropped}
    method.update({"supernet": False, "paths": best,
                   "init_from": str((Path(run_dir) / TENSORS).resolve())})
    raw["method"] = method
    raw.setdefault("train", {})["output_dir"] = output_dir or str(Path(run_dir).resolve()) + "-searched"
    target = Path(out)
    header = (f"# GLoRA paths and ranks chosen by `peft glora-search {run_dir}`, scored on a search split disjoint\n"
              f"# from data.eval, {split}.\n"
              f"# Fine-tunes the chosen subnet from the supernet's weights. Run: peft train {target}\n")
    atomic_write(target, header + dump_recipe(raw))
    return target
