"""What a writer may replace or delete: the entries `peft train` makes in a run folder, the folders `peft export`
and `peft merge-export` make, and the inputs (base model, data) that no output may touch."""
from __future__ import annotations

import glob
from pathlib import Path

from ..errors import UserError
from ..files import METHOD_JSON, RECIPE, TENSORS, is_run_dir, is_within
from ..models.loading import resolve_model_path
from ..training import checkpoints
from ..training.importance_callback import LOG_FILE as IMPORTANCE_LOG, PLOT_FILE as IMPORTANCE_PLOT
from .eval_report import CONFUSION, PER_CLASS

# The files `peft train` writes directly in a run folder. The method reports are named in their method files
# (adalora.py, svd.py, diff_pruning.py, sparse.py).
RUN_FILES = frozenset({RECIPE, METHOD_JSON, TENSORS, "metrics.json", "trainer_state.json", "run_info.json",
                       "README.md", "log.jsonl", "loss.png", PER_CLASS, CONFUSION, IMPORTANCE_LOG, IMPORTANCE_PLOT,
                       "adalora_ranks.json", "svd.json", "diff_pruning.json", "sparsity.json"})
TASK_REPORTS = "tasks"  # multi-task runs: tasks/<name>/per_class.json and its confusion matrix
STAGING = f".staging-{checkpoints.PREFIX}"  # checkpoints.staging_path: a save not yet committed
RECIPE_HEADER = "# Resolved recipe of this run"  # the first line runs.folder.write_recipe gives recipe.yaml

# An export or merge-export folder is recognised by one of these sets of files ...
EXPORT_SIGNATURES = ({"adapter_config.json", "adapter_model.safetensors"},  # peft export --format peft
                     {TENSORS, METHOD_JSON},  # --format tensors
                     {"config.json", "model.safetensors"}, {"config.json", "model.safetensors.index.json"})
# ... and by holding nothing else than what save_pretrained writes (configs, weights, tokenizer files).
EXPORT_SUFFIXES = (".json", ".safetensors", ".txt", ".model", ".jinja")
TASKS_JSON = "tasks.json"  # merge-export of a multi-task run: one model folder per task, listed here


def run_entry_of(run_dir: Path | str, path: Path | str) -> str | None:
    """The entry of the run folder that `path` is or lies in, when `peft train` made that entry (its files, a
    checkpoint or staging folder, the task reports); None for a path outside the run or in a folder of the user's."""
    run, target = Path(run_dir).expanduser().resolve(), Path(path).expanduser().resolve()
    if target == run or not is_within(target, run):
        return None
    name = target.relative_to(run).parts[0]
    written = name in RUN_FILES or name == TASK_REPORTS or name.startswith((checkpoints.PREFIX, STAGING))
    return name if written else None


def foreign_entries(folder: Path | str) -> list[str]:
    """Names in `folder` that no peftcli run writes (checkpoints count only with their manifest)."""
    return sorted(p.name for p in Path(folder).iterdir() if not _left_by_a_run(p))


def _left_by_a_run(path: Path) -> bool:
    name = path.name
    if path.is_dir():
        return name == TASK_REPORTS or name.startswith(STAGING) or checkpoints.is_ours(path)
    # `.metrics.json.k3j2`: the temporary file of an atomic write that a crash cut short
    return name in RUN_FILES or any(name.startswith(f".{known}.") for known in RUN_FILES)


def is_previous_run(folder: Path | str) -> bool:
    """A finished run, or a folder holding only what a run writes and started by one (our recipe.yaml or a
    committed checkpoint): the only kind of folder `peft train --overwrite` may delete."""
    folder = Path(folder)
    if is_run_dir(folder):
        return True
    if foreign_entries(folder):
        return False
    recipe = folder / RECIPE
    ours = recipe.is_file() and recipe.read_text(encoding="utf-8", errors="replace").startswith(RECIPE_HEADER)
    return ours or any(checkpoints.is_ours(p) for _, p in checkpoints.list_checkpoints(folder))


def is_export_output(folder: Path | str) -> bool:
    """A folder `peft export` or `peft merge-export` wrote, recognised by its files: the only kind of folder their
    --overwrite may delete. A checkpoint holds the same kinds of files but carries a manifest: not one."""
    folder = Path(folder)
    if (folder / TASKS_JSON).is_file():
        return all(p.name == TASKS_JSON or (p.is_dir() and _export_files(p)) for p in folder.iterdir())
    return _export_files(folder)


def _export_files(folder: Path) -> bool:
    entries = list(folder.iterdir())
    names = {p.name for p in entries}
    if checkpoints.MANIFEST in names or not all(p.is_file() and p.name.endswith(EXPORT_SUFFIXES) for p in entries):
        return False
    return any(signature <= names for signature in EXPORT_SIGNATURES)


def input_paths(recipe, *extra: str | None) -> list[Path]:
    """The local files and folders a recipe reads (its base model and data; `extra`: more data, e.g. `peft eval
    --data`), resolved. No output may be one of them, lie inside one, or be a folder that holds one."""
    tasks = (recipe.data.tasks or {}).values()
    specs = [recipe.data.train, recipe.data.eval, *[p for t in tasks for p in (t.train, t.eval)], *extra]
    found = [path for spec in specs if spec and not spec.startswith("hub:") for path in _data_paths(spec)]
    model = _model_path(recipe.model.name_or_path)
    return [p.resolve() for p in found + ([model] if model else []) if p.exists()]


def _data_paths(spec: str) -> list[Path]:
    if any(c in spec for c in "*?["):  # a glob: the files it matches now
        return [Path(p) for p in glob.glob(str(Path(spec).expanduser()), recursive=True)]
    return [Path(spec).expanduser()]


def _model_path(spec: str) -> Path | None:
    if spec.startswith("pkg:"):
        try:
            return Path(resolve_model_path(spec))
        except UserError:
            return None  # not installed: nothing on disk to protect
    return Path(spec).expanduser()  # a hub id names no local path: input_paths drops it
