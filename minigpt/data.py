"""Text in, training windows out: corpora, a token cache, splits and datasets.

The path of the data, step by step:

    resolve_corpus("the-verdict")        a named corpus (found or downloaded) or a path   (corpora)
    iter_documents(path)                 .txt file | directory of .txt | .csv column | .jsonl field  (documents)
    load_token_ids(source, tokenizer)    tokenized once, cached as a uint16 memmap beside the text  (token_cache)
    split_tokens(ids, 0.1, context)      train = the first 90%, validation = the last 10%
    TokenWindowDataset(train_ids, ...)   (x, y) sliding windows, read straight from the memmap

plus the tutorial's `GPTDatasetV1` / `create_dataloader_v1`, and `pack_documents` /
`chunk_documents` for corpora of many documents. This module holds the splits and datasets and
re-exports the rest. Every problem with the data raises a `DataError` (a `ValueError`) whose
message names the file and what to do about it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import tiktoken
import torch
from torch.utils.data import DataLoader, Dataset

from .corpora import NAMED_CORPORA, Corpus, default_data_dir, resolve_corpus
from .documents import find_column, iter_documents, iter_jsonl_records, with_eos
from .errors import DataError
from .token_cache import CACHE_VERSION, load_token_ids, user_cache_dir
from .tokenizer import EOS_ID, EOS_TOKEN, get_tokenizer

__all__ = [
    "IGNORE_INDEX", "DataError", "Corpus", "NAMED_CORPORA", "default_data_dir", "resolve_corpus",
    "find_column", "iter_documents", "iter_jsonl_records", "CACHE_VERSION", "load_token_ids", "user_cache_dir",
    "split_tokens", "TokenWindowDataset", "GPTDatasetV1", "create_dataloader_v1", "pack_documents",
    "split_documents", "DocumentChunkDataset", "chunk_documents", "stack_examples",
]

# F.cross_entropy skips targets equal to its default ignore_index, -100: used for padding.
IGNORE_INDEX = -100


# ---------------------------------------------------------------------------------------------
# Train/validation split


def stack_examples(dataset: Dataset, indices: Sequence[int]) -> tuple[torch.Tensor, ...]:
    """A batch: the dataset's examples (tuples of tensors) at `indices`, stacked field by field."""
    return tuple(torch.stack(field) for field in zip(*(dataset[int(i)] for i in indices), strict=True))


def split_tokens(ids: np.ndarray, val_ratio: float, context_length: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, validation): the first and the last `val_ratio` of `ids`, as views.

    The cut is the tutorial's `int(train_ratio * len)`. Either part must hold at least one
    window, context_length + 1 tokens (inputs plus the shifted targets): the tutorial's
    sanity check, made an error.
    """
    if not 0.0 < val_ratio < 1.0:
        raise DataError(f"the validation ratio must be between 0 and 1, got {val_ratio}")
    n = len(ids)
    need = context_length + 1
    if n < 2 * need:
        raise DataError(f"the corpus has {n} tokens, fewer than the 2 x {need} (context_length + 1) "
                        "that one training and one validation window need; use a smaller context "
                        "length or more text")
    # round() drops float noise such as (1 - 0.9) * 600 = 59.99999999999999
    n_train = int(round((1.0 - val_ratio) * n, 6))
    for part, size, fix in (("training", n_train, "smaller"), ("validation", n - n_train, "larger")):
        if size < need:
            raise DataError(f"the {part} split has {size} of the corpus's {n} tokens (validation ratio "
                            f"{val_ratio}), fewer than the {need} (context_length + 1) one window needs; "
                            f"use a smaller context length or a {fix} validation ratio")
    return ids[:n_train], ids[n_train:]


# ---------------------------------------------------------------------------------------------
# Datasets


class TokenWindowDataset(Dataset):
    """Sliding windows over a 1-D array of token ids (a memmap is read lazily, never loaded).

    Item i is (ids[s : s+max_length], ids[s+1 : s+max_length+1]) with s = i * stride, for
    s in range(0, len(ids) - max_length, stride): the tutorial's windows, as int64 tensors.
    """

    def __init__(self, ids: np.ndarray | Sequence[int], max_length: int, stride: int):
        if max_length < 1 or stride < 1:
            raise ValueError(f"max_length and stride must be positive, got {max_length} and {stride}")
        self.ids = ids if isinstance(ids, np.ndarray) else np.asarray(ids, dtype=np.int64)
        self.max_length = max_length
        self.stride = stride
        self.starts = range(0, len(self.ids) - max_length, stride)

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        start = self.starts[idx]
        x = self.ids[start:start + self.max_length].astype(np.int64)
        y = self.ids[start + 1:start + self.max_length + 1].astype(np.int64)
        return torch.from_numpy(x), torch.from_numpy(y)


class GPTDatasetV1(TokenWindowDataset):
    """The tutorial's dataset: `txt` tokenized, then sliding windows of `max_length` every `stride`.

    Unlike the first edition, "<|endoftext|>" in `txt` is allowed (as the token 50256, as later
    editions do); any other text gives the same ids as `tokenizer.encode(txt)`.
    """

    def __init__(self, txt: str, tokenizer: tiktoken.Encoding, max_length: int, stride: int):
        self.tokenizer = tokenizer
        token_ids = tokenizer.encode(txt, allowed_special={EOS_TOKEN})
        super().__init__(np.array(token_ids, dtype=np.int64), max_length, stride)


def create_dataloader_v1(txt: str, batch_size: int = 4, max_length: int = 256, stride: int = 128,
                         shuffle: bool = True, drop_last: bool = True, num_workers: int = 0) -> DataLoader:
    """The tutorial's loader: GPT-2 tokens of `txt` in `GPTDatasetV1` windows.

    Shuffling draws from torch's global RNG, so after `torch.manual_seed(123)` the batches are
    the tutorial's, in the tutorial's order.
    """
    dataset = GPTDatasetV1(txt, get_tokenizer(), max_length, stride)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, drop_last=drop_last,
                      num_workers=num_workers)


def pack_documents(docs_ids: Iterable[Sequence[int]], context_length: int,
                   eos_id: int = EOS_ID) -> TokenWindowDataset:
    """Concatenate documents with `eos_id` after each (none for a lone document) and cut the
    stream into full windows; the remainder is dropped.

    This is `group_texts` of the Hugging Face recipes, with one difference: a window holds
    context_length inputs and the context_length targets shifted by one, and consecutive windows
    share their boundary token, so every token is a target once (a block of n tokens that the
    model shifts itself trains only n - 1 predictions).
    """
    parts = [np.array([eos_id] if d is None else d, dtype=np.int64)
             for d in with_eos((True, d) for d in docs_ids if len(d))]
    ids = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
    return TokenWindowDataset(ids, context_length, context_length)


def split_documents(ids: np.ndarray, eos_id: int = EOS_ID) -> list[np.ndarray]:
    """Views of a joined token stream (as `load_token_ids` writes it), one per document, each
    ending with its `eos_id` (a text without one is a single document)."""
    return [d for d in np.split(ids, np.flatnonzero(ids == eos_id) + 1) if len(d)]


class DocumentChunkDataset(Dataset):
    """Chunks that never cross a document boundary, padded to `context_length`.

    Item i is (x, y) of ids[start:end] shifted by one; past the chunk's end x holds `pad_id`
    and y holds -100, which the cross-entropy loss ignores. `doc_index[i]` is the chunk's
    document (Hugging Face's `overflow_to_sample_mapping`).
    """

    def __init__(self, ids: np.ndarray, spans: np.ndarray, doc_index: np.ndarray, context_length: int,
                 pad_id: int):
        self.ids, self.spans, self.doc_index = ids, spans, doc_index
        self.context_length, self.pad_id = context_length, pad_id

    def __len__(self) -> int:
        return len(self.spans)

    def __getitem__(self, idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        start, end = self.spans[idx]
        chunk = torch.from_numpy(self.ids[start:end].astype(np.int64))
        x = torch.full((self.context_length,), self.pad_id, dtype=torch.int64)
        y = torch.full((self.context_length,), IGNORE_INDEX, dtype=torch.int64)
        x[:len(chunk) - 1] = chunk[:-1]
        y[:len(chunk) - 1] = chunk[1:]
        return x, y


def chunk_documents(docs_ids: Iterable[Sequence[int]], context_length: int, stride: int = 0,
                    pad_id: int = EOS_ID, keep_short: bool = True) -> DocumentChunkDataset:
    """Split each document into chunks of context_length (+1 target) tokens, with overflow.

    What `tokenizer(texts, truncation=True, max_length=n, return_overflowing_tokens=True,
    stride=k)` does: a document longer than a chunk continues in further chunks, consecutive
    chunks overlapping by `stride` tokens (plus the one the shift by one shares). The last,
    shorter chunk of a document (or a whole short document) is kept, padded, when
    `keep_short` (as the discharge-summary notebook keeps them, its collator padding them);
    with `keep_short=False` only full chunks remain, as the Hugging Face course filters them.
    A document of fewer than 2 tokens has nothing to predict and is skipped.
    """
    if not 0 <= stride < context_length:
        raise ValueError(f"stride must be in [0, context_length={context_length}), got {stride}")
    step = context_length - stride
    docs = [np.asarray(d, dtype=np.int64) for d in docs_ids]
    spans: list[tuple[int, int]] = []
    doc_index: list[int] = []
    offset = 0
    for i, doc in enumerate(docs):
        n = len(doc)
        starts = range(0, n - context_length, step)
        chunks = [(s, s + context_length + 1) for s in starts]
        # Tokens after the last full chunk (or a whole short document) make one shorter chunk.
        covered = starts[-1] + context_length if starts else 0
        if keep_short and n - 1 > covered:
            chunks.append((len(starts) * step, n))
        spans += [(offset + s, offset + e) for s, e in chunks]
        doc_index += [i] * len(chunks)
        offset += n
    ids = np.concatenate(docs) if docs else np.zeros(0, dtype=np.int64)
    return DocumentChunkDataset(ids, np.array(spans, dtype=np.int64).reshape(-1, 2),
                                np.array(doc_index, dtype=np.int64), context_length, pad_id)
