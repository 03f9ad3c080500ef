"""Reading documents: a .txt file, a .csv column, a .jsonl field or a .parquet column (plain or
compressed), a directory of them or a Hugging Face dataset, each record optionally formatted by a
template such as "JOKE: {text}".

Every problem with the data raises a `DataError` (a `ValueError`) whose message names the
file and what to do about it.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TypeVar

from .errors import DataError
from .sources import (dataset_documents, file_kind, find_column, format_record, is_hf_source, list_inputs, open_bytes,
                      parquet_file, record_columns, table_texts, template_fields)

# A long text file is read and tokenized in pieces of about this many characters.
_PIECE_CHARS = 1 << 18
# Discharge summaries and books exceed the csv module's default 128 KiB field limit.
_CSV_FIELD_LIMIT = 2**31 - 1


def _lines(path: Path) -> Iterator[str]:
    """The lines of a UTF-8 file (decompressed), line ends kept, a leading byte-order mark dropped."""
    offset = 0
    with open_bytes(path) as f:
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





def txt_frame(path: Path, template: str | None) -> tuple[str, str] | None:
    """(prefix, suffix) that a template puts around a text file's text ("" and "" without one),
    or None when it needs the whole text ({text} twice, or with a format spec)."""
    if template is None:
        return "", ""
    parts = template_fields(template)
    fields = [p[1] for p in parts if p[1] is not None]
    if any(f != "text" for f in fields):
        bad = next(f for f in fields if f != "text")
        raise DataError(f"{path}: a text file has one field, {{text}}; the template {template!r} uses {{{bad}}}")
    if len(fields) == 1 and parts[0][2] == "" and parts[0][3] is None:
        return parts[0][0], "".join(p[0] for p in parts[1:])
    return None


def _txt_documents(path: Path, template: str | None) -> Iterator[Iterable[str]]:
    """A .txt file as one document of pieces, formatted by `template` (whose one field is {text})."""
    frame = txt_frame(path, template)
    if frame is None:
        yield [format_record(template, {"text": "".join(_txt_pieces(path))}, path, 1)]
    elif frame == ("", ""):
        yield _txt_pieces(path)
    else:  # joining the literals to the text's ends keeps every cut point between pieces where it was
        yield _framed(_txt_pieces(path), *frame)


def _framed(pieces: Iterator[str], prefix: str, suffix: str) -> Iterator[str]:
    """The pieces with `prefix` joined to the first and `suffix` to the last."""
    previous = prefix + next(pieces, "")
    for piece in pieces:
        yield previous
        previous = piece
    yield previous + suffix


def _csv_documents(path: Path, text_column: str | None, template: str | None = None) -> Iterator[str]:
    csv.field_size_limit(_CSV_FIELD_LIMIT)
    # strict: an unterminated quote or text after a closing quote is an error, not a guess.
    reader = csv.reader(_lines(path), strict=True)
    row_start = 1
    try:
        header = next(reader, None)
        if not header:
            raise DataError(f"{path}: no header row (expected column names such as HADM_ID,TEXT)")
        if template is not None:
            template_fields(template)
        else:
            column = header.index(find_column(path, header, text_column, "text", "--text-column"))
        row_start = reader.line_num + 1
        for row in reader:
            if template is not None and row:  # a short row lacks the fields of the last columns
                yield format_record(template, dict(zip(header, row, strict=False)), path, row_start)
            elif template is None and len(row) > column:
                yield row[column]
            elif row:  # blank lines are skipped, short rows are not
                raise DataError(f"{path}: line {reader.line_num} has {len(row)} fields, "
                                f"no column {header[column]!r}")
            row_start = reader.line_num + 1
    except csv.Error as e:
        if "unexpected end of data" in str(e):
            raise DataError(f"{path}: line {row_start}: a quoted field is never closed") from None
        raise DataError(f"{path}: line {reader.line_num}: {e}") from None


def _jsonl_documents(path: Path, text_field: str | None, template: str | None = None,
                     batch_lines: int = 1 << 14) -> Iterator[str]:
    lines: list[str] = []
    first = 1
    for lineno, line in enumerate(_lines(path), 1):
        lines.append(line)
        if len(lines) >= batch_lines:
            yield from jsonl_texts(lines, path, first, text_field, template)
            lines, first = [], lineno + 1
    yield from jsonl_texts(lines, path, first, text_field, template)


def jsonl_texts(lines: list[str], path: Path, first_line: int, text_field: str | None,
                template: str | None) -> list[str]:
    """The document of each non-blank JSON line of `lines` (line `first_line` onwards): its
    `text_field` (default "text"), or `template` filled from its fields."""
    try:  # one parse of the whole batch; any problem is found again line by line, to name it
        records = json.loads("[" + ",".join(lines) + "]") if lines else []
        fast = len(records) == len(lines) and all(type(r) is dict for r in records)
    except json.JSONDecodeError:
        fast = False
    if not fast:
        return [_record_text(r, path, n, text_field, template) for n, r in _parse_lines(lines, path, first_line)]
    if template is not None:
        return [template.format_map(r) if _fields_ok(r, template) else
                _record_text(r, path, first_line + i, None, template) for i, r in enumerate(records)]
    field = text_field or "text"
    texts = [r.get(field) for r in records]
    if all(type(t) is str for t in texts):
        return texts
    bad = next(i for i, t in enumerate(texts) if type(t) is not str)
    return [_record_text(records[bad], path, first_line + bad, field, None)]  # raises


def _fields_ok(record: dict, template: str) -> bool:
    try:
        template.format_map(record)
        return True
    except Exception:  # named by `_record_text`, with its line
        return False


def _parse_lines(lines: list[str], path: Path, first_line: int) -> Iterator[tuple[int, dict]]:
    for lineno, line in enumerate(lines, first_line):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: line {lineno} is not valid JSON ({e.msg})") from None
        if not isinstance(record, dict):
            raise DataError(f"{path}: line {lineno} is a JSON {type(record).__name__}, not an object")
        yield lineno, record


def _record_text(record: dict, path: Path, lineno: int, text_field: str | None, template: str | None) -> str:
    if template is not None:
        return format_record(template, record, path, lineno)
    field = text_field or "text"
    if field not in record:
        raise DataError(f"{path}: line {lineno} has no field {field!r}; its fields are: {', '.join(record)}")
    text = record[field]
    if not isinstance(text, str):
        raise DataError(f"{path}: line {lineno}: field {field!r} is {type(text).__name__}, not a string")
    return text


def iter_jsonl_records(path: Path) -> Iterator[tuple[int, dict]]:
    """(line number, object) for each non-blank line of a JSON-lines file."""
    yield from _parse_lines(_lines(path), path, 1)


def _parquet_documents(path: Path, text_column: str | None, template: str | None) -> Iterator[str]:
    pf = parquet_file(path)
    columns = record_columns(path, pf.schema_arrow.names, text_column, template)
    row = 0
    for group in range(pf.num_row_groups):
        table = pf.read_row_group(group, columns=columns)
        yield from table_texts(table, columns, template, str(path), row)
        row += table.num_rows


def input_files(path: Path) -> list[Path]:
    """The files a source reads: itself, or the .txt/.jsonl/.csv/.parquet files (plain, .gz or
    .zst) of a directory and its subdirectories, sorted by relative path."""
    return list_inputs(path)


def check_source(path: Path, text_column: str | None) -> None:
    """A DataError for a file of an unsupported kind, an empty file, or a text column for a .txt."""
    if not path.is_file():
        return
    kind = file_kind(path)[0]
    if not kind:
        raise DataError(f"{path}: unsupported file type {''.join(path.suffixes[-2:]).lower()!r}; use a .txt, "
                        ".jsonl, .csv or .parquet file (.gz or .zst compressed too) or a directory of them")
    if path.stat().st_size == 0:
        raise DataError(f"{path}: the file is empty")
    if kind == ".txt" and text_column is not None:
        raise DataError(f"{path}: a text column ({text_column!r}) applies to .csv and .jsonl files only "
                        "(and to .parquet files and datasets)")


def _document_pieces(path: Path, text_column: str | None, template: str | None) -> Iterator[Iterable[str]]:
    """Each document of `path` as an iterable of text pieces."""
    check_source(path, text_column)
    readers = {".csv": _csv_documents, ".jsonl": _jsonl_documents, ".parquet": _parquet_documents}
    for f in input_files(path):
        kind = file_kind(f)[0]
        if kind == ".txt":
            yield from _txt_documents(f, template)
        else:
            yield from ([doc] for doc in readers[kind](f, text_column, template))


def iter_segments(path: Path, text_column: str | None, template: str | None = None) -> Iterator[tuple[bool, str]]:
    """(starts a document, text) for every non-empty piece of text; a DataError if there is
    none, or nothing but whitespace."""
    found = blank = False
    for pieces in _document_pieces(path, text_column, template):
        starts = True
        for piece in pieces:
            if piece:
                yield starts, piece
                starts, blank = False, True
                found = found or not piece.isspace()
    if not found:
        raise DataError(f"{path}: contains no text" + (" (only whitespace)" if blank else ""))


def iter_documents(path: str | os.PathLike, text_column: str | None = None,
                   template: str | None = None) -> Iterator[str]:
    """The documents of a data source, one string each.

    - a `.txt` file: one document (newlines as `open()` reads them);
    - a `.csv` file with a header: the `text_column` of each row (default: the column named
      "text" in any case, e.g. `HADM_ID,TEXT`);
    - a `.jsonl` file: the `text_column` field (default "text") of each line's object;
    - a `.parquet` file: the `text_column` of each row (needs pyarrow);
    - each of these compressed as `.gz`, or `.zst` (needs zstandard);
    - a directory: the files of these kinds in it and its subdirectories, sorted by relative
      path (empty and hidden ones skipped);
    - `hf:NAME[:CONFIG]` or a directory written by `save_to_disk`: the rows of a Hugging Face
      dataset's train split (needs datasets).

    A `template` such as "JOKE: {text}" formats each record (any field of a record by name; a
    .txt file's one field is {text}). Empty documents are skipped. Files must be UTF-8; a bad
    byte raises a `DataError` giving its byte offset and line, as do a missing or empty source
    and a missing column.
    """
    if is_hf_source(path):
        yield from (t for t in dataset_documents(path, text_column, template) if t)
        return
    parts: list[str] = []
    for starts, piece in iter_segments(Path(path), text_column, template):
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
