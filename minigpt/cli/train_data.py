"""The data flags of `python -m minigpt.train` and the training/validation windows they select."""

from __future__ import annotations

import argparse

from .. import data as data_lib
from ..distributed import DistInfo, barrier
from ..errors import DataError
from ..training import TrainConfig


def add_data_args(parser: argparse.ArgumentParser, d: TrainConfig) -> None:
    """The "data" group of the train command; `d` gives the defaults."""
    g = parser.add_argument_group("data")
    g.add_argument("--data", default=d.data, help="a named corpus (the-verdict, tinyshakespeare), a .txt file, "
                   "a directory of .txt files, a .csv or a .jsonl file")
    g.add_argument("--data-dir", default=d.data_dir, help="where named corpora live ($MINIGPT_DATA_DIR or data/)")
    g.add_argument("--text-column", default=d.text_column, help="text column of a .csv / field of a .jsonl")
    g.add_argument("--val-ratio", type=float, default=d.val_ratio, help="fraction of tokens held out")
    g.add_argument("--stride", type=int, default=d.stride, help="window stride (default: context length)")


def load_splits(args: argparse.Namespace, tokenizer, context_length: int,
                dist_info: DistInfo) -> tuple[data_lib.TokenWindowDataset, data_lib.TokenWindowDataset]:
    """The training and validation windows of `--data`."""
    ids = None
    for turn in ("main", "others"):  # rank 0 tokenizes and caches first; the others then read its cache
        if (turn == "main") == dist_info.is_main:
            ids = data_lib.load_token_ids(args.data, tokenizer, text_column=args.text_column, data_dir=args.data_dir)
        barrier()
    try:
        train_ids, val_ids = data_lib.split_tokens(ids, args.val_ratio, context_length)
    except DataError as e:
        raise DataError(f"{args.data}: {e}") from None
    return (data_lib.TokenWindowDataset(train_ids, context_length, args.stride or context_length),
            data_lib.TokenWindowDataset(val_ids, context_length, context_length))
