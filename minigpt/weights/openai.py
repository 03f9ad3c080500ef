"""OpenAI's GPT-2 TensorFlow checkpoints.

`download_and_load_gpt2` is the tutorial's function: it returns `(settings, params)`,
the hparams.json and the nested dict of numpy arrays that its `load_weights_into_gpt`
copies into a model. `load_openai` goes straight to a `GPTModel`, one variable at a time,
so the weights are never held twice.

TensorFlow is needed only here, only to read the checkpoint format, and is imported lazily.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from ..config import GPTConfig
from ..errors import CheckpointError, MissingExtra, require
from ..model import GPTModel
from .download import download_gpt2_files
from .layout import check_config, load_gpt2_tensors, nest_params

HPARAMS_FILE = "hparams.json"
CKPT_PREFIX = "model.ckpt"
DATA_FILE = "model.ckpt.data-00000-of-00001"
INDEX_FILE = "model.ckpt.index"


def import_tensorflow() -> Any:
    """`tensorflow`, or a `MissingExtra` naming the extra to install and the way around it."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TF's C++ start-up chatter
    try:
        return require("tensorflow", "openai", "reading OpenAI's TensorFlow checkpoints")
    except MissingExtra as e:
        raise MissingExtra(f"{e}. Or convert the checkpoint once where TensorFlow is installed: "
                           "python -m minigpt.convert --from openai SRC --to minigpt DST") from e.__cause__


def hparams_to_config(settings: dict[str, Any]) -> GPTConfig:
    """GPT-2's architecture from hparams.json: qkv biases, a tied head, dropout off."""
    return GPTConfig(vocab_size=settings["n_vocab"], context_length=settings["n_ctx"],
                     emb_dim=settings["n_embd"], n_heads=settings["n_head"], n_layers=settings["n_layer"],
                     drop_rate=0.0, qkv_bias=True, tie_weights=True)


class OpenAICheckpoint:
    """An OpenAI GPT-2 checkpoint directory, checked when opened, read one variable at a time."""

    def __init__(self, model_dir: str | os.PathLike) -> None:
        self.model_dir = Path(model_dir)
        missing = [f for f in (HPARAMS_FILE, INDEX_FILE, DATA_FILE) if not (self.model_dir / f).is_file()]
        if missing:
            raise CheckpointError(f"{self.model_dir}: not an OpenAI GPT-2 checkpoint directory "
                                  f"(missing {', '.join(missing)})")
        hparams = self.model_dir / HPARAMS_FILE
        try:
            self.settings = json.loads(hparams.read_text(encoding="utf-8"))
            self.config = hparams_to_config(self.settings)
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{hparams}: unreadable hparams ({type(e).__name__}: {e}); expected "
                                  "n_vocab, n_ctx, n_embd, n_head and n_layer") from e

        tf = import_tensorflow()
        self._op_error = tf.errors.OpError
        try:
            self._reader = tf.train.load_checkpoint(str(self.model_dir / CKPT_PREFIX))
        except self._op_error as e:
            raise CheckpointError(f"{self.model_dir / INDEX_FILE}: unreadable ({e.message})") from e
        tf_shapes = self._reader.get_variable_to_shape_map()
        dtypes = self._reader.get_variable_to_dtype_map()
        # The data file is the variables' bytes back to back: a shorter one was cut off.
        needed = sum(math.prod(shape) * dtypes[name].size for name, shape in tf_shapes.items())
        data = self.model_dir / DATA_FILE
        if data.stat().st_size < needed:
            raise CheckpointError(f"{data}: truncated ({data.stat().st_size} bytes, the index needs {needed}); "
                                  "delete it and download it again")
        # GPT-2 name (without "model/") -> (TF name, shape with Conv1D's leading 1 dropped).
        self._variables = {
            name.removeprefix("model/"): (name, _squeezed(name, tuple(shape)))
            for name, shape in sorted(tf_shapes.items())}
        check_config(self.config, self.shapes, str(hparams))

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {key: shape for key, (_, shape) in self._variables.items()}

    def tensors(self) -> Iterator[tuple[str, np.ndarray]]:
        """(GPT-2 name, array) for every variable, read from disk only when asked for."""
        for key, (name, shape) in self._variables.items():
            try:
                array = self._reader.get_tensor(name)
            except self._op_error as e:
                raise CheckpointError(f"{self.model_dir / DATA_FILE}: cannot read {name} ({e.message})") from e
            yield key, array.reshape(shape)


def _squeezed(name: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    # Conv1D weights are stored [1, in, out]; the tutorial squeezes them to [in, out].
    return shape[1:] if name.endswith("/w") and len(shape) == 3 and shape[0] == 1 else shape


def download_and_load_gpt2(model_size: str, models_dir: str | os.PathLike,
                           mirror_url: str | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """Download GPT-2 `model_size` ("124M", "355M", "774M", "1558M") into `models_dir/<size>`
    unless already there, and read it as the tutorial does.

    Returns `(settings, params)`: hparams.json, and
    `{"wte", "wpe", "g", "b", "blocks": [{"attn": {"c_attn": {"w", "b"}, ...}, ...}]}` of numpy
    arrays with OpenAI's names (`g`, `b`: the final LayerNorm), for `load_weights_into_gpt`.
    """
    model_dir = download_gpt2_files(model_size, models_dir, mirror_url)
    ckpt = OpenAICheckpoint(model_dir)
    return ckpt.settings, nest_params(ckpt.tensors(), ckpt.config.n_layers)


def load_openai(model_dir: str | os.PathLike, **config_overrides: Any) -> GPTModel:
    """A float32 `GPTModel` on the CPU holding the checkpoint in `model_dir`.

    The config comes from hparams.json (see `hparams_to_config`); `config_overrides`
    change it, e.g. `drop_rate=0.1` for fine-tuning or `tie_weights=False`.
    """
    ckpt = OpenAICheckpoint(model_dir)
    model = GPTModel(ckpt.config.replace(**config_overrides))
    load_gpt2_tensors(model, ckpt.tensors(), str(ckpt.model_dir))
    return model
