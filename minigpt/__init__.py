"""minigpt: a from-scratch, pure-PyTorch GPT-2."""

from .config import PRESETS, GPTConfig, get_preset
from .device import resolve_device
from .generate import generate_text_simple
from .loss import calc_loss_batch, calc_loss_loader, perplexity
from .model import (GELU, FeedForward, GPTModel, KVCache, LayerNorm, MultiHeadAttention,
                    TransformerBlock)
from .tokenizer import EOS_ID, get_tokenizer, text_to_token_ids, token_ids_to_text

__all__ = [
    "GPTConfig", "PRESETS", "get_preset", "resolve_device",
    "LayerNorm", "GELU", "FeedForward", "MultiHeadAttention", "TransformerBlock", "GPTModel", "KVCache",
    "get_tokenizer", "text_to_token_ids", "token_ids_to_text", "EOS_ID",
    "calc_loss_batch", "calc_loss_loader", "perplexity", "generate_text_simple",
]
