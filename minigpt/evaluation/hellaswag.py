"""HellaSwag, completion style (as build-nanogpt's hellaswag.py and llm.c score it).

Each example is a context and four endings, one of them right. The model scores each ending by
the log-likelihood of its tokens given the context: `acc` picks the ending with the highest sum,
`acc_norm` the highest mean per token (which does not favour short endings). Data: the published
jsonl files of https://github.com/rowanz/hellaswag.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import tiktoken

from ..corpora import default_data_dir
from ..documents import iter_jsonl_records
from ..errors import DataError, DownloadError
from ..files import download
from ..model import GPTModel
from .scoring import score_tails

BASE_URL = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/"
# Examples per published file. The repository publishes no checksums, so a download is checked by
# its count of well-formed examples (and by the size its server announces).
SPLIT_EXAMPLES = {"train": 39905, "val": 10042}


@dataclass(frozen=True)
class HellaSwagExample:
    context: str
    endings: tuple[str, str, str, str]
    label: int


@dataclass(frozen=True)
class HellaSwagChoice:
    """What the model chose for one example: by summed and by per-token mean log-likelihood."""

    label: int
    pred: int  # argmax of the summed log-likelihoods
    pred_norm: int  # argmax of the mean log-likelihood per token
    sums: tuple[float, ...]
    means: tuple[float, ...]


def parse_example(record: dict, where: str) -> HellaSwagExample:
    """A `HellaSwagExample` from one published record (fields ctx, endings, label)."""
    try:
        endings, label = record["endings"], int(record["label"])
        context = record["ctx"]
    except (KeyError, TypeError, ValueError) as e:
        raise DataError(f"{where}: not a HellaSwag record with ctx, endings and label ({e!r})") from None
    if not isinstance(context, str) or len(endings) != 4 or not all(isinstance(e, str) for e in endings):
        raise DataError(f"{where}: a HellaSwag record has a text ctx and 4 text endings")
    if not 0 <= label < 4:
        raise DataError(f"{where}: label {label} is not in 0..3")
    return HellaSwagExample(context, tuple(endings), label)  # type: ignore[arg-type]


def read_hellaswag(path: str | os.PathLike, limit: int | None = None) -> list[HellaSwagExample]:
    """The first `limit` (default: all) examples of a HellaSwag jsonl file."""
    examples = []
    for lineno, record in iter_jsonl_records(Path(path)):
        if limit is not None and len(examples) >= limit:
            break
        examples.append(parse_example(record, f"{path}: line {lineno}"))
    if not examples:
        raise DataError(f"{path}: no HellaSwag examples")
    return examples


def hellaswag_file(split: str = "val", data_dir: str | os.PathLike | None = None) -> Path:
    """`<data_dir>/hellaswag_<split>.jsonl`, downloaded there first if missing (resumable)."""
    if split not in SPLIT_EXAMPLES:
        raise DataError(f"HellaSwag split {split!r}: choose {' or '.join(SPLIT_EXAMPLES)} (the test split "
                        "has no labels)")
    path = Path(data_dir or default_data_dir()) / f"hellaswag_{split}.jsonl"
    if path.is_file():
        return path
    url = BASE_URL + path.name
    download(url, path, desc=f"downloading {path.name}",
             advice=f"Offline? Download {url} yourself and save it as {path}, or pass its path as --data")
    with open(path, encoding="utf-8") as f:
        count = sum(1 for line in f if line.strip())
    if count != SPLIT_EXAMPLES[split]:
        path.unlink()
        raise DownloadError(f"{url}: got {count} examples, expected {SPLIT_EXAMPLES[split]}; it was not kept")
    return path


def render(example: HellaSwagExample, tokenizer: tiktoken.Encoding,
           context_length: int) -> list[tuple[list[int], int]]:
    """The four `(token_ids, ending_length)` sequences: the context's tokens, then " " + ending's.

    A sequence longer than the model's context keeps its last `context_length + 1` tokens.
    """
    context = tokenizer.encode(example.context)
    rows = []
    for ending in example.endings:
        tail = tokenizer.encode(" " + ending)
        rows.append(((context + tail)[-(context_length + 1):], min(len(tail), context_length)))
    return rows


def score_hellaswag(model: GPTModel, examples: Sequence[HellaSwagExample], tokenizer: tiktoken.Encoding,
                    batch_size: int = 8, progress: bool = False) -> list[HellaSwagChoice]:
    """The model's `HellaSwagChoice` on each example; `batch_size` counts examples (4 sequences each)."""
    requests = [row for ex in examples for row in render(ex, tokenizer, model.cfg.context_length)]
    scores = score_tails(model, requests, 4 * batch_size, progress, desc="hellaswag")
    choices = []
    for i, ex in enumerate(examples):
        mine = scores[4 * i:4 * i + 4]
        sums = tuple(s.total for s in mine)
        means = tuple(s.total / len(s.logprobs) for s in mine)
        choices.append(HellaSwagChoice(ex.label, _argmax(sums), _argmax(means), sums, means))
    return choices


def _argmax(values: Sequence[float]) -> int:
    return max(range(len(values)), key=lambda i: (values[i], -i))  # the first of equal maxima


def hellaswag_accuracy(choices: Iterable[HellaSwagChoice]) -> dict[str, float | int]:
    """acc, acc_norm and the number of examples."""
    choices = list(choices)
    n = len(choices)
    return {"acc": sum(c.pred == c.label for c in choices) / n,
            "acc_norm": sum(c.pred_norm == c.label for c in choices) / n, "examples": n}

