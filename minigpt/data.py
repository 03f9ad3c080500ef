"""Text in, training windows out: corpora, a token cache, splits and datasets.

The path of the data, step by step:

    resolve_corpus("the-verdict")        a named corpus (found or downloaded) or a path   (corpora)
    iter_documents(path)                 .txt file | directory of .txt | .csv column | .jsonl field  (documents)
    load_token_ids(source, tokenizer)    tokenized once, cached as a uint16 memmap beside the text  (token_cache)
    split_tokens(ids, 0.1, context)      train = the first 90%, validation = the last 10%
    TokenWindowDataset(train_ids, ...)   (x, y) sliding windows, read straight from the memmap

plus the tutorial's `GPTDatasetV1` / `create_dataloader_v1`, and for corpora of many documents
(a stream plus each document's first offset, `doc_starts`): `split_corpus` (a tail or a seeded
random split of whole documents) and `window_dataset` in one of the `CHUNKINGS` (`pack`,
`pack-docs`, `documents`). Datasets hold index arrays into the (memory-mapped) stream, never
lists of tokens. This module holds the splits and datasets and re-exports the rest. Every
problem with the data raises a `DataError` (a `ValueError`) whose message names the file and
what to do about it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import NamedTuple

import numpy as np
import tiktoken
import torch
from torch.utils.data import DataLoader, Dataset

from .corpora import NAMED_CORPORA, Corpus, default_data_dir, resolve_corpus
from .documents import find_column, iter_documents, iter_jsonl_records, with_eos
from .errors import DataError
from .loss import IGNORE_INDEX  # F.cross_entropy's default ignore_index: padding
from .token_cache import CACHE_VERSION, TokenCorpus, load_token_ids, load_tokens, user_cache_dir
from .tokenizer import EOS_ID, EOS_TOKEN, get_tokenizer

__all__ = [
    "IGNORE_INDEX", "DataError", "Corpus", "NAMED_CORPORA", "default_data_dir", "resolve_corpus",
    "find_column", "iter_documents", "iter_jsonl_records", "CACHE_VERSION", "load_token_ids", "load_tokens",
    "TokenCorpus", "user_cache_dir",
    "split_tokens", "TokenWindowDataset", "GPTDatasetV1", "create_dataloader_v1", "pack_documents",
    "split_documents", "DocumentChunkDataset", "chunk_documents", "stack_examples", "CHUNKINGS", "VAL_SPLITS",
    "TokenDocuments", "DocumentStream", "document_starts", "select_documents", "split_corpus", "chunk_spans",
    "pack_spans", "window_dataset",
]

# How a split's token stream becomes windows (see `window_dataset`) and how validation is chosen.
CHUNKINGS = ("pack", "pack-docs", "documents")
VAL_SPLITS = ("tail", "random-docs")


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
    n_train = _tail_cut(n, val_ratio)
    for part, size, fix in (("training", n_train, "smaller"), ("validation", n - n_train, "larger")):
        if size < need:
            raise DataError(f"the {part} split has {size} of the corpus's {n} tokens (validation ratio "
                            f"{val_ratio}), fewer than the {need} (context_length + 1) one window needs; "
                            f"use a smaller context length or a {fix} validation ratio")
    return ids[:n_train], ids[n_train:]


def _tail_cut(n: int, val_ratio: float) -> int:
    """Tokens of the training part of a tail split: the tutorial's `int(train_ratio * len)`."""
    return int(round((1.0 - val_ratio) * n, 6))  # round() drops noise such as (1 - 0.9) * 600 = 59.999...


class TokenDocuments(NamedTuple):
    """A token stream and the offset of each document's first token in it (ascending, from 0)."""

    ids: np.ndarray | DocumentStream
    doc_starts: np.ndarray


class DocumentStream:
    """Pieces [starts[k], ends[k]) of a token array read as one stream, nothing copied: `len()` and
    ascending slices `[a:b]`, all that `TokenWindowDataset` and `DocumentChunkDataset` read."""

    def __init__(self, ids: np.ndarray, starts: np.ndarray, ends: np.ndarray):
        self.ids, self.starts = ids, np.asarray(starts, dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(np.asarray(ends, dtype=np.int64) - self.starts)])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitem__(self, key: slice) -> np.ndarray:
        if not isinstance(key, slice):
            raise TypeError("a DocumentStream is read in slices")
        start, stop, step = key.indices(len(self))
        if step != 1:
            raise ValueError("a DocumentStream is read in ascending slices of step 1")
        first = int(np.searchsorted(self.offsets, start, "right")) - 1
        last = int(np.searchsorted(self.offsets, stop, "left"))
        off, begin = self.offsets, self.starts
        pieces = [self.ids[begin[k] + max(start - off[k], 0):begin[k] + min(stop, off[k + 1]) - off[k]]
                  for k in range(first, last)]
        return np.concatenate(pieces) if pieces else self.ids[:0]


def document_starts(ids: np.ndarray, eos_id: int = EOS_ID, block: int = 1 << 24) -> np.ndarray:
    """The offset of each document's first token in a stream that ends each one with `eos_id`
    (as `load_token_ids` joins them), read `block` tokens at a time (a memmap stays on disk)."""
    ends = [np.flatnonzero(ids[i:i + block] == eos_id) + (i + 1) for i in range(0, len(ids), block)]
    starts = np.concatenate([np.zeros(1, dtype=np.int64), *ends])
    return starts[starts < len(ids)] if len(ids) else starts[:0]


def select_documents(corpus: TokenDocuments, keep: np.ndarray, block: int = 1 << 22) -> TokenDocuments:
    """The documents of `corpus` where `keep` (one bool each) is set, as one stream without
    copying tokens, `block` documents at a time (the temporaries stay block-sized)."""
    ids, starts, n_docs = corpus.ids, np.asarray(corpus.doc_starts, dtype=np.int64), len(corpus.doc_starts)
    run_starts, run_offsets, doc_starts = [], [], []
    total, previous = 0, -2
    for b in range(0, n_docs, block):
        chosen = np.flatnonzero(keep[b:b + block]) + b
        ends = np.append(starts[b + 1:b + block + 1], np.array([len(ids)] * (b + block >= n_docs), np.int64))
        begin, lengths = starts[chosen], ends[chosen - b] - starts[chosen]
        new_starts = total + np.cumsum(lengths) - lengths
        # Runs of consecutive documents are read as one piece: fewer pieces per window.
        heads = np.flatnonzero(np.diff(chosen, prepend=previous) != 1)
        run_starts.append(begin[heads])
        run_offsets.append(new_starts[heads])
        doc_starts.append(new_starts)
        total += int(lengths.sum())
        previous = chosen[-1] if len(chosen) else previous
    run_starts, run_offsets = (np.concatenate([np.zeros(0, np.int64), *a]) for a in (run_starts, run_offsets))
    stream = DocumentStream(ids, run_starts, run_starts + np.diff(np.append(run_offsets, total)))
    return TokenDocuments(stream, np.concatenate([np.zeros(0, np.int64), *doc_starts]))


def split_corpus(corpus: TokenDocuments, val_ratio: float, how: str = "tail",
                 seed: int = 0) -> tuple[TokenDocuments, TokenDocuments]:
    """(train, validation) parts of a corpus, views into its stream.

    `tail`: the last `val_ratio` of the tokens, cut where `split_tokens` cuts (a document that
    straddles the cut becomes two); `random-docs`: `round(val_ratio * documents)` whole
    documents (at least one, and at least one left to train on) drawn with `seed`, both
    parts keeping the corpus's order.
    """
    if not 0.0 < val_ratio < 1.0:
        raise DataError(f"the validation ratio must be between 0 and 1, got {val_ratio}")
    ids, starts, n = corpus.ids, np.asarray(corpus.doc_starts, dtype=np.int64), len(corpus.ids)
    if how == "tail":
        cut = _tail_cut(n, val_ratio)
        if not 0 < cut < n:
            raise DataError(f"a tail split of {n} tokens at validation ratio {val_ratio} leaves a part empty")
        return (TokenDocuments(ids[:cut], starts[starts < cut]),
                TokenDocuments(ids[cut:], np.concatenate([[0], starts[starts > cut] - cut])))
    if how != "random-docs":
        raise ValueError(f"unknown split {how!r}; use one of {', '.join(VAL_SPLITS)}")
    if len(starts) < 2:
        raise DataError(f"a random split of whole documents needs at least 2 documents, the corpus has "
                        f"{len(starts)}; use the tail split")
    n_val = min(max(round(val_ratio * len(starts)), 1), len(starts) - 1)
    is_val = _random_mask(len(starts), n_val, np.random.default_rng(seed))
    return select_documents(corpus, ~is_val), select_documents(corpus, is_val)


def _random_mask(n: int, k: int, rng: np.random.Generator, block: int = 1 << 22) -> np.ndarray:
    """n bools, exactly k of them set, every such set equally likely; drawn a block at a time
    (how many of the k fall in each block is hypergeometric), never a permutation of all n."""
    mask, left = np.zeros(n, dtype=bool), k
    for b in range(0, n, block):
        size = min(block, n - b)
        take = rng.hypergeometric(left, n - b - left, size) if size < n - b else left
        mask[b + rng.choice(size, take, replace=False)] = True
        left -= take
    return mask


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
        self.ids = ids if isinstance(ids, (np.ndarray, DocumentStream)) else np.asarray(ids, dtype=np.int64)
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
    docs = [np.asarray(d, dtype=np.int64) for d in docs_ids]
    ids = np.concatenate(docs) if docs else np.zeros(0, dtype=np.int64)
    starts = np.cumsum([0] + [len(d) for d in docs[:-1]], dtype=np.int64)[:len(docs)]
    spans, doc_index = chunk_spans(starts, len(ids), context_length, stride, keep_short)
    return DocumentChunkDataset(ids, spans, doc_index, context_length, pad_id)


def chunk_spans(doc_starts: np.ndarray, n_tokens: int, context_length: int, stride: int = 0,
                keep_short: bool = True, block: int = 1 << 20) -> tuple[np.ndarray, np.ndarray]:
    """(spans, doc_index) of `chunk_documents` from document offsets alone, `block` documents at a time."""
    if not 0 <= stride < context_length:
        raise ValueError(f"stride must be in [0, context_length={context_length}), got {stride}")
    step, bounds = context_length - stride, np.append(np.asarray(doc_starts, dtype=np.int64), n_tokens)
    spans, doc_index = [np.zeros((0, 2), dtype=np.int64)], [np.zeros(0, dtype=np.int64)]
    for b in range(0, len(bounds) - 1, block):
        starts, ends = bounds[b:min(b + block, len(bounds) - 1)], bounds[b + 1:b + block + 1]
        lengths = ends - starts
        n_full = np.maximum(0, -(-(lengths - context_length) // step))  # len(range(0, n - L, step))
        covered = np.where(n_full > 0, (n_full - 1) * step + context_length, 0)
        counts = n_full + (keep_short & (lengths - 1 > covered))
        doc = np.repeat(np.arange(len(starts)), counts)
        k = np.arange(len(doc)) - np.repeat(np.cumsum(counts) - counts, counts)  # chunk number in its doc
        begin = starts[doc] + k * step
        spans.append(np.stack([begin, np.minimum(begin + context_length + 1, ends[doc])], axis=1))
        doc_index.append(doc + b)
    return np.concatenate(spans), np.concatenate(doc_index)


def pack_spans(doc_starts: np.ndarray, n_tokens: int, context_length: int) -> np.ndarray:
    """Spans of whole consecutive documents, in order, of at most context_length + 1 tokens each
    (context_length inputs and their shifted targets), filled greedily.

    A document longer than a window is cut into full windows, consecutive ones sharing a token
    (as `chunk_spans` with stride 0 cuts it), and its remainder packs with the documents after
    it. A span of fewer than 2 tokens has nothing to predict and is left out.
    """
    bounds = np.append(np.asarray(doc_starts, dtype=np.int64), n_tokens)
    spans, s = [], 0
    while s < n_tokens:
        limit = s + context_length + 1
        end = int(bounds[np.searchsorted(bounds, limit, "right") - 1])  # the last boundary within reach
        if end > s:
            if end - s >= 2:
                spans.append((s, end))
            s = end
        else:  # the document at s is longer than a window: a full window of it, the next at its last token
            spans.append((s, limit))
            s = limit - 1
    return np.array(spans, dtype=np.int64).reshape(-1, 2)


def window_dataset(corpus: TokenDocuments, context_length: int, chunking: str = "pack", stride: int | None = None,
                   chunk_stride: int = 0, keep_short: bool = True, pad_id: int = EOS_ID) -> Dataset:
    """The (x, y) windows of a corpus (or a split of one) in a chunking mode, each x and y of
    context_length tokens, targets past a short window's end -100 (x there: `pad_id`).

    `pack`: the stream cut into windows every `stride` (default: context_length) tokens, across
    documents (`TokenWindowDataset`); `pack-docs`: whole documents packed in order into windows
    (`pack_spans`); `documents`: each document in chunks with overflow, overlapping by
    `chunk_stride` tokens, the short last ones kept if `keep_short` (`chunk_spans`).
    """
    if chunking == "pack":
        return TokenWindowDataset(corpus.ids, context_length, stride or context_length)
    if chunking == "pack-docs":
        spans = pack_spans(corpus.doc_starts, len(corpus.ids), context_length)
        doc_index = np.searchsorted(corpus.doc_starts, spans[:, 0], "right") - 1
    elif chunking == "documents":
        spans, doc_index = chunk_spans(corpus.doc_starts, len(corpus.ids), context_length, chunk_stride, keep_short)
    else:
        raise ValueError(f"unknown chunking {chunking!r}; use one of {', '.join(CHUNKINGS)}")
    return DocumentChunkDataset(corpus.ids, spans, doc_index, context_length, pad_id)
