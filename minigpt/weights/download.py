"""Downloading OpenAI's GPT-2 checkpoints: resumable, verified, never half-written.

A file is fetched into `<name>.part` and renamed to its final name only once its size
matches what the server announced, so a file under its final name is always complete
and is never fetched again. An interrupted download resumes from the `.part` file with an
HTTP Range request (or restarts if the server does not support ranges).
"""

from __future__ import annotations

import http.client
import os
import re
import urllib.error
import urllib.request
from pathlib import Path

from tqdm import tqdm

from ..config import PRESET_ALIASES

OPENAI_BASE_URL = "https://openaipublic.blob.core.windows.net/gpt-2/models"
GPT2_FILES = ("checkpoint", "encoder.json", "hparams.json", "model.ckpt.data-00000-of-00001",
              "model.ckpt.index", "model.ckpt.meta", "vocab.bpe")
MODEL_SIZES = ("124M", "355M", "774M", "1558M")
CHUNK = 1 << 20


class DownloadError(OSError):
    """A file that could not be downloaded completely."""


def openai_model_size(name: str) -> str:
    """OpenAI's size name ("124M", ...) for a size or model name ("gpt2", "gpt2-medium", ...)."""
    if name in MODEL_SIZES:
        return name
    preset = PRESET_ALIASES.get(name, "")  # e.g. "gpt2-small (124M)"
    size = preset[preset.find("(") + 1:-1]
    if size not in MODEL_SIZES:
        names = sorted(a for a in PRESET_ALIASES if not a[0].isdigit())
        raise ValueError(f"unknown GPT-2 model size {name!r}; choose one of {list(MODEL_SIZES)} "
                         f"or the names {names}")
    return size


def default_models_dir() -> Path:
    """Where named GPT-2 checkpoints live: `$MINIGPT_MODELS_DIR` or `~/.cache/minigpt/gpt2`."""
    return Path(os.environ.get("MINIGPT_MODELS_DIR") or Path.home() / ".cache" / "minigpt" / "gpt2")


def download_file(url: str, dest: str | os.PathLike, attempts: int = 3, timeout: float = 60.0) -> None:
    """Download `url` to `dest` via `dest.part`, resuming after interruptions.

    Raises `urllib.error.URLError` when the server cannot be reached or answers with an
    HTTP error, and `DownloadError` when `attempts` transfers all came up short.
    """
    dest = Path(dest)
    part = dest.with_name(dest.name + ".part")
    problem = ""
    for _ in range(attempts):
        start = part.stat().st_size if part.exists() else 0
        request = urllib.request.Request(url, headers={"Range": f"bytes={start}-"} if start else {})
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                total, mode = _expected_size(response, start, url)
                if mode == "wb":
                    start = 0
                with open(part, mode) as f, tqdm(total=total, initial=start, unit="B", unit_scale=True,
                                                 unit_divisor=1024, desc=dest.name) as bar:
                    while chunk := response.read(CHUNK):
                        f.write(chunk)
                        bar.update(len(chunk))
        except urllib.error.HTTPError as e:
            if e.code == 416 and start:  # our .part is not a prefix of the file: start over
                part.unlink()
                problem = f"{part.name} did not match the file on the server"
                continue
            raise
        except (http.client.HTTPException, ConnectionError, TimeoutError) as e:
            # Interrupted mid-transfer: what arrived stays in .part and the next attempt resumes.
            problem = f"transfer interrupted ({type(e).__name__}: {e})"
            continue
        size = part.stat().st_size
        if total is None or size == total:
            os.replace(part, dest)
            return
        problem = f"received {size} bytes, the server announced {total}"
        if size > total:
            part.unlink()
    resume = f"; run again to resume from {part}" if part.exists() else ""
    raise DownloadError(f"{url}: {problem} (after {attempts} attempts){resume}")


def _expected_size(response: http.client.HTTPResponse, start: int, url: str) -> tuple[int | None, str]:
    """The file's full size (None if unknown) and whether to append to (ab) or rewrite (wb) `.part`."""
    if start and response.status == 206:
        header = response.headers.get("Content-Range", "")
        m = re.fullmatch(r"bytes (\d+)-\d+/(\d+|\*)", header)
        if m is None or int(m[1]) != start:
            raise DownloadError(f"{url}: asked for bytes {start}- and got Content-Range {header!r}")
        return (None if m[2] == "*" else int(m[2])), "ab"
    length = response.headers.get("Content-Length")
    return (int(length) if length is not None else None), "wb"


def download_gpt2_files(model_size: str, models_dir: str | os.PathLike, mirror_url: str | None = None,
                        base_url: str = OPENAI_BASE_URL) -> Path:
    """Make sure `models_dir/<size>` holds OpenAI's seven GPT-2 files; return that directory.

    Files already there are not fetched again. Each missing one comes from
    `base_url/<size>/<file>` and, if that fails, from `mirror_url/<size>/<file>`
    (`mirror_url` defaults to `$MINIGPT_GPT2_MIRROR`).
    """
    size = openai_model_size(model_size)
    mirror_url = mirror_url or os.environ.get("MINIGPT_GPT2_MIRROR")
    model_dir = Path(models_dir).expanduser() / size
    model_dir.mkdir(parents=True, exist_ok=True)
    failures = []
    for name in GPT2_FILES:
        if (model_dir / name).is_file():
            continue
        urls = [f"{base.rstrip('/')}/{size}/{name}" for base in (base_url, mirror_url) if base]
        errors = []
        for url in urls:
            try:
                download_file(url, model_dir / name)
                break
            except urllib.error.HTTPError as e:
                errors.append(f"{url} (HTTP {e.code} {e.reason})")
            except urllib.error.URLError as e:  # unreachable: offline, DNS, refused
                errors.append(f"{url} ({e.reason})")
            except DownloadError as e:
                errors.append(str(e))
            except OSError as e:  # e.g. the disk is full
                errors.append(f"{url} ({e})")
        else:
            failures.append(f"  {name}: " + "; ".join(errors))
    if failures:
        raise DownloadError(
            f"could not download {len(failures)} of GPT-2 {size}'s files into {model_dir}:\n"
            + "\n".join(failures)
            + f"\nPass a directory that already holds them instead (the {size} directory itself, "
            f"or a models dir containing {size}/), or give a mirror URL.")
    return model_dir
