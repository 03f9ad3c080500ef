"""`python -m minigpt.generate`: continue a prompt with a GPT, streaming the text as it comes.

    python -m minigpt.generate --pretrained gpt2 --prompt "Every effort moves you" \\
        --max-new-tokens 50 --temperature 0.8 --top-k 50 --seed 1
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

import torch

from ..device import resolve_device
from ..errors import ConfigError
from ..generation import SamplingConfig, check, stream
from ..tokenizer import EOS_ID, EOS_TOKEN, get_tokenizer
from .common import HelpFormatter, add_model_source, load_model_from_args, positive_int, run


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m minigpt.generate", description=__doc__.split("\n")[0],
                                formatter_class=HelpFormatter)
    add_model_source(p, weights=True)
    p.add_argument("--prompt", default="", help="text to continue; '-' reads stdin; empty starts "
                   f"from {EOS_TOKEN}")
    p.add_argument("--max-new-tokens", type=int, default=50)
    p.add_argument("--temperature", type=float, default=None,
                   help="0 is greedy (without --top-k/--top-p, the default); with --top-k or --top-p the default "
                        "is 1, sampling as Hugging Face's do_sample does")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--num-samples", type=positive_int, default=1)
    p.add_argument("--no-cache", action="store_true", help="recompute the whole context every step")
    return p


def _main(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)
    sampling = SamplingConfig(sampling_temperature(args), args.top_k, args.top_p, use_cache=not args.no_cache)
    check(args.max_new_tokens, sampling)
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    device = resolve_device(args.device)
    model = load_model_from_args(args, device)
    tokenizer = get_tokenizer()
    ids = tokenizer.encode(prompt, allowed_special={EOS_TOKEN}) or [EOS_ID]
    check(args.max_new_tokens, sampling, model.cfg.vocab_size)
    context = model.cfg.context_length
    model.check_token_ids(torch.tensor([ids[-context:]]))
    if len(ids) > context:
        print(f"warning: the prompt has {len(ids)} tokens, more than the model's context of {context}; "
              f"using its last {context}", file=sys.stderr)
        ids = ids[-context:]
    sampling.eos_id = EOS_ID if EOS_ID < model.cfg.vocab_size else None
    sampling.generator = None if args.seed is None else torch.Generator(device).manual_seed(args.seed)
    n_tokens, t0 = 0, time.perf_counter()
    for i in range(args.num_samples):
        if i:
            print("\n" + "-" * 40, flush=True)
        sys.stdout.write(tokenizer.decode(ids) if prompt else "")
        for _, text in stream(model, tokenizer, ids, args.max_new_tokens, sampling=sampling):
            n_tokens += 1
            sys.stdout.write(text)
            sys.stdout.flush()
        print(flush=True)
    seconds = time.perf_counter() - t0
    weights = f", {args.weights} weights" if args.weights else ""
    print(f"{n_tokens} tokens in {seconds:.2f} s: {n_tokens / seconds:.1f} tokens/s "
          f"({device}, {args.dtype}{weights}, {'no cache' if args.no_cache else 'KV cache'})", file=sys.stderr)
    return 0


def sampling_temperature(args: argparse.Namespace) -> float:
    """--temperature, defaulting to 1 when --top-k/--top-p ask for sampling; greedy with them is refused."""
    filtered = args.top_k is not None or args.top_p is not None
    if args.temperature is None:
        return 1.0 if filtered else 0.0
    if args.temperature == 0 and filtered:
        raise ConfigError("--top-k/--top-p filter what is sampled, but --temperature 0 is greedy and would "
                          "ignore them: give a temperature > 0, or drop --top-k/--top-p")
    return args.temperature


def main(argv: Sequence[str] | None = None) -> int:
    return run(_main, argv)
