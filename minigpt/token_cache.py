"""Tokenizing a corpus once: its token ids cached as a uint16 memmap beside the text.

The cache is `<name>.tokens.bin` (raw uint16 ids), `<name>.tokens.json` (what it was made
from, counts, CRC-32s) and, for several documents, `<name>.tokens.docs` (int64 offsets of each
document's first token); it is reused while its inputs and settings match and its bytes are
those written, and rebuilt otherwise. It is built in shards on every core (`token_shards`),
in `<name>.tokens.parts/`, which an interrupted build leaves for the next run to continue.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import tiktoken
from tqdm.auto import tqdm

from . import token_shards
from .corpora import resolve_corpus
from .documents import check_source, input_files, template_fields
from .errors import DataError
from .files import CHUNK, atomic_file, check_storage, sha256_file
from .sources import hf_fingerprint, is_dataset, is_hf_source, load_hf_dataset, record_columns

CACHE_VERSION = 3  # 2: the header records the .bin's CRC-32; 3: document offsets, template, separator
SEPARATORS = ("eos", "none")
# Text is tokenized in shards of about this many bytes (the unit of work and of resuming) ...
_SHARD_BYTES = 1 << 24
# ... and encoded about this many characters per tokenizer call.
_BATCH_CHARS = 1 << 22


@dataclass(frozen=True)
class TokenCorpus:
    """A tokenized corpus: its ids (a read-only uint16 memmap) and the offset in `ids` of each
    document's first token (int64, ascending from 0; one entry per document)."""

    ids: np.ndarray
    doc_starts: np.ndarray


@dataclass
class _Source:
    """What a cache is built from: files under `path`, or a Hugging Face dataset."""

    name: str
    path: Path | None = None
    files: list[Path] = field(default_factory=list)
    dataset: Any = None
    columns: list[str] = field(default_factory=list)

    def fingerprints(self, hashed: bool = True) -> list[dict]:
        """Name (relative to the source), size, mtime and, if `hashed`, sha256 of each input file;
        for a dataset, its own fingerprint."""
        if self.dataset is not None:
            return [hf_fingerprint(self.dataset)]
        base = self.path if self.path.is_dir() else self.path.parent
        prints = []
        for f in self.files:
            stat = f.stat()
            prints.append({"name": f.relative_to(base).as_posix(), "size": stat.st_size,
                           "mtime_ns": stat.st_mtime_ns, **({"sha256": sha256_file(f)} if hashed else {})})
        return prints

    def size(self) -> int:
        if self.dataset is not None:
            return int(self.dataset.data.nbytes)
        return sum(f.stat().st_size for f in self.files)


def _open_source(source: str | os.PathLike, text_column: str | None, template: str | None,
                 data_dir: str | os.PathLike | None) -> _Source:
    if is_dataset(source) or is_hf_source(source):
        dataset = source if is_dataset(source) else load_hf_dataset(source)
        name = f"dataset-{getattr(dataset, '_fingerprint', len(dataset))}" if dataset is source else str(source)
        columns = record_columns(name, list(dataset.column_names), text_column, template)
        return _Source(name, dataset=dataset, columns=columns)
    path = resolve_corpus(source, data_dir)
    check_source(path, text_column)
    return _Source(path.name, path, input_files(path))


def _inputs_current(header: dict, source: _Source) -> bool:
    """Whether the recorded inputs are these. Names, sizes and mtimes are compared first; a file
    whose mtime alone changed (touched, copied) is hashed, and still counts as unchanged if its
    sha256 is the recorded one."""
    recorded = header["inputs"]
    if source.dataset is not None:
        return recorded == source.fingerprints()
    current = source.fingerprints(hashed=False)
    if [(r["name"], r["size"]) for r in recorded] != [(c["name"], c["size"]) for c in current]:
        return False
    return all(r["mtime_ns"] == c["mtime_ns"] or r["sha256"] == sha256_file(f)
               for r, c, f in zip(recorded, current, source.files, strict=True))


def _is_current(header: dict, params: dict, source: _Source, bin_path: Path) -> bool:
    """Whether a cache header describes these inputs and settings, and its files are whole."""
    if {k: header.get(k) for k in params} != params:
        return False
    docs_path = _docs_path(bin_path)
    try:
        if not _inputs_current(header, source):
            return False
        if not (bin_path.is_file() and bin_path.stat().st_size == header["count"] * 2):
            return False
        if header["n_docs"] > 1 and not (docs_path.is_file() and docs_path.stat().st_size == header["n_docs"] * 8):
            return False
    except (KeyError, TypeError):  # a damaged header: rebuild
        return False
    for file, key in ((bin_path, "crc32"), (docs_path, "docs_crc32")):
        if key in header and _crc32(file) != header[key]:
            print(f"{file}: the token cache is damaged (its CRC-32 is not the one recorded); rebuilding it",
                  file=sys.stderr)
            return False
    return True


def _docs_path(bin_path: Path) -> Path:
    return bin_path.with_suffix(".docs")


def _crc32(path: Path) -> int:
    crc = 0
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            crc = zlib.crc32(block, crc)
    return crc


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
    """Where token caches go when the source's directory is read-only, and those of Hugging Face
    datasets: `$XDG_CACHE_HOME/minigpt` (default `~/.cache/minigpt`)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "minigpt"


def _cache_files(source: _Source, cache_dir: str | os.PathLike | None) -> list[tuple[Path, Path]]:
    """Candidate (.bin, .json) cache files, in order of preference."""
    if source.path is None:  # a dataset: named after it, in the user's cache
        key, name = source.name, re.sub(r"[^\w.-]+", "_", source.name)
    else:
        path = source.path.resolve()  # "." and "books/" name their directory too
        key, name = str(path), path.name
    # In a shared cache directory, a hash of the absolute path keeps same-named sources apart.
    keyed = f"{hashlib.sha256(key.encode()).hexdigest()[:12]}-{name}.tokens"
    if cache_dir is not None:
        stems = [Path(cache_dir) / keyed]
    elif source.path is None:
        stems = [user_cache_dir() / keyed]
    else:
        stems = [source.path.resolve().parent / f"{name}.tokens", user_cache_dir() / keyed]
    return [(stem.with_name(f"{stem.name}.bin"), stem.with_name(f"{stem.name}.json")) for stem in stems]


def default_workers() -> int:
    """Processes that tokenize a large corpus: one per CPU this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def load_tokens(source: str | os.PathLike | Any, tokenizer: tiktoken.Encoding, *, text_column: str | None = None,
                template: str | None = None, separator: str = "eos", data_dir: str | os.PathLike | None = None,
                cache_dir: str | os.PathLike | None = None, progress: bool = True,
                workers: int | None = None) -> TokenCorpus:
    """The token ids of a corpus and where its documents start, tokenized once.

    `source`: a named corpus, a file or directory (see `iter_documents`), `hf:NAME[:CONFIG]`
    (a Hugging Face dataset's train split), a directory written by `save_to_disk`, or a
    `datasets.Dataset` (cached by its fingerprint).
    `separator` "eos" puts an end-of-text token (50256) after each document when there are
    several and none after a single text, so a .txt file gives exactly `tokenizer.encode(text)`;
    "none" puts nothing between documents. `template` (e.g. "JOKE: {text}") formats each record
    from its fields by name (a .txt file's one field is {text}).
    The cache (see the module) goes beside the source (for a directory: beside it), or, if
    that directory is read-only, and for datasets, in `user_cache_dir()`; `cache_dir` forces a
    location. A corpus larger than a shard is tokenized by `workers` processes (default: one
    per CPU), bit for bit as one process would; memory stays bounded whatever its size.
    """
    if tokenizer.n_vocab > np.iinfo(np.uint16).max + 1:
        raise DataError(f"the token cache stores uint16 ids; tokenizer {tokenizer.name!r} has "
                        f"{tokenizer.n_vocab} tokens")
    if separator not in SEPARATORS:
        raise DataError(f"unknown document separator {separator!r}; use one of {', '.join(SEPARATORS)}")
    if template is not None:
        template_fields(template)
    src = _open_source(source, text_column, template, data_dir)
    params = {"version": CACHE_VERSION, "tokenizer": tokenizer.name, "n_vocab": tokenizer.n_vocab,
              "text_column": text_column, "template": template, "separator": separator}
    candidates = _cache_files(src, cache_dir)
    for bin_path, json_path in candidates:
        header = _read_header(json_path)
        if header and _is_current(header, params, src, bin_path):
            return _open(bin_path, header["count"], header["n_docs"])

    writable = next((c for c in candidates if _writable(c[0].parent)), None)
    if writable is None:
        raise DataError(f"nowhere to write the token cache of {src.name}: "
                        f"{', '.join(str(b.parent) for b, _ in candidates)} not writable")
    bin_path, json_path = writable
    # Fingerprint before reading: a file edited meanwhile then fails the check next time.
    header = {**params, "source": str(src.path.resolve()) if src.path else src.name, "inputs": src.fingerprints()}
    json_path.unlink(missing_ok=True)  # an old header must never describe the new .bin
    try:
        counts = _write_ids(bin_path, src, header, tokenizer, progress, workers)
        with atomic_file(json_path, "w") as f:
            f.write(json.dumps({**header, **counts}, indent=2) + "\n")
    except OSError as e:
        check_storage(e, bin_path, "the token cache was not written")
        raise
    return _open(bin_path, counts["count"], counts["n_docs"])


def load_token_ids(source: str | os.PathLike, tokenizer: tiktoken.Encoding, text_column: str | None = None,
                   data_dir: str | os.PathLike | None = None, cache_dir: str | os.PathLike | None = None,
                   **options) -> np.memmap:
    """All token ids of a corpus name or path, as a read-only uint16 memmap: `load_tokens(...).ids`
    (the keyword `options` are those of `load_tokens`)."""
    return load_tokens(source, tokenizer, text_column=text_column, data_dir=data_dir, cache_dir=cache_dir,
                       **options).ids


def _open(bin_path: Path, count: int, n_docs: int) -> TokenCorpus:
    ids = np.memmap(bin_path, dtype=np.uint16, mode="r", shape=(count,))
    if n_docs > 1:
        return TokenCorpus(ids, np.memmap(_docs_path(bin_path), dtype=np.int64, mode="r", shape=(n_docs,)))
    return TokenCorpus(ids, np.zeros(n_docs, dtype=np.int64))


def _encode(tasks, settings, tokenizer, parts, workers, progress) -> list[dict]:
    """Tokenize the shards not yet in `parts` (see `token_shards.tokenize`)."""
    return token_shards.tokenize(tasks, settings, tokenizer, parts, workers, progress)


def _parts_dir(bin_path: Path, plan: dict) -> Path:
    """The directory of a build's shards: kept from an interrupted build of the same plan, else new."""
    parts = bin_path.with_suffix(".parts")
    if _read_header(parts / "plan.json") != plan:
        shutil.rmtree(parts, ignore_errors=True)
        parts.mkdir(parents=True)
        with atomic_file(parts / "plan.json", "w") as f:
            f.write(json.dumps(plan))
    return parts


def _write_ids(bin_path: Path, src: _Source, header: dict, tokenizer: tiktoken.Encoding, progress: bool,
               workers: int | None) -> dict:
    """Tokenize `src` into `bin_path` (and its document offsets beside it); the header's counts and CRC-32s."""
    settings = token_shards.Settings(header["separator"], header["text_column"], header["template"], _BATCH_CHARS)
    parts = _parts_dir(bin_path, {**header, "shard_bytes": _SHARD_BYTES})
    size = src.size()
    if workers is None:
        workers = default_workers() if size > 2 * _SHARD_BYTES else 1
    if src.dataset is not None:
        tasks = token_shards.plan_dataset(src.dataset, src.columns, src.name, _SHARD_BYTES)
    else:
        tasks = token_shards.plan_files(src.files, settings, _SHARD_BYTES)
    compressed = src.dataset is None and any(f.suffix.lower() in (".gz", ".zst") for f in src.files)
    bar = tqdm(desc=f"tokenizing {src.name}", total=None if compressed else size, unit="B", unit_scale=True,
               disable=None if progress else True, leave=False)
    tokens = 0

    def advance(marker: dict) -> None:
        nonlocal tokens
        tokens += marker["count"]
        bar.update(marker["size"])
        bar.set_postfix_str(f"{tokens / 1e6:.1f}M tokens", refresh=False)

    try:
        with bar:
            markers = _encode(tasks, settings, tokenizer, parts, workers, advance)
        if not any(m["found"] for m in markers):
            raise DataError(f"{src.path or src.name}: contains no text"
                            + (" (only whitespace)" if any(m["blank"] for m in markers) else ""))
        n_docs = sum(m["n_docs"] for m in markers)
        drop_last = header["separator"] == "eos" and n_docs == 1  # a single text gets no end-of-text token
        counts = token_shards.concatenate(markers, parts, bin_path, _docs_path(bin_path), drop_last)
    except DataError:
        shutil.rmtree(parts, ignore_errors=True)  # fixing the data changes the plan anyway
        raise
    except KeyboardInterrupt:
        print(f"\ninterrupted: the finished shards are kept in {parts}; run again to continue", file=sys.stderr)
        raise
    shutil.rmtree(parts, ignore_errors=True)
    if counts["n_docs"] <= 1:  # a single document needs no offsets file
        _docs_path(bin_path).unlink()
        del counts["docs_crc32"]
    return counts
