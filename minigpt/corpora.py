"""Named corpora: found in the data directory, or downloaded there once and checked by sha256."""

from __future__ import annotations

import http.client
import os
from dataclasses import dataclass
from pathlib import Path

from .errors import DataError, DownloadError
from .files import fetch


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


def _download(name: str, corpus: Corpus, url: str, dest: Path) -> None:
    try:
        fetch(url, dest, sha256=corpus.sha256, desc=f"downloading {corpus.filename}", timeout=30)
    except DownloadError as e:  # a wrong sha256, or transfers that all came up short
        raise DataError(f"{name}: {e}. Download {corpus.url} yourself and save it as {dest}") from e
    # URLError/HTTPError/timeouts are OSErrors; a malformed mirror URL is a ValueError.
    except (OSError, ValueError, http.client.HTTPException) as e:
        raise DataError(
            f"{name}: {dest} does not exist and downloading it from {url} failed ({type(e).__name__}: {e}). "
            f"Offline? Download {corpus.url} yourself and save it as {dest}, or point --data-dir / "
            f"MINIGPT_DATA_DIR at a directory that holds {corpus.filename}"
        ) from e
