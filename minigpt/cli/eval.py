"""`python -m minigpt.eval perplexity|hellaswag|lm-eval`: evaluate a GPT.

    python -m minigpt.eval perplexity --pretrained gpt2 --data the-verdict --stride 512
    python -m minigpt.eval hellaswag --pretrained gpt2 --limit 500
    python -m minigpt.eval lm-eval --model minigpt --model_args pretrained=gpt2 --tasks hellaswag

`lm-eval` hands every argument after it to the lm-evaluation-harness's own command line, with
minigpt registered as `--model minigpt` (model_args: checkpoint=DIR, pretrained=NAME|DIR, preset=,
device=, dtype=, batch_size=). It needs the optional extra: pip install 'minigpt[eval]'.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence

import torch

from ..data import split_tokens
from ..evaluation import evaluate_perplexity, hellaswag_accuracy, hellaswag_file, read_hellaswag, score_hellaswag
from ..evaluation.hellaswag import SPLIT_EXAMPLES
from ..token_cache import load_token_ids
from ..tokenizer import EOS_ID, get_tokenizer
from ..training import TrainConfig
from .common import HelpFormatter, add_model_source, load_model_from_args, positive_int, run


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m minigpt.eval", description="Evaluate a GPT.",
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    sub = p.add_subparsers(dest="command", required=True)
    formatter = HelpFormatter
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--batch-size", type=positive_int, default=4,
                        help="windows (perplexity) or examples (hellaswag) per forward pass")
    common.add_argument("--data-dir", default=None, help="where named data lives (default: $MINIGPT_DATA_DIR or data/)")
    common.add_argument("--no-progress", action="store_true", help="no progress bar")
    common.add_argument("--json", action="store_true", help="print the results as one JSON object")

    ppl = sub.add_parser("perplexity", parents=[common], formatter_class=formatter,
                         help="perplexity and bits per byte on a text",
                         description="Mean loss, perplexity and bits per byte of a text, scored with sliding "
                                     "windows (Hugging Face's perplexity guide).")
    add_model_source(ppl, weights=True)
    ppl.add_argument("--data", required=True, help="a .txt/.csv/.jsonl file, a directory of .txt, or a corpus name")
    ppl.add_argument("--text-column", default=None, help="the .csv column / .jsonl field holding the text")
    ppl.add_argument("--split", choices=("all", "val"), default="all",
                     help="all of the text, or the validation tail the training command holds out")
    ppl.add_argument("--val-ratio", type=float, default=TrainConfig.val_ratio,
                     help="with --split val: the training run's --val-ratio")
    ppl.add_argument("--context-length", type=positive_int, default=None, help="window size (default: the model's)")
    ppl.add_argument("--stride", type=positive_int, default=None, help="tokens between windows (default: half "
                     "the window; the window size gives disjoint windows)")
    ppl.add_argument("--no-eos-prefix", action="store_true", help="do not start the text with <|endoftext|> (its "
                     "first token then goes unscored, as in Hugging Face's guide)")

    hs = sub.add_parser("hellaswag", parents=[common], formatter_class=formatter,
                        help="HellaSwag accuracy (completion style)",
                        description="HellaSwag acc (summed log-likelihood of each ending) and acc_norm (per token).")
    add_model_source(hs, weights=True)
    hs.add_argument("--split", choices=sorted(SPLIT_EXAMPLES), default="val", help="the published file to use")
    hs.add_argument("--data", default=None, help="a local HellaSwag .jsonl instead of the download")
    hs.add_argument("--limit", type=positive_int, default=None, help="only the first N examples")

    sub.add_parser("lm-eval", add_help=False, help="the lm-evaluation-harness, with --model minigpt",
                   description="Everything after lm-eval goes to lm-eval's own command line.")
    return p


def _perplexity(args: argparse.Namespace) -> dict:
    model = load_model_from_args(args)
    tokenizer = get_tokenizer()
    ids = torch.from_numpy(load_token_ids(args.data, tokenizer, args.text_column, args.data_dir).astype("int64"))
    if args.split == "val":
        ids = torch.as_tensor(split_tokens(ids.numpy(), args.val_ratio, model.cfg.context_length)[1])
    if not args.no_eos_prefix:
        ids = torch.cat([torch.tensor([EOS_ID]), ids])
    result = evaluate_perplexity(model, ids, tokenizer, args.context_length, args.stride, args.batch_size,
                                 progress=not args.no_progress)
    return {"data": str(args.data), "split": args.split, **result.as_dict()}


def _hellaswag(args: argparse.Namespace) -> dict:
    model = load_model_from_args(args)
    path = args.data or hellaswag_file(args.split, args.data_dir)
    examples = read_hellaswag(path, args.limit)
    choices = score_hellaswag(model, examples, get_tokenizer(), args.batch_size, progress=not args.no_progress)
    return {"data": str(path), **hellaswag_accuracy(choices)}


def _lm_eval(rest: Sequence[str]) -> int:
    """lm-eval's own command line, with minigpt's model registered."""
    from ..evaluation import lm_eval_model  # noqa: F401  (registers --model minigpt; needs lm-eval)
    from ..errors import require

    harness = require("lm_eval.__main__", "eval", "python -m minigpt.eval lm-eval")
    saved, sys.argv = sys.argv, ["lm-eval", *rest]
    try:
        harness.cli_evaluate()
    finally:
        sys.argv = saved
    return 0


def _show(results: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(results))
        return
    if "perplexity" in results:
        print(f"{results['data']} ({results['split']}): {results['tokens']} tokens, {results['bytes']} bytes, "
              f"{results['windows']} windows of {results['context_length']} (stride {results['stride']})")
        print(f"loss {results['loss']:.4f}  perplexity {results['perplexity']:.3f}  "
              f"bits per byte {results['bits_per_byte']:.4f}")
    else:
        print(f"{results['data']}: {results['examples']} examples")
        print(f"acc {results['acc']:.4f}  acc_norm {results['acc_norm']:.4f}")


def _main(argv: Sequence[str] | None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["lm-eval"]:  # argparse would claim lm-eval's flags
        return _lm_eval(argv[1:])
    args = build_parser().parse_args(argv)
    t0 = time.perf_counter()
    results = _perplexity(args) if args.command == "perplexity" else _hellaswag(args)
    seconds = time.perf_counter() - t0
    _show(results, args.json)
    unit, count = ("windows", results["windows"]) if args.command == "perplexity" else ("examples",
                                                                                         results["examples"])
    print(f"{count} {unit} in {seconds:.1f} s: {count / seconds:.2f} {unit}/s", file=sys.stderr)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run(_main, argv)
