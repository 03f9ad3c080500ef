"""Downloading OpenAI's GPT-2 checkpoints: resumable, verified, never half-written.

Each file goes through `minigpt.files.download`: fetched into `<name>.part`, resumed with an
HTTP Range request after an interruption, and renamed to its final name only once its size
matches what the server announced (OpenAI publishes no checksums), so a file under its final
name is always complete and is never fetched again.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..config import PRESET_ALIASES
from ..errors import DownloadError
from ..files import download

OPENAI_BASE_URL = "https://openaipublic.blob.core.windows.net/gpt-2/models"
GPT2_FILES = ("checkpoint", "encoder.json", "hparams.json", "model.ckpt.data-00000-of-00001",
              "model.ckpt.index", "model.ckpt.meta", "vocab.bpe")
MODEL_SIZES = ("124M", "355M", "774M", "1558M")

__all__ = ["OPENAI_BASE_URL", "GPT2_FILES", "MODEL_SIZES", "DownloadError", "openai_model_size",
           "default_models_dir", "download_gpt2_files"]


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
        try:
            download(urls[0], model_dir / name, mirrors=urls[1:], advice="")
        except DownloadError as e:
            failures.append(f"  {name}: {e}")
    if failures:
        raise DownloadError(
            f"could not download {len(failures)} of GPT-2 {size}'s files into {model_dir}:\n"
            + "\n".join(failures)
            + f"\nPass a directory that already holds them instead (the {size} directory itself, "
            f"or a models dir containing {size}/), or give a mirror URL.")
    return model_dir
