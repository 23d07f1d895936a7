"""Where data records come from: local files and directories read with Hugging Face `datasets`,
never the network.

`data.path` may be
    a file        .jsonl / .json (JSON lines or a JSON list of objects), .parquet, .csv, .arrow;
                  a file with another suffix is read as JSON lines
    a directory   written by `save_to_disk` (it holds state.json, or dataset_dict.json: then
                  its `train` split, or its only split), or holding shards of one of the file
                  types above (read in path order, subdirectories included; where some are
                  named for the train split, `train-00000-of-00002.parquet` or `train/...`, as
                  in a hub snapshot, only those)

Anything else, a hub name among them, is refused with how to bring the data here
(`missing_path_problem`). `HF_DATASETS_OFFLINE=1` is set before `datasets` is imported, so
no code path in the library reaches for the hub either.

Records come out as dicts (the absent keys arrow fills with None dropped, the column mapping
`data.columns.*` applied) with a location for error messages: `path:line` for JSON files (the
line a record starts on, so a user opens the file at it) and `path: row N` for the columnar
formats (0-based: `dataset[N]`). A JSON file that arrow refuses (an invalid line, a line that
is not an object) is read again line by line with the json module, which names the line.

Torch-free: the launcher reads the head of a file through `head` before a run starts.
"""
from __future__ import annotations

import itertools
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional

# File suffix -> the `datasets` builder that reads it.
BUILDERS: dict[str, str] = {".jsonl": "json", ".json": "json", ".parquet": "parquet",
                            ".csv": "csv", ".arrow": "arrow"}
DISK_MARKERS: tuple[str, ...] = ("state.json", "dataset_dict.json")  # what save_to_disk writes
Row = dict[str, Any]


def missing_path_problem(raw: str) -> Optional[str]:
    """Why `raw` cannot be data.path (it does not exist here), or None. The message says how
    to get a hub data set onto this machine: chatforge never downloads."""
    path = Path(raw).expanduser()
    if path.exists():
        return None
    return (f"no such file or directory: {path}; chatforge reads local data only and never downloads. "
            f"For a Hugging Face hub data set, on a machine with network run "
            f"`datasets.load_dataset({raw!r}, split='train').save_to_disk('DIR')` "
            f"(or `.to_json('FILE.jsonl')`), copy DIR here and set data.path=DIR")


def _datasets() -> Any:
    """The `datasets` module, imported offline and quiet (errors are ours to report)."""
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    os.environ["HF_HUB_OFFLINE"] = "1"
    import datasets

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)
    return datasets


@dataclass
class Source:
    """One readable unit: a file (read by `builder`) or a save_to_disk directory (builder "disk")."""

    path: Path
    builder: str
    _lines: Optional[list[int]] = field(default=None, repr=False)

    def where(self, index: int) -> str:
        """`path:line` (JSON) or `path: row N` of record `index` (0-based)."""
        line = self.line(index)
        return f"{self.path}:{line}" if line is not None else f"{self.path}: row {index}"

    def line(self, index: int) -> Optional[int]:
        """The 1-based line record `index` starts on in a JSON file, else None."""
        if self.builder != "json":
            return None
        if self._lines is None:
            self._lines = [no for no, _ in json_records(self.path, self.path.read_text(encoding="utf-8"))]
        return self._lines[index] if index < len(self._lines) else None


def sources(raw: str | Path) -> list[Source]:
    """The readable units of data.path `raw` (module docstring); ValueError naming the path
    for anything else."""
    path = Path(raw).expanduser()
    if (problem := missing_path_problem(str(raw))) is not None:
        raise FileNotFoundError(problem)
    if path.is_file():
        return [Source(path, _builder(path))]
    if any((path / marker).is_file() for marker in DISK_MARKERS):
        return [Source(path, "disk")]
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in BUILDERS
                   and not any(part.startswith(".") for part in p.relative_to(path).parts))
    if not files:
        raise ValueError(f"{path}: a directory without data files ({', '.join(BUILDERS)}) and not "
                         f"written by save_to_disk (no {' or '.join(DISK_MARKERS)})")
    # A hub snapshot holds every split (data/train-00000-of-00002.parquet, data/test-...):
    # as `datasets` does, its train files are the data when any are named so.
    train = [p for p in files if _TRAIN.search(p.relative_to(path).as_posix())]
    files = train or files
    kinds = {BUILDERS[p.suffix] for p in files}
    if len(kinds) > 1:
        raise ValueError(f"{path}: mixes data file types ({', '.join(sorted(kinds))}); keep one per directory")
    return [Source(p, BUILDERS[p.suffix]) for p in files]


_TRAIN = re.compile(r"(^|[/_.-])train([/_.-]|$)")


def _builder(path: Path) -> str:
    """A file's builder by its suffix; any other suffix is read as JSON lines (chatforge's
    formats always were, whatever the file was called)."""
    return BUILDERS.get(path.suffix, "json")


# ---- JSON read line by line (where arrow refuses: the error names the line) -----------------------

def _jsonl_records(path: Path, text: str) -> Iterator[tuple[int, Any]]:
    for no, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            yield no, json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{no}: invalid JSON: {err.msg} (column {err.colno})") from err


def json_list_records(path: Path, text: str) -> Iterator[tuple[int, Any]]:
    """Items of a top-level JSON list, each with the line its value starts on."""
    try:
        items = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}:{err.lineno}: invalid JSON: {err.msg} (column {err.colno})") from err
    if not isinstance(items, list):
        raise ValueError(f"{path}:1: expected a JSON list of records, got {type(items).__name__}")
    # Re-scan item by item (the text is known valid) only to learn where each one starts.
    decoder, ws = json.JSONDecoder(), re.compile(r"[\s,]*")
    pos = ws.match(text, text.index("[") + 1).end()
    for item in items:
        _, end = decoder.raw_decode(text, pos)
        yield text.count("\n", 0, pos) + 1, item
        pos = ws.match(text, end).end()


def json_records(path: Path, text: str) -> Iterator[tuple[int, Any]]:
    """(line, value) of a JSON list or JSON lines text."""
    if text.lstrip().startswith("["):
        return json_list_records(path, text)
    return _jsonl_records(path, text)


# ---- rows ---------------------------------------------------------------------------------------

def clean_row(row: Any, columns: Mapping[str, str]) -> Any:
    """Drop the None arrow puts in for absent keys; rename mapped columns to their canonical name."""
    if not isinstance(row, dict):
        return row
    out = {k: v for k, v in row.items() if v is not None}
    for canonical, theirs in columns.items():
        if theirs and theirs != canonical and theirs in out:
            out[canonical] = out.pop(theirs)
    return out


def _dataset_rows(source: Source) -> Iterator[Any]:
    datasets = _datasets()
    if source.builder == "disk":
        loaded = datasets.load_from_disk(str(source.path))
        if isinstance(loaded, datasets.DatasetDict):
            splits = list(loaded)
            if "train" not in loaded and len(splits) != 1:
                raise ValueError(f"{source.path}: a DatasetDict without a 'train' split ({splits}); "
                                 f"save the split to train on (dataset['name'].save_to_disk(...))")
            loaded = loaded["train" if "train" in loaded else splits[0]]
        return iter(loaded)
    # streaming: rows are read as they are asked for, and no arrow copy is cached on disk
    # (a run's prepared data is its own cache: trainer/data/chat_prepare.py).
    # CSV cells stay strings (a reply "4" is text, not a number), as in the launcher's look.
    options: dict[str, Any] = {}
    if source.builder == "csv":
        import pandas as pd

        names = list(pd.read_csv(source.path, nrows=0).columns)
        options = {"features": datasets.Features({n: datasets.Value("string") for n in names}),
                   "keep_default_na": False}
    return iter(datasets.load_dataset(source.builder, data_files=str(source.path), split="train",
                                      streaming=True, **options))


def rows(source: Source, columns: Mapping[str, str] = {}, limit: Optional[int] = None
         ) -> Iterator[tuple[int, Any]]:
    """(index, record) of `source`: all of them through `datasets`, or (`limit` set: the
    launcher's look at the head) the first `limit` read directly with pyarrow / pandas / json,
    since `datasets`' streaming reader imports torch and its other reader converts and caches
    whole files. Records are dicts unless a JSON file holds something else (then the value,
    for the reader to reject by its line)."""
    try:
        found = _head_rows(source, limit) if limit is not None else list(_dataset_rows(source))
    except Exception as err:  # ArrowInvalid (a ValueError), or datasets' own wrappers of it
        if source.builder != "json":
            raise ValueError(f"{source.path}: not readable as {source.builder}: {err}") from err
        found = _json_fallback(source, limit)
    return ((i, clean_row(rec, columns)) for i, rec in enumerate(found))


def _head_rows(source: Source, limit: int) -> list[Any]:
    """The first `limit` records of `source`, torch-free and without a cache."""
    if source.builder == "disk":
        return list(itertools.islice(_dataset_rows(source), limit))
    if source.builder == "parquet":
        import pyarrow.parquet as pq

        batch = next(pq.ParquetFile(str(source.path)).iter_batches(batch_size=max(limit, 1)), None)
        return [] if batch is None else list(batch.to_pylist())
    if source.builder == "csv":
        import pandas as pd

        frame = pd.read_csv(source.path, nrows=limit, dtype=str, keep_default_na=False)
        return list(frame.to_dict("records"))
    if source.builder == "arrow":
        import pyarrow as pa

        with pa.memory_map(str(source.path)) as handle:
            reader = pa.ipc.open_stream(handle)  # what datasets writes (an IPC stream)
            found: list[Any] = []
            for batch in reader:
                found += batch.to_pylist()
                if len(found) >= limit:
                    break
            return found[:limit]
    return _json_fallback(source, limit)


def _json_fallback(source: Source, limit: Optional[int]) -> list[Any]:
    """Records of a JSON file read with the json module (named by line); with `limit`, JSON
    lines are read only as far as needed."""
    try:
        text = source.path.read_text(encoding="utf-8") if limit is None else _head_lines(source.path, limit)
    except UnicodeDecodeError as err:
        line = source.path.read_bytes()[:err.start].count(b"\n") + 1
        raise ValueError(f"{source.path}:{line}: not UTF-8 text ({err.reason})") from err
    numbered = list(itertools.islice(json_records(source.path, text), limit))
    source._lines = [no for no, _ in numbered]
    return [rec for _, rec in numbered]


def _head_lines(path: Path, limit: int) -> str:
    """The text of `path` up to its `limit`-th non-blank line (all of it for a JSON list)."""
    lines: list[str] = []
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            if not lines and line.lstrip().startswith("["):
                return line + handle.read()
            lines.append(line)
            if sum(1 for x in lines if x.strip()) >= limit:
                break
    return "".join(lines)


def columns_of(cfg: Any) -> dict[str, str]:
    """data.columns of a config, as canonical name -> the user's column name."""
    found = cfg.data.get("columns") or {}
    return {str(k): str(v) for k, v in found.items()}


def has_text_files(raw: str) -> bool:
    """True when data.path names plain text files (format=text's own input): no directory and no
    suffix `datasets` reads; otherwise format=text reads a data set's `text` column."""
    parts = [Path(p.strip()).expanduser() for p in raw.split(",") if p.strip()]
    return bool(parts) and all(not p.is_dir() and p.suffix not in BUILDERS for p in parts)
