"""`python -m minigpt.serve`: an OpenAI-compatible HTTP API and a browser playground for a GPT.

    python -m minigpt.serve --pretrained gpt2 --port 8000
    curl http://127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' \\
        -d '{"model": "gpt2", "prompt": "Every effort moves you", "max_tokens": 20, "temperature": 0}'

Open http://127.0.0.1:8000/ for the playground. Needs the `serve` extra: pip install 'minigpt[serve]'.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from ..errors import require
from ..serving import Limits, create_app
from ..tokenizer import get_tokenizer
from .common import HelpFormatter, add_model_source, load_model_from_args, positive_int, run


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m minigpt.serve", description=__doc__.split("\n")[0],
                                formatter_class=HelpFormatter)
    add_model_source(p, seed=0, weights=True)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=os.environ.get("MINIGPT_API_KEY"),
                   help="require 'Authorization: Bearer KEY' (default: $MINIGPT_API_KEY, else none)")
    p.add_argument("--name", help="the model's id in the API (default: the checkpoint, weights or preset name)")
    p.add_argument("--max-batch", type=positive_int, default=8, help="rows decoded together at most")
    p.add_argument("--max-tokens", type=positive_int, default=Limits.max_tokens, help="cap on max_tokens")
    p.add_argument("--max-n", type=positive_int, default=Limits.max_n, help="cap on n")
    p.add_argument("--max-body", type=positive_int, default=Limits.max_body, help="cap on a request body, bytes")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    return p


def model_name(args: argparse.Namespace) -> str:
    """The id clients use: --name, else the checkpoint directory's name, the weights' or the preset's."""
    if args.name:
        return args.name
    if args.checkpoint:
        return Path(args.checkpoint).resolve().name
    return Path(args.pretrained).name if args.pretrained else args.preset


def _main(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)
    uvicorn = require("uvicorn", "serve", "python -m minigpt.serve")
    if args.host not in ("127.0.0.1", "localhost", "::1") and not args.api_key:
        print(f"warning: listening on {args.host} without --api-key: anyone who reaches it can use it",
              file=sys.stderr)
    model = load_model_from_args(args)
    limits = Limits(max_tokens=args.max_tokens, max_n=args.max_n, max_body=args.max_body)
    app = create_app(model, get_tokenizer(), model_name(args), limits, args.max_batch, args.api_key)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    finally:
        app.state.service.close()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run(_main, argv)
