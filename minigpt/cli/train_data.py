"""The data flags of `python -m minigpt.train` and the training/validation windows they select."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

import numpy as np
from torch.utils.data import Dataset

from .. import data as data_lib
from ..distributed import DistInfo, barrier
from ..documents import template_fields
from ..errors import ConfigError, DataError
from ..training import TrainConfig


def add_data_args(parser: argparse.ArgumentParser, d: TrainConfig) -> None:
    """The "data" group of the train command; `d` gives the defaults."""
    g = parser.add_argument_group("data")
    g.add_argument("--data", default=d.data, help="a named corpus (the-verdict, tinyshakespeare), a .txt file, "
                   "a directory of .txt files, a .csv or a .jsonl file")
    g.add_argument("--data-dir", default=d.data_dir, help="where named corpora live ($MINIGPT_DATA_DIR or data/)")
    g.add_argument("--text-column", default=d.text_column, help="text column of a .csv / field of a .jsonl")
    g.add_argument("--template", default=None, help='format each record, e.g. "JOKE: {text}" (fields by name)')
    g.add_argument("--doc-separator", choices=("eos", "none"), default="eos",
                   help="what joins documents in the token stream: <|endoftext|> or nothing")
    g.add_argument("--val-data", default=None, metavar="FILE|DIR",
                   help="a separate validation source (then --data is all training, no ratio split)")
    g.add_argument("--val-ratio", type=float, default=d.val_ratio,
                   help="fraction held out: of the tokens (tail) or of the documents (random-docs); 0: no "
                        "validation, train on everything")
    g.add_argument("--val-split", choices=data_lib.VAL_SPLITS, default="tail",
                   help="tail: the last tokens; random-docs: whole documents drawn with --seed")
    g.add_argument("--chunking", choices=data_lib.CHUNKINGS, default="pack",
                   help="pack: the stream cut every --stride tokens, across documents; pack-docs: whole "
                        "documents packed into windows, a longer one cut into window-size pieces; documents: "
                        "each document in its own chunks, with overflow")
    g.add_argument("--stride", type=int, default=d.stride, help="pack: window stride (default: context length)")
    g.add_argument("--chunk-stride", type=int, default=0, help="documents: tokens shared by consecutive chunks")
    keep = g.add_mutually_exclusive_group()
    keep.add_argument("--keep-short", dest="keep_short", action="store_true", default=True,
                      help="documents: keep each document's short last chunk, padded")
    keep.add_argument("--full-chunks-only", dest="keep_short", action="store_false",
                      help="documents: drop chunks shorter than the context, as the Hugging Face course does")


def check_data_args(args: argparse.Namespace) -> None:
    """Reject data flags no run can use, or that the chosen mode would ignore, naming the flag."""
    if not 0 <= args.val_ratio < 1:
        raise ConfigError(f"--val-ratio must be in [0, 1), got {args.val_ratio}")
    if args.val_data and args.val_split != "tail":
        raise ConfigError("--val-split chooses a ratio split of --data; with --val-data there is none")
    if args.chunking != "pack" and args.stride is not None:
        raise ConfigError(f"--stride applies to --chunking pack, not {args.chunking} (see --chunk-stride)")
    if args.chunking != "documents" and (args.chunk_stride or not args.keep_short):
        raise ConfigError("--chunk-stride and --full-chunks-only apply to --chunking documents")
    if not 0 <= args.chunk_stride < args.context_length:
        raise ConfigError(f"--chunk-stride must be in [0, --context-length {args.context_length}), "
                          f"got {args.chunk_stride}")
    if args.template is not None:
        try:
            fields = [field for _, field, _, _ in template_fields(args.template) if field is not None]
        except DataError as e:
            raise ConfigError(f"--template: {e}") from None
        if not fields:
            raise ConfigError(f"--template {args.template!r} names no field; write one such as {{text}}")


def on_main_first(load: Callable[[], object], dist_info: DistInfo) -> object:
    """`load()` on every rank, rank 0 first: it tokenizes and caches, the others then read its cache."""
    result = None
    for turn in ("main", "others"):
        if (turn == "main") == dist_info.is_main:
            result = load()
        barrier()
    return result


def load_corpus(source: str, args: argparse.Namespace, tokenizer) -> data_lib.TokenDocuments:
    """The token stream of `source` and where its documents start, as the data flags read it."""
    corpus = data_lib.load_tokens(source, tokenizer, text_column=args.text_column, template=args.template,
                                  separator=args.doc_separator, data_dir=args.data_dir,
                                  progress=getattr(args, "progress", True))
    return data_lib.TokenDocuments(corpus.ids, corpus.doc_starts)


def windows(part: data_lib.TokenDocuments, args: argparse.Namespace, context_length: int,
            train: bool) -> Dataset:
    """A split's windows in the --chunking mode (validation windows of `pack` never overlap)."""
    return data_lib.window_dataset(part, context_length, args.chunking, args.stride if train else None,
                                   args.chunk_stride, args.keep_short)


def say(text: str, dist_info: DistInfo) -> None:
    if dist_info.is_main:
        print(text, file=sys.stderr)


def load_splits(args: argparse.Namespace, tokenizer, context_length: int,
                dist_info: DistInfo) -> tuple[Dataset, Dataset | None]:
    """The training and validation windows of `--data` (and `--val-data`); no validation set
    (None) with `--val-ratio 0`."""
    check_data_args(args)
    corpus = on_main_first(lambda: load_corpus(args.data, args, tokenizer), dist_info)
    val: data_lib.TokenDocuments | None = None
    if args.val_data:
        train, val = corpus, on_main_first(lambda: load_corpus(args.val_data, args, tokenizer), dist_info)
    elif args.val_ratio == 0:
        train = corpus
        say(f"no validation: --val-ratio 0 trains on all {len(corpus.ids):,} tokens of {args.data}", dist_info)
    else:
        try:
            if args.chunking == "pack" and args.val_split == "tail":  # the tutorial's split and its checks
                ids = data_lib.split_tokens(corpus.ids, args.val_ratio, context_length)
                train, val = (data_lib.TokenDocuments(part, corpus.doc_starts[:1]) for part in ids)
            else:
                train, val = data_lib.split_corpus(corpus, args.val_ratio, args.val_split, args.seed)
        except DataError as e:
            raise DataError(f"{args.data}: {e}") from None
    if args.chunking == "pack-docs":
        lengths = np.diff(np.append(corpus.doc_starts, len(corpus.ids)))
        if (n_long := int((lengths > context_length + 1).sum())):
            say(f"pack-docs: {n_long} of {len(lengths)} documents are longer than a window ({context_length + 1} "
                "tokens) and are cut into window-size pieces", dist_info)
    train_set = windows(train, args, context_length, train=True)
    val_set = None if val is None else windows(val, args, context_length, train=False)
    for name, source, dataset in (("training", args.data, train_set),
                                  ("validation", args.val_data or args.data, val_set)):
        if dataset is not None and len(dataset) == 0:
            raise DataError(f"{source}: the {name} split gives no windows of --context-length {context_length} "
                            f"with --chunking {args.chunking}; use a smaller context length or more text")
    return train_set, val_set
