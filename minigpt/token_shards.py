"""Tokenizing a corpus in shards, on every core, resumably.

The inputs are cut into shards of about `shard_bytes` of text: a text file just before a
newline that follows a non-space character (no GPT-2 pre-token spans such a point, so the
shards' ids joined are exactly those of the whole text), a JSON-lines file after a line, a
parquet file at row groups, a dataset at rows; a CSV file (whose quoted fields may span lines)
is one shard. Worker processes write each shard as `NNNNNN.bin` (uint16 ids) and `NNNNNN.docs`
(int64 offsets of the documents that start in it) in a parts directory, then `NNNNNN.json`
to mark it done: a rerun after an interruption keeps every marked shard. `concatenate` joins
them into the cache's files.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import sys
import zlib
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import tiktoken

from .documents import _csv_documents, format_record, jsonl_texts, txt_frame
from .errors import DataError
from .files import CHUNK, atomic_file
from .sources import file_kind, open_bytes, parquet_file, record_columns, table_texts
from .tokenizer import EOS_TOKEN


@dataclass(frozen=True)
class Settings:
    """What tokenizing any shard needs."""

    separator: str
    text_column: str | None
    template: str | None
    piece_chars: int  # text encoded per tokenizer call


@dataclass
class Task:
    """One shard of input: a chunk of a file's bytes, row groups of a parquet file, rows of a dataset."""

    index: int
    kind: str  # ".txt", ".jsonl", ".csv", ".parquet" or "table"
    name: str  # the file (or dataset), for messages
    data: Any = None  # the bytes of a .txt/.jsonl chunk, or an arrow table
    offset: int = 0  # its first byte (or row) in the file
    line: int = 1  # its first line in the file
    first: bool = True  # whether it starts the file
    last: bool = True  # whether it ends the file
    groups: tuple[int, ...] = field(default_factory=tuple)  # parquet row groups
    size: int = 0  # bytes of input, for the progress bar


# ---------------------------------------------------------------------------------------------
# Planning


def plan_files(files: list[Path], settings: Settings, shard_bytes: int) -> Iterator[Task]:
    """The shards of these input files, in order."""
    index = 0
    for path in files:
        kind = file_kind(path)[0]
        if kind in (".txt", ".jsonl"):
            whole = kind == ".txt" and txt_frame(path, settings.template) is None
            for chunk, offset, line, first, last in _chunks(path, kind, 1 << 62 if whole else shard_bytes):
                yield Task(index, kind, str(path), chunk, offset, line, first, last, size=len(chunk))
                index += 1
        elif kind == ".parquet":
            pf = parquet_file(path)
            meta, groups, size, row, first_row = pf.metadata, [], 0, 0, 0
            for g in range(meta.num_row_groups):
                groups.append(g)
                size += meta.row_group(g).total_byte_size
                row += meta.row_group(g).num_rows
                if size >= shard_bytes or g == meta.num_row_groups - 1:
                    yield Task(index, kind, str(path), offset=first_row, groups=tuple(groups), size=size)
                    index, groups, size, first_row = index + 1, [], 0, row
        else:
            yield Task(index, kind, str(path), size=path.stat().st_size)
            index += 1


def plan_dataset(dataset: Any, columns: list[str], name: str, shard_bytes: int) -> Iterator[Task]:
    """Shards of a Hugging Face dataset: slices of rows of about `shard_bytes` each."""
    arrow = dataset.with_format("arrow")
    n = len(dataset)
    sample = arrow[:min(n, 1000)].select(columns)
    rows = max(1, int(shard_bytes * min(n, 1000) / max(sample.nbytes, 1)))
    for index, start in enumerate(range(0, n, rows)):
        table = arrow[start:start + rows].select(columns)
        yield Task(index, "table", name, table, offset=start, size=table.nbytes)


def _chunks(path: Path, kind: str, shard_bytes: int) -> Iterator[tuple[bytes, int, int, bool, bool]]:
    """(bytes, offset, first line, first, last) of a file cut at safe points every `shard_bytes` or so."""
    buf, offset, line, first, eof = b"", 0, 1, True, False
    with open_bytes(path) as f:
        while not eof:
            block = f.read(min(shard_bytes, CHUNK << 4))
            eof = not block
            buf += block
            while buf and (eof or len(buf) >= shard_bytes):
                cut = len(buf) if eof else _cut(buf, kind)
                if not cut:
                    break  # no cut point yet: read more
                chunk, buf = buf[:cut], buf[cut:]
                yield chunk, offset, line, first, eof and not buf
                offset, line, first = offset + len(chunk), line + chunk.count(b"\n"), False
    if first:  # nothing at all (a compressed empty file)
        yield b"", 0, 1, True, True


def _cut(buf: bytes, kind: str) -> int:
    """Where to end a chunk of `buf` (0: nowhere): after its last line for JSON lines; for text,
    before the last line break (\\n or \\r) that follows a printable ASCII character."""
    if kind == ".jsonl":
        return buf.rfind(b"\n") + 1
    end = len(buf)
    while (p := max(buf.rfind(b"\n", 1, end), buf.rfind(b"\r", 1, end))) > 0:
        if 0x21 <= buf[p - 1] <= 0x7E:
            return p
        end = p
    return 0


# ---------------------------------------------------------------------------------------------
# Tokenizing one shard


def _decode(task: Task) -> str:
    try:
        text = task.data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = task.line + task.data.count(b"\n", 0, e.start)
        raise DataError(f"{task.name}: not valid UTF-8 at byte {task.offset + e.start} (line {line}, bytes "
                        f"{task.data[e.start:e.start + 4]!r}); convert the file to UTF-8") from None
    return text.removeprefix("\ufeff") if task.first else text


def _txt_pieces(text: str, size: int) -> Iterator[str]:
    """`text` in pieces of about `size` characters, each cut just before a newline that follows a non-space."""
    start = 0
    while len(text) - start > size:
        p = text.find("\n", start + size)
        while p != -1 and text[p - 1].isspace():
            p = text.find("\n", p + 1)
        if p == -1:
            break
        yield text[start:p]
        start = p
    yield text[start:]


def _record_texts(task: Task, settings: Settings) -> Iterator[list[str]]:
    """The documents of a records shard, in batches."""
    if task.kind == ".jsonl":
        lines = _decode(task).split("\n")
        if lines and not lines[-1]:
            lines.pop()
        step = 1 << 14
        for i in range(0, len(lines), step):
            yield jsonl_texts(lines[i:i + step], Path(task.name), task.line + i, settings.text_column,
                              settings.template)
    elif task.kind == ".csv":
        batch: list[str] = []
        for text in _csv_documents(Path(task.name), settings.text_column, settings.template):
            batch.append(text)
            if len(batch) >= 1 << 14:
                yield batch
                batch = []
        yield batch
    else:
        table = task.data
        if task.kind == ".parquet":
            pf = parquet_file(Path(task.name))
            columns = record_columns(task.name, pf.schema_arrow.names, settings.text_column, settings.template)
            table = pf.read_row_groups(list(task.groups), columns=columns)
        columns = table.column_names
        for start in range(0, table.num_rows, 1 << 16):
            yield table_texts(table.slice(start, 1 << 16), columns, settings.template, task.name, task.offset + start)


def encode_array(text: str, tokenizer: tiktoken.Encoding) -> np.ndarray:
    """`tokenizer.encode(text)` ("<|endoftext|>" allowed) as uint16, without a list of ints where tiktoken can."""
    if hasattr(tokenizer, "encode_to_numpy"):  # where tiktoken has it
        return tokenizer.encode_to_numpy(text, allowed_special={EOS_TOKEN}).astype(np.uint16)
    return np.array(tokenizer.encode(text, allowed_special={EOS_TOKEN}), dtype=np.uint16)


def encode_documents(texts: list[str], tokenizer: tiktoken.Encoding, eos: bool) -> tuple[np.ndarray, np.ndarray]:
    """(uint16 ids, offsets of each document's first token) of whole documents (non-empty), an
    end-of-text token after each if `eos`.

    The documents are joined by "<|endoftext|>" and encoded in one call: tiktoken encodes the
    text between special tokens independently, so this is each document's `encode`, without a
    call (and list) per document. A document holding a literal "<|endoftext|>" makes the batch
    be encoded one document at a time.
    """
    eot = tokenizer.eot_token
    joined = EOS_TOKEN.join(texts)
    if joined.count(EOS_TOKEN) == len(texts) - 1:
        ids = encode_array(joined, tokenizer)
        seps = np.flatnonzero(ids == eot)
        if eos:
            return np.append(ids, np.uint16(eot)), np.concatenate([[0], seps + 1]).astype(np.int64)
        return np.delete(ids, seps), np.concatenate([[0], seps - np.arange(len(seps))]).astype(np.int64)
    lists = [tokenizer.encode(t, allowed_special={EOS_TOKEN}) + ([eot] if eos else []) for t in texts]
    lengths = np.array([len(x) for x in lists], dtype=np.int64)
    ids = np.array([i for x in lists for i in x], dtype=np.uint16)
    return ids, np.cumsum(lengths) - lengths


def _groups(texts: list[str], chars: int) -> Iterator[list[str]]:
    """Consecutive runs of the non-empty texts of about `chars` characters each."""
    group: list[str] = []
    size = 0
    for text in texts:
        if text:
            group.append(text)
            size += len(text)
            if size >= chars:
                yield group
                group, size = [], 0
    if group:
        yield group


def _shard_arrays(task: Task, settings: Settings, tokenizer: tiktoken.Encoding,
                  state: dict) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(ids, document offsets within them) of a shard, a piece at a time; `state` gathers whether
    it held any text ("blank") and any non-whitespace ("found")."""
    eos = settings.separator == "eos"
    if task.kind != ".txt":
        for texts in _record_texts(task, settings):
            state["blank"] = state["blank"] or any(texts)
            state["found"] = state["found"] or any(t and not t.isspace() for t in texts)
            for group in _groups(texts, settings.piece_chars):
                yield encode_documents(group, tokenizer, eos)
        return
    text, frame = _decode(task).replace("\r\n", "\n").replace("\r", "\n"), txt_frame(Path(task.name), settings.template)
    if frame is None:
        text = format_record(settings.template, {"text": text}, Path(task.name), 1)
    else:
        text = (frame[0] if task.first else "") + text + (frame[1] if task.last else "")
    state["blank"], state["found"] = bool(text), bool(text) and not text.isspace()
    starts = task.first and bool(text)
    for piece in _txt_pieces(text, settings.piece_chars):
        ids = encode_array(piece, tokenizer)
        yield ids, np.zeros(1 if starts else 0, dtype=np.int64)
        starts = False
    if eos and task.last and (bool(text) or not task.first):
        yield np.array([tokenizer.eot_token], dtype=np.uint16), np.zeros(0, dtype=np.int64)


def run_task(task: Task, settings: Settings, parts: Path, tokenizer: tiktoken.Encoding | None = None) -> dict:
    """Tokenize a shard into `parts`; its marker (also written as NNNNNN.json, last)."""
    tokenizer = tokenizer or _worker_tokenizer
    stem = parts / f"{task.index:06d}"
    state = {"blank": False, "found": False}
    count = n_docs = crc = docs_crc = 0
    with atomic_file(stem.with_suffix(".bin")) as ids_file, atomic_file(stem.with_suffix(".docs")) as docs_file:
        for ids, starts in _shard_arrays(task, settings, tokenizer, state):
            data, offsets = ids.tobytes(), (starts + count).astype("<i8").tobytes()
            ids_file.write(data)
            docs_file.write(offsets)
            crc, docs_crc = zlib.crc32(data, crc), zlib.crc32(offsets, docs_crc)
            count, n_docs = count + len(ids), n_docs + len(starts)
    marker = {"name": task.name, "offset": task.offset, "count": count, "n_docs": n_docs, "crc32": crc,
              "docs_crc32": docs_crc, "size": task.size, **state}
    with atomic_file(stem.with_suffix(".json"), "w") as f:
        f.write(json.dumps(marker))
    return marker


_worker_tokenizer: tiktoken.Encoding | None = None


def _init_worker(tokenizer: tiktoken.Encoding) -> None:
    global _worker_tokenizer
    _worker_tokenizer = tokenizer
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C stops the main process, which lets running shards finish


# ---------------------------------------------------------------------------------------------
# Running and joining the shards


def finished(parts: Path, task: Task) -> dict | None:
    """The marker of a shard done by an earlier run, if its files are whole and it is this task's."""
    stem = parts / f"{task.index:06d}"
    try:
        marker = json.loads(stem.with_suffix(".json").read_text(encoding="utf-8"))
        if (marker["name"], marker["offset"]) == (task.name, task.offset) and \
                stem.with_suffix(".bin").stat().st_size == 2 * marker["count"] and \
                stem.with_suffix(".docs").stat().st_size == 8 * marker["n_docs"]:
            return marker
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return None


def tokenize(tasks: Iterable[Task], settings: Settings, tokenizer: tiktoken.Encoding, parts: Path, workers: int,
             progress: Any) -> list[dict]:
    """Tokenize every shard not already done in `parts`, on `workers` processes (1: in this one);
    the markers in order. `progress(marker)` is called as each shard is done or found done."""
    markers: list[dict] = []

    def collect(marker: dict) -> None:
        markers.append(marker)
        progress(marker)

    if workers <= 1:
        for task in tasks:
            collect(finished(parts, task) or run_task(task, settings, parts, tokenizer))
        return markers
    context = multiprocessing.get_context("fork" if sys.platform == "linux" else "spawn")
    with ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker, initargs=(tokenizer,)) as pool:
        pending: deque = deque()
        try:
            for task in tasks:
                done = finished(parts, task)
                pending.append(done if done is not None else pool.submit(run_task, task, settings, parts))
                while len(pending) > workers or (pending and isinstance(pending[0], dict)):
                    first = pending.popleft()
                    collect(first if isinstance(first, dict) else first.result())
            while pending:
                first = pending.popleft()
                collect(first if isinstance(first, dict) else first.result())
        except BaseException as e:
            if isinstance(e, KeyboardInterrupt):
                print("\ninterrupted: finishing the shards being tokenized (they are kept)", file=sys.stderr)
            pool.shutdown(wait=True, cancel_futures=True)
            raise
    return markers


def concatenate(markers: list[dict], parts: Path, bin_path: Path, docs_path: Path, drop_last: bool) -> dict:
    """Join the shards into `bin_path` and `docs_path` (each written atomically), dropping the
    last token if `drop_last`; the counts and CRC-32s of the cache header."""
    count = n_docs = crc = docs_crc = 0
    total = sum(m["count"] for m in markers) - drop_last
    with ExitStack() as stack:
        ids_out, docs_out = stack.enter_context(atomic_file(bin_path)), stack.enter_context(atomic_file(docs_path))
        for i, marker in enumerate(markers):
            stem, shard_crc, start = parts / f"{i:06d}", 0, count
            with open(stem.with_suffix(".bin"), "rb") as f:
                while block := f.read(CHUNK):
                    shard_crc = zlib.crc32(block, shard_crc)
                    block = block[:max(0, 2 * (total - count))]
                    ids_out.write(block)
                    crc, count = zlib.crc32(block, crc), count + len(block) // 2
            starts = np.fromfile(stem.with_suffix(".docs"), dtype="<i8")
            if shard_crc != marker["crc32"] or zlib.crc32(starts.tobytes()) != marker["docs_crc32"]:
                os.unlink(stem.with_suffix(".json"))
                raise DataError(f"{stem}.bin: a finished shard of the token cache is damaged; it was removed, "
                                "run again to tokenize it anew")
            offsets = (starts + start).astype("<i8")
            docs_out.write(offsets.tobytes())
            docs_crc, n_docs = zlib.crc32(offsets.tobytes(), docs_crc), n_docs + len(offsets)
    return {"count": count, "n_docs": n_docs, "crc32": crc, "docs_crc32": docs_crc}
