"""The GPT-2 byte-pair encoding, through tiktoken."""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

import tiktoken
import torch

from .errors import DownloadError

EOS_TOKEN = "<|endoftext|>"
EOS_ID = 50256


def get_tokenizer(bpe_dir: str | os.PathLike | None = None) -> tiktoken.Encoding:
    """GPT-2's tokenizer.

    Without `bpe_dir`, tiktoken's own "gpt2" encoding (downloaded once into its cache,
    `TIKTOKEN_CACHE_DIR`). With `bpe_dir`, a directory holding GPT-2's `encoder.json` and
    `vocab.bpe` (as OpenAI's checkpoints ship them), built offline into the same encoding.
    """
    if bpe_dir is not None:
        return _encoding_from_files(str(Path(bpe_dir).resolve()))
    try:
        return tiktoken.get_encoding("gpt2")
    except Exception as e:  # network errors come in many types (requests, OSError, ...)
        raise DownloadError(
            "could not load tiktoken's 'gpt2' encoding: it downloads its files on first use "
            f"({type(e).__name__}: {e}). Offline, point TIKTOKEN_CACHE_DIR at a directory that "
            "already holds tiktoken's cached files, or pass a directory with GPT-2's "
            "encoder.json and vocab.bpe as bpe_dir."
        ) from e


@lru_cache(maxsize=4)
def _encoding_from_files(bpe_dir: str) -> tiktoken.Encoding:
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks
    from tiktoken_ext.openai_public import r50k_pat_str

    vocab, encoder = Path(bpe_dir, "vocab.bpe"), Path(bpe_dir, "encoder.json")
    missing = [str(p) for p in (vocab, encoder) if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"GPT-2 BPE file(s) not found: {', '.join(missing)}")
    ranks = data_gym_to_mergeable_bpe_ranks(vocab_bpe_file=str(vocab), encoder_json_file=str(encoder))
    return tiktoken.Encoding(name="gpt2", pat_str=r50k_pat_str, mergeable_ranks=ranks,
                             special_tokens={EOS_TOKEN: EOS_ID}, explicit_n_vocab=50257)


def text_to_token_ids(text: str, tokenizer: tiktoken.Encoding) -> torch.Tensor:
    """Encode `text` (allowing `<|endoftext|>`) as a (1, tokens) tensor."""
    encoded = tokenizer.encode(text, allowed_special={EOS_TOKEN})
    return torch.tensor(encoded).unsqueeze(0)


def token_ids_to_text(token_ids: torch.Tensor, tokenizer: tiktoken.Encoding) -> str:
    """Decode a (1, tokens) or (tokens,) tensor back to text."""
    return tokenizer.decode(token_ids.squeeze(0).tolist())
