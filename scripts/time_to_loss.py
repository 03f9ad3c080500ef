"""Held-out loss against training time: run `python -m minigpt.train` flags (e.g. a recipe) and
print, at every evaluation, the steps, tokens, training seconds (evaluations excluded), and the
loss and bits per byte on the whole validation split.

    MINIGPT_DATA_DIR=../shared/data nice python scripts/time_to_loss.py --label recipe \\
        -- --config recipes/shakespeare-cpu.toml --max-steps 150 --eval-interval 25

Everything after `--` is passed to the train command; `--eval-iters all` is added so that every
run is scored on the same tokens (the validation split's non-overlapping windows), and the run
goes to a temporary out-dir. `--json FILE` appends the rows, with `--label`, for comparisons.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from minigpt.cli.train import parse_args, setup


def measure(train_argv: list[str]) -> list[dict]:
    """Train with `train_argv`; one row per evaluation."""
    with tempfile.TemporaryDirectory() as out:
        args = parse_args([*train_argv, "--eval-iters", "all", "--out-dir", out, "--overwrite", "--no-progress"])
        trainer = setup(args)
        rows, start, in_eval = [], time.perf_counter(), [0.0]
        evaluate = trainer.evaluate

        def timed_evaluate() -> dict[str, float]:
            t0 = time.perf_counter()
            trained = t0 - start - in_eval[0]  # the evaluations so far do not count
            metrics = evaluate()
            in_eval[0] += time.perf_counter() - t0
            rows.append({"step": trainer.state.step, "tokens": trainer.state.tokens_seen,
                         "train_seconds": round(trained, 1),
                         "val_loss": metrics.get("val_loss"), "val_bpb": metrics.get("val_bpb"),
                         "train_loss": metrics.get("train_loss")})
            return metrics

        trainer.evaluate = timed_evaluate
        trainer.fit()
    return rows


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ours, train_argv = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--label", default="run")
    p.add_argument("--json", type=Path, default=None, help="append the rows to this JSON-lines file")
    opts = p.parse_args(ours)
    load = os.getloadavg()[0]
    rows = measure(train_argv)
    print(f"{opts.label}: {' '.join(train_argv)} (load average {load:.1f} at the start)")
    print("| step | tokens | train s | val loss | val bpb | train loss |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['step']} | {r['tokens']:,} | {r['train_seconds']:.0f} | {r['val_loss']:.3f} | "
              f"{r['val_bpb']:.3f} | {r['train_loss']:.3f} |")
    if opts.json:
        with open(opts.json, "a", encoding="utf-8") as f:
            f.writelines(json.dumps({"label": opts.label, "load": load, **r}) + "\n" for r in rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
