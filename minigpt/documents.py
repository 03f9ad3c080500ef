"""Reading documents: a .txt file, a directory of .txt files, a .csv column or a .jsonl field.

Every problem with the data raises a `DataError` (a `ValueError`) whose message names the
file and what to do about it.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import TypeVar

from .errors import DataError

# A long text file is read and tokenized in pieces of about this many characters.
_PIECE_CHARS = 1 << 18
# Discharge summaries and books exceed the csv module's default 128 KiB field limit.
_CSV_FIELD_LIMIT = 2**31 - 1


def _lines(path: Path) -> Iterator[str]:
    """The lines of a UTF-8 file, line ends kept, a leading byte-order mark dropped."""
    offset = 0
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(
                    f"{path}: not valid UTF-8 at byte {offset + e.start} (line {lineno}, bytes "
                    f"{raw[e.start:e.start + 4]!r}); convert the file to UTF-8"
                ) from None
            yield line.removeprefix("\ufeff") if lineno == 1 else line
            offset += len(raw)


def _txt_pieces(path: Path) -> Iterator[str]:
    """The text of a .txt file, as `open(path).read()` gives it, in pieces of about `_PIECE_CHARS`.

    A piece ends just before a newline that follows a non-space character: no GPT-2
    pre-token spans such a point, so tokenizing the pieces one by one gives exactly the ids of
    the whole text (a text without such a point, e.g. one huge line, stays in one piece).
    """
    parts: list[str] = []
    size = 0
    for line in _lines(path):
        line = line.replace("\r\n", "\n").replace("\r", "\n")  # universal newlines, as open() reads
        parts.append(line)
        size += len(line)
        if size >= _PIECE_CHARS and len(line) >= 2 and line[-1] == "\n" and not line[-2].isspace():
            yield "".join(parts)[:-1]
            parts, size = ["\n"], 1
    yield "".join(parts)


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


def _csv_documents(path: Path, text_column: str | None) -> Iterator[str]:
    csv.field_size_limit(_CSV_FIELD_LIMIT)
    # strict: an unterminated quote or text after a closing quote is an error, not a guess.
    reader = csv.reader(_lines(path), strict=True)
    row_start = 1
    try:
        header = next(reader, None)
        if not header:
            raise DataError(f"{path}: no header row (expected column names such as HADM_ID,TEXT)")
        column = header.index(find_column(path, header, text_column, "text", "--text-column"))
        row_start = reader.line_num + 1
        for row in reader:
            if len(row) > column:
                yield row[column]
            elif row:  # blank lines are skipped, short rows are not
                raise DataError(f"{path}: line {reader.line_num} has {len(row)} fields, "
                                f"no column {header[column]!r}")
            row_start = reader.line_num + 1
    except csv.Error as e:
        if "unexpected end of data" in str(e):
            raise DataError(f"{path}: line {row_start}: a quoted field is never closed") from None
        raise DataError(f"{path}: line {reader.line_num}: {e}") from None


def iter_jsonl_records(path: Path) -> Iterator[tuple[int, dict]]:
    """(line number, object) for each non-blank line of a JSON-lines file."""
    for lineno, line in enumerate(_lines(path), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: line {lineno} is not valid JSON ({e.msg})") from None
        if not isinstance(record, dict):
            raise DataError(f"{path}: line {lineno} is a JSON {type(record).__name__}, not an object")
        yield lineno, record


def _jsonl_documents(path: Path, text_field: str | None) -> Iterator[str]:
    field = text_field or "text"
    for lineno, record in iter_jsonl_records(path):
        if field not in record:
            raise DataError(f"{path}: line {lineno} has no field {field!r}; its fields are: "
                            f"{', '.join(record)}")
        text = record[field]
        if not isinstance(text, str):
            raise DataError(f"{path}: line {lineno}: field {field!r} is {type(text).__name__}, not a string")
        yield text


def input_files(path: Path) -> list[Path]:
    """The files a source reads: itself, or a directory's .txt files sorted by name."""
    if not path.exists():
        raise DataError(f"{path}: no such file or directory")
    if not path.is_dir():
        return [path]
    files = sorted(f for f in path.iterdir() if f.suffix.lower() == ".txt" and f.is_file())
    if not files:
        raise DataError(f"{path}: no .txt files in this directory")
    return files


def _document_pieces(path: Path, text_column: str | None) -> Iterator[Iterable[str]]:
    """Each document of `path` as an iterable of text pieces."""
    files = input_files(path)
    suffix = ""  # a directory of .txt files
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix not in (".txt", ".csv", ".jsonl"):
            raise DataError(f"{path}: unsupported file type {suffix!r}; "
                            "use a .txt, .csv or .jsonl file or a directory of .txt files")
        if path.stat().st_size == 0:
            raise DataError(f"{path}: the file is empty")
    if suffix in ("", ".txt"):
        if text_column is not None:
            raise DataError(f"{path}: a text column ({text_column!r}) applies to .csv and .jsonl files only")
        yield from map(_txt_pieces, files)
    else:
        documents = _csv_documents if suffix == ".csv" else _jsonl_documents
        yield from ([doc] for doc in documents(path, text_column))


def iter_segments(path: Path, text_column: str | None) -> Iterator[tuple[bool, str]]:
    """(starts a document, text) for every non-empty piece of text; a DataError if there is
    none, or nothing but whitespace."""
    found = blank = False
    for pieces in _document_pieces(path, text_column):
        starts = True
        for piece in pieces:
            if piece:
                yield starts, piece
                starts, blank = False, True
                found = found or not piece.isspace()
    if not found:
        raise DataError(f"{path}: contains no text" + (" (only whitespace)" if blank else ""))


def iter_documents(path: str | os.PathLike, text_column: str | None = None) -> Iterator[str]:
    """The documents of a data source, one string each.

    - a `.txt` file: one document (newlines as `open()` reads them);
    - a directory: each of its `.txt` files, sorted by name (empty ones skipped);
    - a `.csv` file with a header: the `text_column` of each row (default: the column named
      "text" in any case, e.g. `HADM_ID,TEXT`);
    - a `.jsonl` file: the `text_column` field (default "text") of each line's object.

    Empty documents are skipped. Files must be UTF-8; a bad byte raises a `DataError` giving
    its byte offset and line, as do a missing or empty source and a missing column.
    """
    parts: list[str] = []
    for starts, piece in iter_segments(Path(path), text_column):
        if starts and parts:
            yield "".join(parts)
            parts = []
        parts.append(piece)
    if parts:
        yield "".join(parts)


T = TypeVar("T")


def with_eos(documents: Iterable[tuple[bool, T]]) -> Iterator[T | None]:
    """The items of (starts a document, item) pairs, with None wherever an end-of-text token goes:
    after every document when there are several, nowhere when there is one (a single text
    then tokenizes exactly as `tokenizer.encode` does: the-verdict stays 5145 tokens)."""
    n_docs = 0
    for starts, item in documents:
        if starts:
            n_docs += 1
            if n_docs > 1:
                yield None
        yield item
    if n_docs > 1:
        yield None
