"""Text in, training windows out: corpora, a token cache, splits and datasets.

The path of the data, step by step:

    resolve_corpus("the-verdict")        a named corpus (found or downloaded) or a path
    iter_documents(path)                 .txt file | directory of .txt | .csv column | .jsonl field
    load_token_ids(source, tokenizer)    tokenized once, cached as a uint16 memmap beside the text
    split_tokens(ids, 0.1, context)      train = the first 90%, validation = the last 10%
    TokenWindowDataset(train_ids, ...)   (x, y) sliding windows, read straight from the memmap

plus the tutorial's `GPTDatasetV1` / `create_dataloader_v1`, and `pack_documents` /
`chunk_documents` for corpora of many documents. Every problem with the data raises a
`DataError` (a `ValueError`) whose message names the file and what to do about it.
"""

from __future__ import annotations

import csv
import hashlib
import http.client
import json
import os
import tempfile
import urllib.request
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, TypeVar

import numpy as np
import tiktoken
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from .tokenizer import EOS_ID, EOS_TOKEN, get_tokenizer

# F.cross_entropy skips targets equal to its default ignore_index, -100: used for padding.
IGNORE_INDEX = -100
CACHE_VERSION = 1
# A long text file is read and tokenized in pieces of about this many characters...
_PIECE_CHARS = 1 << 18
# ...and tiktoken encodes about this many characters per (multi-threaded) batch.
_BATCH_CHARS = 1 << 22
# Discharge summaries and books exceed the csv module's default 128 KiB field limit.
_CSV_FIELD_LIMIT = 2**31 - 1


class DataError(ValueError):
    """Data that can't be used: missing, empty, undecodable, or too short."""


# ---------------------------------------------------------------------------------------------
# Named corpora


@dataclass(frozen=True)
class Corpus:
    filename: str  # its name in the data directory
    url: str  # where it is published
    sha256: str  # of the published file


NAMED_CORPORA: dict[str, Corpus] = {
    "the-verdict": Corpus(
        "the-verdict.txt",
        "https://raw.githubusercontent.com/rasbt/LLMs-from-scratch/main/ch02/01_main-chapter-code/"
        "the-verdict.txt",
        "b41e41a68f0398a3154ae69e2e4c0e2694e17fe0d66730536837f1b01935b31f",
    ),
    "tinyshakespeare": Corpus(
        "tinyshakespeare.txt",
        "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt",
        "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed",
    ),
}


def default_data_dir() -> Path:
    """`$MINIGPT_DATA_DIR`, else `data/` in the current directory."""
    return Path(os.environ.get("MINIGPT_DATA_DIR") or "data")


def resolve_corpus(name_or_path: str | os.PathLike, data_dir: str | os.PathLike | None = None,
                   base_url: str | None = None) -> Path:
    """The file or directory to read for a corpus name (see `NAMED_CORPORA`) or a path.

    A named corpus is `<data_dir>/<filename>`; when that file is missing it is downloaded
    there from its public URL, or from `<base_url>/<filename>` when `base_url` (or
    `$MINIGPT_DATA_URL`) names a mirror, and kept only if its sha256 matches. Names win
    over paths: write `./the-verdict` for a file of that name.
    """
    name = str(name_or_path)
    if name in NAMED_CORPORA:
        corpus = NAMED_CORPORA[name]
        path = Path(data_dir or default_data_dir()) / corpus.filename
        if not path.is_file():
            base_url = base_url or os.environ.get("MINIGPT_DATA_URL")
            url = f"{base_url.rstrip('/')}/{corpus.filename}" if base_url else corpus.url
            _download(name, corpus, url, path)
        return path
    path = Path(name_or_path).expanduser()
    if not path.exists():
        raise DataError(f"{path}: no such file or directory (named corpora: {', '.join(NAMED_CORPORA)})")
    return path


@contextmanager
def _atomic_file(dest: Path) -> Iterator[BinaryIO]:
    """A binary file that becomes `dest` only if the block completes: a crash or an error
    leaves `dest` as it was and no temporary file behind."""
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.tmp-", dir=dest.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
        os.replace(tmp, dest)
    finally:
        Path(tmp).unlink(missing_ok=True)


def _download(name: str, corpus: Corpus, url: str, dest: Path) -> None:
    digest = hashlib.sha256()
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        with _atomic_file(dest) as f, urllib.request.urlopen(url, timeout=30) as response:
            size = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=size, unit="B", unit_scale=True, desc=f"downloading {corpus.filename}") as bar:
                while block := response.read(1 << 16):
                    f.write(block)
                    digest.update(block)
                    bar.update(len(block))
            if digest.hexdigest() != corpus.sha256:
                raise DataError(
                    f"{name}: the file downloaded from {url} has sha256 {digest.hexdigest()}, expected "
                    f"{corpus.sha256}; it was not saved. Download {corpus.url} yourself and save it as {dest}"
                )
    except DataError:
        raise
    # URLError/HTTPError/timeouts are OSErrors; a malformed mirror URL is a ValueError.
    except (OSError, ValueError, http.client.HTTPException) as e:
        raise DataError(
            f"{name}: {dest} does not exist and downloading it from {url} failed ({type(e).__name__}: {e}). "
            f"Offline? Download {corpus.url} yourself and save it as {dest}, or point --data-dir / "
            f"MINIGPT_DATA_DIR at a directory that holds {corpus.filename}"
        ) from e


# ---------------------------------------------------------------------------------------------
# Reading documents


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


def _text_column_of(path: Path, header: list[str], text_column: str | None) -> int:
    """The index of the text column: `text_column`, else the one named "text" in any case."""
    columns = ", ".join(header)
    if text_column is None:
        matches = [i for i, name in enumerate(header) if name.strip().lower() == "text"]
        if len(matches) == 1:
            return matches[0]
        raise DataError(f"{path}: no text column given and none is named 'text'; its columns are: "
                        f"{columns} (choose one with --text-column)")
    if text_column not in header:
        raise DataError(f"{path}: no column {text_column!r}; its columns are: {columns}")
    return header.index(text_column)


def _csv_documents(path: Path, text_column: str | None) -> Iterator[str]:
    csv.field_size_limit(_CSV_FIELD_LIMIT)
    reader = csv.reader(_lines(path))
    try:
        header = next(reader, None)
        if not header:
            raise DataError(f"{path}: no header row (expected column names such as HADM_ID,TEXT)")
        column = _text_column_of(path, header, text_column)
        for row in reader:
            if len(row) > column:
                yield row[column]
            elif row:  # blank lines are skipped, short rows are not
                raise DataError(f"{path}: line {reader.line_num} has {len(row)} fields, "
                                f"no column {header[column]!r}")
    except csv.Error as e:
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


def _input_files(path: Path) -> list[Path]:
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
    files = _input_files(path)
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


def _segments(path: Path, text_column: str | None) -> Iterator[tuple[bool, str]]:
    """(starts a document, text) for every non-empty piece of text; a DataError if there is none."""
    found = False
    for pieces in _document_pieces(path, text_column):
        starts = True
        for piece in pieces:
            if piece:
                yield starts, piece
                starts, found = False, True
    if not found:
        raise DataError(f"{path}: contains no text")


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
    for starts, piece in _segments(Path(path), text_column):
        if starts and parts:
            yield "".join(parts)
            parts = []
        parts.append(piece)
    if parts:
        yield "".join(parts)


# ---------------------------------------------------------------------------------------------
# Tokenizing once: the token cache

T = TypeVar("T")


def _with_eos(documents: Iterable[tuple[bool, T]]) -> Iterator[T | None]:
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


def _encode(segments: Iterable[tuple[bool, str]], tokenizer: tiktoken.Encoding) -> Iterator[np.ndarray]:
    """uint16 token ids of the segments joined by `_with_eos`, in order, a batch at a time.

    A literal "<|endoftext|>" in the text is the end-of-text token, as in `text_to_token_ids`.
    """
    eos = np.array([tokenizer.eot_token], dtype=np.uint16)

    def flush(batch: list[str | None]) -> Iterator[np.ndarray]:
        encoded = iter(tokenizer.encode_batch([t for t in batch if t is not None],
                                              allowed_special={EOS_TOKEN}))
        for text in batch:
            yield eos if text is None else np.array(next(encoded), dtype=np.uint16)

    batch: list[str | None] = []
    chars = 0
    for text in _with_eos(segments):
        batch.append(text)
        chars += len(text or "")
        if chars >= _BATCH_CHARS:
            yield from flush(batch)
            batch, chars = [], 0
    yield from flush(batch)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def _fingerprints(path: Path, files: list[Path], hashed: bool = True) -> list[dict]:
    """Name (relative to the source), size, mtime and, if `hashed`, sha256 of each input file."""
    base = path if path.is_dir() else path.parent
    prints = []
    for f in files:
        stat = f.stat()
        prints.append({"name": str(f.relative_to(base)), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
                       **({"sha256": _sha256(f)} if hashed else {})})
    return prints


def _is_current(header: dict, params: dict, path: Path, files: list[Path], bin_path: Path) -> bool:
    """Whether a cache header describes these input files and settings, and its .bin is whole.

    Names, sizes and mtimes are compared first; a file whose mtime alone changed (touched,
    copied) is hashed, and still counts as unchanged if its sha256 is the recorded one.
    """
    if {k: header.get(k) for k in params} != params:
        return False
    current = _fingerprints(path, files, hashed=False)
    try:
        recorded = header["inputs"]
        if [(r["name"], r["size"]) for r in recorded] != [(c["name"], c["size"]) for c in current]:
            return False
        for r, c, f in zip(recorded, current, files, strict=True):
            if r["mtime_ns"] != c["mtime_ns"] and r["sha256"] != _sha256(f):
                return False
        return bin_path.is_file() and bin_path.stat().st_size == header["count"] * 2
    except (KeyError, TypeError):  # a damaged header: rebuild
        return False


def _read_header(json_path: Path) -> dict:
    try:
        return json.loads(json_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def _writable(directory: Path) -> bool:
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=directory):
            return True
    except OSError:
        return False


def user_cache_dir() -> Path:
    """Where token caches go when the source's directory is read-only: `$XDG_CACHE_HOME/minigpt`
    (default `~/.cache/minigpt`)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "minigpt"


def _cache_files(path: Path, cache_dir: str | os.PathLike | None) -> list[tuple[Path, Path]]:
    """Candidate (.bin, .json) cache files, in order of preference."""
    path = path.resolve()  # "." and "books/" name their directory too
    name = f"{path.name}.tokens"
    # In a shared cache directory, a hash of the absolute path keeps same-named sources apart.
    keyed = f"{hashlib.sha256(str(path).encode()).hexdigest()[:12]}-{name}"
    stems = [Path(cache_dir) / keyed] if cache_dir is not None else [path.parent / name, user_cache_dir() / keyed]
    return [(stem.with_name(f"{stem.name}.bin"), stem.with_name(f"{stem.name}.json")) for stem in stems]


def load_token_ids(source: str | os.PathLike, tokenizer: tiktoken.Encoding, text_column: str | None = None,
                   data_dir: str | os.PathLike | None = None,
                   cache_dir: str | os.PathLike | None = None) -> np.memmap:
    """All token ids of a corpus name or path, as a read-only uint16 memmap (tokenized once).

    Documents are joined with an end-of-text token (50256) after each one when there are
    several; a single text gets none, so a .txt file gives exactly `tokenizer.encode(text)`.
    The ids are cached as `<name>.tokens.bin` (raw uint16) plus `<name>.tokens.json` (input
    files with size, mtime and sha256; tokenizer; text column; token count) beside the source
    (for a directory: beside the directory), or, if that directory is read-only, in
    `user_cache_dir()`; `cache_dir` forces a location. A cache is reused while it matches and
    rebuilt when an input or a setting changes. Text and ids stream through in batches, so
    the corpus never has to fit in memory as Python lists.
    """
    if tokenizer.n_vocab > np.iinfo(np.uint16).max + 1:
        raise DataError(f"the token cache stores uint16 ids; tokenizer {tokenizer.name!r} has "
                        f"{tokenizer.n_vocab} tokens")
    path = resolve_corpus(source, data_dir)
    files = _input_files(path)
    params = {"version": CACHE_VERSION, "tokenizer": tokenizer.name, "n_vocab": tokenizer.n_vocab,
              "text_column": text_column}
    candidates = _cache_files(path, cache_dir)
    for bin_path, json_path in candidates:
        header = _read_header(json_path)
        if header and _is_current(header, params, path, files, bin_path):
            return np.memmap(bin_path, dtype=np.uint16, mode="r", shape=(header["count"],))

    writable = next((c for c in candidates if _writable(c[0].parent)), None)
    if writable is None:
        raise DataError(f"nowhere to write the token cache of {path}: "
                        f"{', '.join(str(b.parent) for b, _ in candidates)} not writable")
    bin_path, json_path = writable
    # Fingerprint before reading: a file edited meanwhile then fails the check next time.
    header = {**params, "source": str(path.resolve()), "inputs": _fingerprints(path, files)}
    json_path.unlink(missing_ok=True)  # an old header must never describe the new .bin
    count = 0
    with _atomic_file(bin_path) as f, tqdm(desc=f"tokenizing {path.name}", unit="tok", unit_scale=True,
                                          disable=None, leave=False) as bar:
        for ids in _encode(_segments(path, text_column), tokenizer):
            f.write(ids.tobytes())
            count += len(ids)
            bar.update(len(ids))
    with _atomic_file(json_path) as f:
        f.write((json.dumps({**header, "count": count}, indent=2) + "\n").encode())
    return np.memmap(bin_path, dtype=np.uint16, mode="r", shape=(count,))


# ---------------------------------------------------------------------------------------------
# Train/validation split


def split_tokens(ids: np.ndarray, val_ratio: float, context_length: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, validation): the first and the last `val_ratio` of `ids`, as views.

    The cut is the tutorial's `int(train_ratio * len)`. Either part must hold at least one
    window, context_length + 1 tokens (inputs plus the shifted targets): the tutorial's
    sanity check, made an error.
    """
    if not 0.0 < val_ratio < 1.0:
        raise DataError(f"the validation ratio must be between 0 and 1, got {val_ratio}")
    n = len(ids)
    need = context_length + 1
    if n < 2 * need:
        raise DataError(f"the corpus has {n} tokens, fewer than the 2 x {need} (context_length + 1) "
                        "that one training and one validation window need; use a smaller context "
                        "length or more text")
    # round() drops float noise such as (1 - 0.9) * 600 = 59.99999999999999
    n_train = int(round((1.0 - val_ratio) * n, 6))
    for part, size, fix in (("training", n_train, "smaller"), ("validation", n - n_train, "larger")):
        if size < need:
            raise DataError(f"the {part} split has {size} of the corpus's {n} tokens (validation ratio "
                            f"{val_ratio}), fewer than the {need} (context_length + 1) one window needs; "
                            f"use a smaller context length or a {fix} validation ratio")
    return ids[:n_train], ids[n_train:]


# ---------------------------------------------------------------------------------------------
# Datasets


class TokenWindowDataset(Dataset):
    """Sliding windows over a 1-D array of token ids (a memmap is read lazily, never loaded).

    Item i is (ids[s : s+max_length], ids[s+1 : s+max_length+1]) with s = i * stride, for
    s in range(0, len(ids) - max_length, stride): the tutorial's windows, as int64 tensors.
    """

    def __init__(self, ids: np.ndarray | Sequence[int], max_length: int, stride: int):
        if max_length < 1 or stride < 1:
            raise ValueError(f"max_length and stride must be positive, got {max_length} and {stride}")
        self.ids = ids if isinstance(ids, np.ndarray) else np.asarray(ids, dtype=np.int64)
        self.max_length = max_length
        self.stride = stride
        self.starts = range(0, len(self.ids) - max_length, stride)

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        start = self.starts[idx]
        x = self.ids[start:start + self.max_length].astype(np.int64)
        y = self.ids[start + 1:start + self.max_length + 1].astype(np.int64)
        return torch.from_numpy(x), torch.from_numpy(y)


class GPTDatasetV1(TokenWindowDataset):
    """The tutorial's dataset: `txt` tokenized, then sliding windows of `max_length` every `stride`.

    Unlike the first edition, "<|endoftext|>" in `txt` is allowed (as the token 50256, as later
    editions do); any other text gives the same ids as `tokenizer.encode(txt)`.
    """

    def __init__(self, txt: str, tokenizer: tiktoken.Encoding, max_length: int, stride: int):
        self.tokenizer = tokenizer
        token_ids = tokenizer.encode(txt, allowed_special={EOS_TOKEN})
        super().__init__(np.array(token_ids, dtype=np.int64), max_length, stride)


def create_dataloader_v1(txt: str, batch_size: int = 4, max_length: int = 256, stride: int = 128,
                         shuffle: bool = True, drop_last: bool = True, num_workers: int = 0) -> DataLoader:
    """The tutorial's loader: GPT-2 tokens of `txt` in `GPTDatasetV1` windows.

    Shuffling draws from torch's global RNG, so after `torch.manual_seed(123)` the batches are
    the tutorial's, in the tutorial's order.
    """
    dataset = GPTDatasetV1(txt, get_tokenizer(), max_length, stride)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, drop_last=drop_last,
                      num_workers=num_workers)


def pack_documents(docs_ids: Iterable[Sequence[int]], context_length: int,
                   eos_id: int = EOS_ID) -> TokenWindowDataset:
    """Concatenate documents with `eos_id` after each (none for a lone document) and cut the
    stream into full windows; the remainder is dropped.

    This is `group_texts` of the Hugging Face recipes, with one difference: a window holds
    context_length inputs and the context_length targets shifted by one, and consecutive windows
    share their boundary token, so every token is a target once (a block of n tokens that the
    model shifts itself trains only n - 1 predictions).
    """
    parts = [np.array([eos_id] if d is None else d, dtype=np.int64)
             for d in _with_eos((True, d) for d in docs_ids if len(d))]
    ids = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
    return TokenWindowDataset(ids, context_length, context_length)


def split_documents(ids: np.ndarray, eos_id: int = EOS_ID) -> list[np.ndarray]:
    """Views of a joined token stream (as `load_token_ids` writes it), one per document, each
    ending with its `eos_id` (a text without one is a single document)."""
    return [d for d in np.split(ids, np.flatnonzero(ids == eos_id) + 1) if len(d)]


class DocumentChunkDataset(Dataset):
    """Chunks that never cross a document boundary, padded to `context_length`.

    Item i is (x, y) of ids[start:end] shifted by one; past the chunk's end x holds `pad_id`
    and y holds -100, which the cross-entropy loss ignores. `doc_index[i]` is the chunk's
    document (Hugging Face's `overflow_to_sample_mapping`).
    """

    def __init__(self, ids: np.ndarray, spans: np.ndarray, doc_index: np.ndarray, context_length: int,
                 pad_id: int):
        self.ids, self.spans, self.doc_index = ids, spans, doc_index
        self.context_length, self.pad_id = context_length, pad_id

    def __len__(self) -> int:
        return len(self.spans)

    def __getitem__(self, idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        start, end = self.spans[idx]
        chunk = torch.from_numpy(self.ids[start:end].astype(np.int64))
        x = torch.full((self.context_length,), self.pad_id, dtype=torch.int64)
        y = torch.full((self.context_length,), IGNORE_INDEX, dtype=torch.int64)
        x[:len(chunk) - 1] = chunk[:-1]
        y[:len(chunk) - 1] = chunk[1:]
        return x, y


def chunk_documents(docs_ids: Iterable[Sequence[int]], context_length: int, stride: int = 0,
                    pad_id: int = EOS_ID, keep_short: bool = True) -> DocumentChunkDataset:
    """Split each document into chunks of context_length (+1 target) tokens, with overflow.

    What `tokenizer(texts, truncation=True, max_length=n, return_overflowing_tokens=True,
    stride=k)` does: a document longer than a chunk continues in further chunks, consecutive
    chunks overlapping by `stride` tokens (plus the one the shift by one shares). The last,
    shorter chunk of a document (or a whole short document) is kept, padded, when
    `keep_short` (as the discharge-summary notebook keeps them, its collator padding them);
    with `keep_short=False` only full chunks remain, as the Hugging Face course filters them.
    A document of fewer than 2 tokens has nothing to predict and is skipped.
    """
    if not 0 <= stride < context_length:
        raise ValueError(f"stride must be in [0, context_length={context_length}), got {stride}")
    step = context_length - stride
    docs = [np.asarray(d, dtype=np.int64) for d in docs_ids]
    spans: list[tuple[int, int]] = []
    doc_index: list[int] = []
    offset = 0
    for i, doc in enumerate(docs):
        n = len(doc)
        starts = range(0, n - context_length, step)
        chunks = [(s, s + context_length + 1) for s in starts]
        # Tokens after the last full chunk (or a whole short document) make one shorter chunk.
        covered = starts[-1] + context_length if starts else 0
        if keep_short and n - 1 > covered:
            chunks.append((len(starts) * step, n))
        spans += [(offset + s, offset + e) for s, e in chunks]
        doc_index += [i] * len(chunks)
        offset += n
    ids = np.concatenate(docs) if docs else np.zeros(0, dtype=np.int64)
    return DocumentChunkDataset(ids, np.array(spans, dtype=np.int64).reshape(-1, 2),
                                np.array(doc_index, dtype=np.int64), context_length, pad_id)
