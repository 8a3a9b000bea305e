"""Crash-consistent checkpoints: staging, manifest, atomic commit, verification, rotation and finding the newest."""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import signal
import time
from pathlib import Path

from ..errors import UserError

logger = logging.getLogger("peftcli")

CHECKPOINT_FORMAT = 1
MANIFEST = "manifest.json"
PREFIX = "checkpoint-"
_NAME = re.compile(r"^checkpoint-(\d+)$")
# Test hook: PEFT_TEST_KILL_AT=<phase>[@<step>] makes the process SIGKILL itself at that point of a save (or of
# a step, phase "step_end"), so the tests can prove that every crash point leaves a resumable run directory.
KILL_ENV = "PEFT_TEST_KILL_AT"
PHASES = ("staged", "before_manifest", "before_rename", "before_rotate", "step_end")


def maybe_kill(phase: str, step: int) -> None:
    spec = os.environ.get(KILL_ENV)
    if not spec:
        return
    name, _, at = spec.partition("@")
    if name == phase and (not at or int(at) == step):
        os.kill(os.getpid(), signal.SIGKILL)


def staging_path(run_dir: Path, step: int) -> Path:
    # Dot-prefixed and without the checkpoint- prefix: nothing (ours or HF's) mistakes it for a checkpoint.
    return Path(run_dir) / f".staging-{PREFIX}{step}"


def begin(run_dir: Path, step: int) -> Path:
    """A fresh, empty staging folder for step `step` (a leftover from a crashed save is removed)."""
    staging = staging_path(run_dir, step)
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    return staging


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def commit(staging: Path, step: int, world_size: int, recipe_sha256: str) -> Path:
    """Fsync every staged file, write the manifest last, rename the folder into place. Main process only."""
    files = {}
    for path in sorted(p for p in staging.iterdir() if p.is_file()):
        _fsync(path)
        files[path.name] = {"size": path.stat().st_size, "sha256": sha256_file(path)}
    manifest = {"format": CHECKPOINT_FORMAT, "step": step, "world_size": world_size,
                "recipe_sha256": recipe_sha256, "created": time.time(), "files": files}
    maybe_kill("before_manifest", step)
    with open(staging / MANIFEST, "w", encoding="utf-8") as handle:
        json.dump(manifest, handle, indent=2)
        handle.flush()
        os.fsync(handle.fileno())
    _fsync(staging)
    maybe_kill("before_rename", step)
    final = staging.parent / f"{PREFIX}{step}"
    if final.exists():
        _set_aside(final)
    os.replace(staging, final)
    _fsync(final.parent)  # the rename itself must survive a power cut
    return final


def _set_aside(path: Path) -> None:
    """A folder already holds this step's name (a checkpoint that failed to verify, or not ours): keep it under
    another name rather than delete anything we did not verify."""
    aside = path.with_name(f"{path.name}.replaced-{int(time.time())}")
    logger.warning("%s already exists; moved it to %s (it is not deleted)", path, aside.name)
    os.replace(path, aside)


def read_manifest(path: Path) -> dict | None:
    try:
        manifest = json.loads((Path(path) / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) else None


def verify(path: Path, deep: bool = True) -> str | None:
    """None when the checkpoint is complete and intact, else the reason it is not (one phrase)."""
    manifest = read_manifest(path)
    if manifest is None:
        return f"no readable {MANIFEST} (an interrupted save, or not a peftcli checkpoint)"
    if manifest.get("format") != CHECKPOINT_FORMAT:
        return f"checkpoint format {manifest.get('format')!r} is not {CHECKPOINT_FORMAT}"
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        return "its manifest lists no files"
    for name, info in files.items():
        file = Path(path) / name
        if not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size != info.get("size"):
            return f"{name} has {file.stat().st_size} bytes, the manifest says {info.get('size')}"
        if deep and sha256_file(file) != info.get("sha256"):
            return f"{name} does not match its sha256 in the manifest"
    return None


def is_ours(path: Path) -> bool:
    """A committed peftcli checkpoint folder (its manifest parses): the only kind rotation may delete."""
    return bool(_NAME.match(Path(path).name)) and read_manifest(path) is not None


def list_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """checkpoint-N folders, newest (highest N) first."""
    found = []
    if Path(run_dir).is_dir():
        for path in Path(run_dir).iterdir():
            match = _NAME.match(path.name)
            if match and path.is_dir():
                found.append((int(match.group(1)), path))
    return sorted(found, reverse=True)


def find_latest(run_dir: Path) -> Path | None:
    """The newest checkpoint whose manifest verifies; invalid ones are skipped with a warning, never deleted."""
    for _, path in list_checkpoints(run_dir):
        reason = verify(path)
        if reason is None:
            return path
        logger.warning("skipping %s: %s", path, reason)
    return None


def check_compatible(path: Path, world_size: int, recipe_sha256: str) -> dict:
    """The manifest of the checkpoint to resume from, after refusing a different world size or recipe."""
    manifest = read_manifest(path) or {}
    if manifest.get("world_size") != world_size:
        raise UserError(f"{path}: saved by {manifest.get('world_size')} processes, resumed with {world_size}; "
                        f"resume with the same number of processes (data order and RNG streams are per process)")
    if manifest.get("recipe_sha256") != recipe_sha256:
        raise UserError(f"{path}: saved with a different recipe than the one given now; resume with the run's "
                        f"own recipe ({path.parent / 'recipe.yaml'}) or start a new run with --output-dir")
    return manifest


def rotate(run_dir: Path, limit: int | None, keep: set[Path] = frozenset()) -> list[Path]:
    """Delete the oldest of our verified checkpoints beyond `limit`. Called only after a commit; folders without
    our manifest (foreign, or damaged) are never counted nor deleted."""
    if not limit or limit <= 0:
        return []
    ours = [path for _, path in list_checkpoints(run_dir) if is_ours(path) and verify(path, deep=False) is None]
    removed = []
    for path in ours[limit:]:
        if path.resolve() in {k.resolve() for k in keep}:
            continue
        shutil.rmtree(path)
        removed.append(path)
    return removed


def resolve_resume(run_dir: Path, resume: str | None) -> Path | None:
    """`--resume` (latest) or `--resume PATH` -> a verified checkpoint folder, or None when there is none yet."""
    if resume in (None, ""):
        return None
    if resume != "latest":
        path = Path(resume).expanduser()
        if not path.is_dir():
            raise UserError(f"--resume {resume}: not a directory; pass a checkpoint-N folder of the run")
        reason = verify(path)
        if reason:
            raise UserError(f"--resume {resume}: not a valid checkpoint: {reason}; pick another checkpoint-N "
                            f"or pass --resume alone to use the newest valid one")
        return path
    latest = find_latest(run_dir)
    if latest is None:
        logger.warning("--resume: %s has no valid checkpoint yet; starting from step 0", run_dir)
    return latest


def recipe_sha256(raw: dict) -> str:
    """Identity of a resolved recipe: a checkpoint resumes only under the recipe that wrote it. The output_dir is
    left out: moving a run directory does not change what it trains."""
    train = {k: v for k, v in (raw.get("train") or {}).items() if k != "output_dir"}
    text = json.dumps({**raw, "train": train}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))  # set by torchrun / accelerate launch for every process


def resume_point(run_dir: Path, resume, recipe_hash: str) -> Path | None:
    """The checkpoint `--resume [PATH]` continues from (None: start at step 0), checked before any weight loads."""
    from ..files import RECIPE

    if not resume:
        return None
    run_dir = Path(run_dir)
    has_files = run_dir.is_dir() and any(run_dir.iterdir())
    if has_files and not ((run_dir / RECIPE).is_file() or any(is_ours(p) for _, p in list_checkpoints(run_dir))):
        raise UserError(f"--resume: {run_dir} holds files that are not a peftcli run; point train.output_dir "
                        f"(or --output-dir) at the run to continue")
    path = resolve_resume(run_dir, "latest" if resume is True else str(resume))
    if path is not None:
        check_compatible(path, world_size(), recipe_hash)
        logger.info("resuming from %s", path)
    return path
