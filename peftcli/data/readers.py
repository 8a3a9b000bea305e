"""Reading datasets: csv/tsv (GLUE-safe), json, jsonl, parquet, text, folders, globs and hub ids -> rows."""
from __future__ import annotations

import csv
import glob as globlib
import io
import json
import random
from pathlib import Path

from ..errors import UserError
from ..config.sections import DataSection

SUFFIX_FORMATS = {".csv": "csv", ".tsv": "tsv", ".json": "json", ".jsonl": "jsonl", ".parquet": "parquet",
                  ".txt": "text", ".text": "text"}
SPLIT_FILE_STEMS = {"train": ("train",), "eval": ("validation", "valid", "dev", "eval", "test")}
MAX_LINE_BYTES = 16 << 20  # one JSON line or text row larger than this is not a training example
csv.field_size_limit(MAX_LINE_BYTES)


def load_rows(spec: str, section: DataSection, split: str) -> list[dict]:
    """All rows of one split. `split` is "train" or "eval" and only names the recipe key in messages."""
    key = f"data.{split}"
    from .images import folder_rows, is_image_folder

    if not spec.startswith("hub:") and is_image_folder(spec):
        return folder_rows(spec, key)
    if spec.startswith("hub:"):
        return _load_hub(spec[4:], key, split)
    files = _resolve_files(spec, key, split)
    rows = []
    for path in files:
        rows.extend(_read_file(path, section, key))
    if not rows:
        raise UserError(f"{key}: {spec} holds no rows")
    return rows


def _resolve_files(spec: str, key: str, split: str) -> list[Path]:
    if any(ch in spec for ch in "*?["):
        files = sorted(Path(p) for p in globlib.glob(spec, recursive=True) if Path(p).is_file())
        if not files:
            raise UserError(f"{key}: the pattern {spec} matches no file")
        return files
    path = Path(spec).expanduser()
    if not path.exists():
        raise UserError(f"{key}: {spec} does not exist (data paths are relative to the directory you run peft "
                        f"from; set PEFT_DATA or use an absolute path)")
    if path.is_dir():
        for stem in SPLIT_FILE_STEMS[split]:
            found = sorted(p for p in path.iterdir() if p.stem == stem and p.suffix in SUFFIX_FORMATS)
            if found:
                return found[:1]
        raise UserError(f"{key}: the folder {spec} has no {'/'.join(SPLIT_FILE_STEMS[split])} file "
                        f"with a known suffix ({', '.join(SUFFIX_FORMATS)})")
    return [path]


def _read_file(path: Path, section: DataSection, key: str) -> list[dict]:
    fmt = section.format if section.format != "auto" else SUFFIX_FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise UserError(f"{key}: cannot tell the format of {path} from its suffix; set data.format "
                        f"({', '.join(sorted(set(SUFFIX_FORMATS.values())))})")
    if fmt == "parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    text = _read_text(path)
    if fmt in ("csv", "tsv"):
        return _read_delimited(text, path, fmt, section.columns)
    if fmt == "json":
        stripped = text.lstrip()
        if stripped.startswith("["):
            return _read_json_array(text, path)
        return _read_jsonl(text, path)
    if fmt == "jsonl":
        return _read_jsonl(text, path)
    return [{"text": line} for line in text.splitlines() if line.strip()]


def _read_text(path: Path) -> str:
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")  # utf-8-sig: MRPC and many Windows exports start with a byte-order mark
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise UserError(f"{path}:{line}: invalid UTF-8 (byte offset {exc.start}); re-encode the file as UTF-8") \
            from None


def _read_delimited(text: str, path: Path, fmt: str, columns: list[str] | None) -> list[dict]:
    # GLUE TSVs hold raw `"` characters: quoting must be off for tsv, or rows merge silently.
    quoting = csv.QUOTE_NONE if fmt == "tsv" else csv.QUOTE_MINIMAL
    reader = csv.reader(io.StringIO(text), delimiter="\t" if fmt == "tsv" else ",", quoting=quoting)
    header = columns or next(reader, None)
    if not header:
        return []
    rows = []
    for record in reader:
        if not record:
            continue
        if len(record) != len(header):
            raise UserError(f"{path}:{reader.line_num}: {len(record)} fields where the header has {len(header)} "
                            f"({', '.join(header)}); fix the row or set data.columns for a header-less file")
        rows.append(dict(zip(header, record)))
    return rows


def _read_json_array(text: str, path: Path) -> list[dict]:
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}:{exc.lineno}:{exc.colno}: invalid JSON: {exc.msg}") from None
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise UserError(f"{path}: expected a JSON array of objects (one per example)")
    return rows


def _read_jsonl(text: str, path: Path) -> list[dict]:
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        if len(line) > MAX_LINE_BYTES:
            raise UserError(f"{path}:{number}: a single line of {len(line)} characters is too large for one example")
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserError(f"{path}:{number}:{exc.colno}: malformed JSON line: {exc.msg}") from None
        if not isinstance(row, dict):
            raise UserError(f"{path}:{number}: expected a JSON object per line, got {type(row).__name__}")
        rows.append(row)
    return rows


def _load_hub(spec: str, key: str, split: str) -> list[dict]:
    import datasets

    name, _, config = spec.partition(":")
    split_name = "train" if split == "train" else "validation"
    try:
        return datasets.load_dataset(name, config or None, split=split_name).to_list()
    except Exception as exc:  # the hub client raises many types; all mean "could not get it"
        raise UserError(f"{key}: cannot load hub dataset {spec!r} split {split_name}: "
                        f"{' '.join(str(exc).split())[:200]}") from None


def load_splits(section: DataSection, seed: int) -> tuple[list[dict], list[dict] | None]:
    """Train and eval rows, with row limits and an optional held-out fraction applied."""
    train = load_rows(section.train, section, "train")
    evaluation = load_rows(section.eval, section, "eval") if section.eval else None
    if evaluation is None and section.eval_fraction:
        shuffled = train[:]
        random.Random(seed).shuffle(shuffled)
        cut = max(1, int(len(shuffled) * section.eval_fraction))
        evaluation, train = shuffled[:cut], shuffled[cut:]
    if "train" in section.limit:
        train = train[: section.limit["train"]]
    if evaluation is not None and "eval" in section.limit:
        evaluation = evaluation[: section.limit["eval"]]
    return train, evaluation
