"""minigpt: a from-scratch, pure-PyTorch GPT-2."""

from .checkpoint import CheckpointError, load_model, save_model
from .classify import GPTClassifier, load_classifier
from .config import PRESETS, GPTConfig, get_preset
from .data import (NAMED_CORPORA, DataError, DocumentChunkDataset, GPTDatasetV1, TokenWindowDataset,
                   chunk_documents, create_dataloader_v1, iter_documents, load_token_ids, pack_documents,
                   resolve_corpus, split_documents, split_tokens)
from .device import resolve_device
from .generate import generate_text_simple
from .inspect import attention_maps, hidden_states, nearest_neighbors
from .loss import calc_loss_batch, calc_loss_loader, perplexity
from .model import GELU, FeedForward, GPTModel, KVCache, LayerNorm, MultiHeadAttention, TransformerBlock
from .plot import plot_attention, plot_attention_grid, plot_losses
from .tokenizer import EOS_ID, get_tokenizer, text_to_token_ids, token_ids_to_text
from .train import Trainer, TrainConfig, evaluate_model, generate_and_print_sample, train_model_simple
from .weights import DownloadError, download_and_load_gpt2, from_pretrained, load_weights_into_gpt, save_hf

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
    # training
    "calc_loss_batch", "calc_loss_loader", "perplexity", "train_model_simple", "evaluate_model",
    "generate_and_print_sample", "plot_losses", "Trainer", "TrainConfig",
    # generation
    "generate_text_simple",
    # weights and checkpoints
    "save_model", "load_model", "CheckpointError", "from_pretrained", "download_and_load_gpt2",
    "load_weights_into_gpt", "save_hf", "DownloadError",
    # classification
    "GPTClassifier", "load_classifier",
    # inspection
    "nearest_neighbors", "hidden_states", "attention_maps", "plot_attention", "plot_attention_grid",
]
