"""Where documents come from: files of each kind (plain or compressed), directories of them,
parquet files and Hugging Face datasets.

A file's kind is its suffix after an optional compression suffix: `notes.jsonl.gz` is a
gzip-compressed JSON-lines file. gzip is read with the standard library; `.zst` needs the
`zstandard` package, `.parquet` needs `pyarrow` and `hf:` sources need `datasets`, each an
optional extra named in the error when it is missing.
"""

from __future__ import annotations

import gzip
import io
import os
import string
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO, Any

from .errors import DataError, require

KINDS = (".txt", ".jsonl", ".csv", ".parquet")
COMPRESSIONS = (".gz", ".zst")
HF_PREFIX = "hf:"


def file_kind(path: Path) -> tuple[str, str]:
    """(kind, compression) of a file from its suffixes: (".jsonl", ".gz") for `a.jsonl.gz`;
    the compression is "" for a plain file, the kind "" when it is none of `KINDS`."""
    suffixes = [s.lower() for s in path.suffixes[-2:]]
    compression = suffixes[-1] if suffixes and suffixes[-1] in COMPRESSIONS else ""
    if compression:
        suffixes = suffixes[:-1]
    kind = suffixes[-1] if suffixes and suffixes[-1] in KINDS else ""
    if kind == ".parquet" and compression:  # parquet compresses its own pages
        kind = ""
    return kind, compression


def open_bytes(path: Path) -> IO[bytes]:
    """A file opened for reading bytes, decompressed if its name ends in .gz or .zst."""
    compression = file_kind(path)[1]
    if compression == ".gz":
        return gzip.open(path, "rb")
    if compression == ".zst":
        zstandard = require("zstandard", "zstd", f"reading {path.name}")
        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), closefd=True))
    return open(path, "rb")


def list_inputs(path: Path) -> list[Path]:
    """The files a source reads: itself, or the files of a directory and its subdirectories
    whose kind is one of `KINDS` (plain or compressed), sorted by relative path, empty ones left out."""
    if not path.exists():
        raise DataError(f"{path}: no such file or directory")
    if not path.is_dir():
        return [path]
    found = [f for f in path.rglob("*") if f.is_file() and file_kind(f)[0] and not f.name.startswith(".")]
    if not found:
        raise DataError(f"{path}: no .txt files in this directory (nor .jsonl, .csv or .parquet files, "
                        "plain or .gz/.zst compressed)")
    return sorted((f for f in found if f.stat().st_size > 0), key=lambda f: f.relative_to(path).parts)


# ---------------------------------------------------------------------------------------------
# Records: their text column, or a template filled from their fields


def find_column(path: str | os.PathLike, names: Sequence[str], given: str | None, default: str, flag: str) -> str:
    """The column (or JSON field) of `names` to read: `given`, else the one named `default` in any
    case; a `DataError` naming the file, its columns and the command-line `flag` otherwise."""
    if given is not None:
        if given not in names:
            raise DataError(f"{path}: no column {given!r}; its columns are: {', '.join(names)}")
        return given
    matches = [name for name in names if name.strip().lower() == default]
    if len(matches) != 1:
        raise DataError(f"{path}: no column named {default!r}; its columns are: {', '.join(names)} "
                        f"(choose one with {flag})")
    return matches[0]


def template_fields(template: str) -> list[tuple[str, str, str | None, str | None]]:
    """The (literal, field, spec, conversion) parts of a str.format template; a DataError if it is
    malformed or uses a positional field such as "{}" or "{0}"."""
    try:
        parts = list(string.Formatter().parse(template))
    except ValueError as e:
        raise DataError(f"the template {template!r} is not a valid format string ({e})") from None
    for _, field, _, _ in parts:
        if field is not None and (field == "" or field.isdigit()):
            raise DataError(f"the template {template!r} has a positional field {{{field}}}; "
                            "name a field of the records, e.g. {text}")
    return parts


def format_record(template: str, record: dict, path: Path, lineno: int, unit: str = "line") -> str:
    """`template` filled from a record's fields; a DataError naming the file, line (or row) and field."""
    try:
        return template.format_map(record)
    except KeyError as e:
        raise DataError(f"{path}: {unit} {lineno} has no field {e.args[0]!r} (used by the template "
                        f"{template!r}); its fields are: {', '.join(map(str, record))}") from None
    except (ValueError, TypeError, AttributeError, IndexError) as e:
        raise DataError(f"{path}: {unit} {lineno}: the template {template!r} does not apply ({e})") from None



# ---------------------------------------------------------------------------------------------
# Parquet


def parquet_file(path: Path) -> Any:
    """A `pyarrow.parquet.ParquetFile`; a DataError if the file is not parquet."""
    pq = require("pyarrow.parquet", "parquet", f"reading {path.name}")
    import pyarrow as pa

    try:
        return pq.ParquetFile(path)
    except (pa.ArrowInvalid, OSError) as e:
        raise DataError(f"{path}: not a readable parquet file ({e})") from None


def record_columns(path: Path | str, names: list[str], text_column: str | None, template: str | None) -> list[str]:
    """The columns of a table (parquet file, dataset) that its documents need: those the template
    names, else the text column (default: "text" in any case)."""
    if template is None:
        return [find_column(path, names, text_column, "text", "--text-column")]
    needed = [f for _, f, _, _ in template_fields(template) if f is not None]
    missing = [f for f in needed if f.split(".")[0].split("[")[0] not in names]
    if missing:
        raise DataError(f"{path}: no column {missing[0]!r} (used by the template {template!r}); "
                        f"its columns are: {', '.join(names)}")
    return sorted({f.split(".")[0].split("[")[0] for f in needed})


def table_texts(table: Any, columns: list[str], template: str | None, name: str, first_row: int) -> list[str]:
    """The document of each row of an arrow table: its text column, or the template filled from
    its `columns`; a DataError naming the row (counted from 1) of a null or non-text value."""
    values = [table.column(c).to_pylist() for c in columns]
    if template is None:
        texts = values[0]
        if all(type(t) is str for t in texts):
            return texts
        row = next(i for i, t in enumerate(texts) if type(t) is not str)
        raise DataError(f"{name}: row {first_row + row + 1}: column {columns[0]!r} is "
                        f"{'null' if texts[row] is None else type(texts[row]).__name__}, not a string")
    return [format_record(template, dict(zip(columns, row, strict=True)), Path(name), first_row + i + 1, "row")
            for i, row in enumerate(zip(*values, strict=True))]


# ---------------------------------------------------------------------------------------------
# Hugging Face datasets


def is_dataset(source: Any) -> bool:
    """Whether `source` is a `datasets.Dataset` object (or one alike)."""
    return hasattr(source, "column_names") and hasattr(source, "with_format") and hasattr(source, "__len__")


def is_hf_source(source: str | os.PathLike) -> bool:
    """Whether a source names a Hugging Face dataset (`hf:NAME[:CONFIG]`) or a directory that
    `Dataset.save_to_disk` wrote."""
    if str(source).startswith(HF_PREFIX):
        return True
    path = Path(source).expanduser()
    return path.is_dir() and ((path / "state.json").is_file() or (path / "dataset_dict.json").is_file())


def load_hf_dataset(source: str | os.PathLike, split: str = "train") -> Any:
    """The `datasets.Dataset` of `hf:NAME[:CONFIG]` (its `split`) or of a `save_to_disk` directory.

    A hub dataset is downloaded (and cached) by `datasets` on first use; offline, the error
    is one line naming the dataset.
    """
    datasets = require("datasets", "datasets", f"reading {source}")
    spec = str(source)
    if not spec.startswith(HF_PREFIX):
        try:
            loaded = datasets.load_from_disk(str(Path(spec).expanduser()))
        except (OSError, ValueError) as e:
            raise DataError(f"{spec}: not a dataset saved with save_to_disk ({e})") from None
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise DataError(f"{spec}: no split {split!r}; its splits are: {', '.join(loaded)}")
            loaded = loaded[split]
        return loaded
    name, _, config = spec[len(HF_PREFIX):].partition(":")
    if not name:
        raise DataError(f"{spec}: name a dataset, e.g. hf:bookcorpus or hf:wikipedia:20220301.en")
    try:
        return datasets.load_dataset(name, config or None, split=split)
    except Exception as e:  # hub, network and builder errors come in many types
        first = (str(e).strip().splitlines() or [""])[0]
        raise DataError(f"{spec}: could not load the Hugging Face dataset {name!r}"
                        f"{f' (config {config!r})' if config else ''}, split {split!r} "
                        f"({type(e).__name__}: {first}); offline, load it once with internet, or "
                        "save it with save_to_disk and pass that directory") from None


def hf_fingerprint(dataset: Any) -> dict:
    """What identifies a dataset's content for the token cache: its own fingerprint (which
    `datasets` derives from its files and the operations applied), length and columns."""
    return {"fingerprint": getattr(dataset, "_fingerprint", None), "rows": len(dataset),
            "columns": list(dataset.column_names)}


def dataset_documents(source: str | os.PathLike, text_column: str | None, template: str | None,
                      rows: int = 1 << 14) -> Iterator[str]:
    """The document of each row of a Hugging Face dataset source (see `load_hf_dataset`)."""
    dataset = load_hf_dataset(source)
    columns = record_columns(str(source), list(dataset.column_names), text_column, template)
    arrow = dataset.with_format("arrow")
    for start in range(0, len(dataset), rows):
        yield from table_texts(arrow[start:start + rows].select(columns), columns, template, str(source), start)
