"""Pretrained weights: OpenAI's GPT-2 checkpoints, Hugging Face files, and `from_pretrained`."""

from ..errors import DownloadError
from .download import default_models_dir, download_gpt2_files, openai_model_size
from .hf import load_hf, save_hf
from .layout import assign, load_weights_into_gpt
from .openai import download_and_load_gpt2, load_openai
from .pretrained import detect_format, from_pretrained, load_classifier

__all__ = [
    "DownloadError", "default_models_dir", "download_gpt2_files", "openai_model_size",
    "load_hf", "save_hf", "assign", "load_weights_into_gpt", "download_and_load_gpt2", "load_openai",
    "detect_format", "from_pretrained", "load_classifier",
]
