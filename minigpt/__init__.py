"""minigpt: a from-scratch, pure-PyTorch GPT-2."""

from importlib import import_module
from typing import Any

from .checkpoint import CheckpointError, load_model, save_model
from .config import PRESETS, GPTConfig, get_preset
from .data import (NAMED_CORPORA, DataError, DocumentChunkDataset, GPTDatasetV1, TokenWindowDataset,
                   chunk_documents, create_dataloader_v1, iter_documents, load_token_ids, pack_documents,
                   resolve_corpus, split_documents, split_tokens)
from .device import resolve_device
from .loss import calc_loss_batch, calc_loss_loader, perplexity
from .model import GELU, FeedForward, GPTModel, KVCache, LayerNorm, MultiHeadAttention, TransformerBlock
from .plot import plot_attention, plot_attention_grid, plot_losses
from .tokenizer import EOS_ID, get_tokenizer, text_to_token_ids, token_ids_to_text
from .weights import DownloadError, assign, download_and_load_gpt2, from_pretrained, load_weights_into_gpt, save_hf

# Names from the modules that are also commands (`python -m minigpt.train`, ...) are imported on
# first use: importing them here would load each command's module twice when it runs as __main__.
_FROM_COMMANDS = {
    "train": ("train_model_simple", "evaluate_model", "generate_and_print_sample", "Trainer", "TrainConfig"),
    "generate": ("generate_text_simple", "generate", "generate_tokens", "stream", "softmax_with_temperature",
                 "print_sampled_tokens", "generate_next_greedy_token", "generate_greedy_text"),
    "classify": ("GPTClassifier", "load_classifier"),
    "inspect": ("nearest_neighbors", "hidden_states", "attention_maps"),
}
_LAZY = {name: module for module, names in _FROM_COMMANDS.items() for name in names}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'minigpt' has no attribute {name!r}")


__all__ = [
    # model
    "GPTConfig", "PRESETS", "get_preset", "LayerNorm", "GELU", "FeedForward", "MultiHeadAttention",
    "TransformerBlock", "GPTModel", "KVCache", "resolve_device",
    # text
    "get_tokenizer", "text_to_token_ids", "token_ids_to_text", "EOS_ID",
    # data
    "DataError", "NAMED_CORPORA", "resolve_corpus", "iter_documents", "load_token_ids", "split_tokens",
    "TokenWindowDataset", "GPTDatasetV1", "create_dataloader_v1", "pack_documents", "chunk_documents",
    "split_documents", "DocumentChunkDataset",
    # training and losses
    "calc_loss_batch", "calc_loss_loader", "perplexity", "plot_losses",
    # weights and checkpoints
    "save_model", "load_model", "CheckpointError", "from_pretrained", "download_and_load_gpt2",
    "load_weights_into_gpt", "assign", "save_hf", "DownloadError",
    # inspection
    "plot_attention", "plot_attention_grid",
    *_LAZY,
]
