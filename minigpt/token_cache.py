"""Tokenizing a corpus once: its token ids cached as a uint16 memmap beside the text.

The cache is `<name>.tokens.bin` (raw uint16 ids) plus `<name>.tokens.json` (what it was made
from, and the CRC-32 of the .bin); it is reused while its inputs and settings match and its
bytes are those written, and rebuilt otherwise.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import tiktoken
from tqdm.auto import tqdm

from .corpora import resolve_corpus
from .documents import input_files, iter_segments, with_eos
from .errors import DataError
from .files import CHUNK, atomic_file, check_storage, sha256_file
from .tokenizer import EOS_TOKEN

CACHE_VERSION = 2  # 2: the header records the .bin's CRC-32
# tiktoken encodes about this many characters per (multi-threaded) batch.
_BATCH_CHARS = 1 << 22


def _encode(segments: Iterable[tuple[bool, str]], tokenizer: tiktoken.Encoding) -> Iterator[np.ndarray]:
    """uint16 token ids of the segments joined by `with_eos`, in order, a batch at a time.

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
    for text in with_eos(segments):
        batch.append(text)
        chars += len(text or "")
        if chars >= _BATCH_CHARS:
            yield from flush(batch)
            batch, chars = [], 0
    yield from flush(batch)


def _fingerprints(path: Path, files: list[Path], hashed: bool = True) -> list[dict]:
    """Name (relative to the source), size, mtime and, if `hashed`, sha256 of each input file."""
    base = path if path.is_dir() else path.parent
    prints = []
    for f in files:
        stat = f.stat()
        prints.append({"name": str(f.relative_to(base)), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
                       **({"sha256": sha256_file(f)} if hashed else {})})
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
            if r["mtime_ns"] != c["mtime_ns"] and r["sha256"] != sha256_file(f):
                return False
        if not (bin_path.is_file() and bin_path.stat().st_size == header["count"] * 2):
            return False
    except (KeyError, TypeError):  # a damaged header: rebuild
        return False
    if _crc32(bin_path) != header.get("crc32"):
        print(f"{bin_path}: the token cache is damaged (its CRC-32 is not the one recorded); rebuilding it",
              file=sys.stderr)
        return False
    return True


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
    files = input_files(path)
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
    try:
        count, crc = _write_ids(bin_path, path, text_column, tokenizer)
        with atomic_file(json_path, "w") as f:
            f.write(json.dumps({**header, "count": count, "crc32": crc}, indent=2) + "\n")
    except OSError as e:
        check_storage(e, bin_path, "the token cache was not written")
        raise
    return np.memmap(bin_path, dtype=np.uint16, mode="r", shape=(count,))


def _write_ids(bin_path: Path, path: Path, text_column: str | None, tokenizer: tiktoken.Encoding) -> tuple[int, int]:
    """Tokenize `path` into `bin_path`; the token count and the CRC-32 of the bytes written."""
    count = crc = 0
    with atomic_file(bin_path) as f, tqdm(desc=f"tokenizing {path.name}", unit="tok", unit_scale=True,
                                          disable=None, leave=False) as bar:
        for ids in _encode(iter_segments(path, text_column), tokenizer):
            data = ids.tobytes()
            f.write(data)
            crc = zlib.crc32(data, crc)
            count += len(ids)
            bar.update(len(ids))
    return count, crc
