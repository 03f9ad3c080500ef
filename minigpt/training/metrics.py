"""Where a run's numbers go: `metrics.jsonl`, optionally TensorBoard or Weights & Biases, the progress bar."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from ..errors import ConfigError, require
from ..files import atomic_file, check_storage

Reporter = Callable[[dict[str, Any]], None]


def _ignore(record: dict[str, Any]) -> None:
    pass


def make_reporter(report_to: str, out_dir: Path) -> Reporter:
    """A callable taking each metrics record: TensorBoard, Weights & Biases, or nothing."""
    if report_to == "none":
        return _ignore
    if report_to == "tensorboard":
        require("tensorboard", "tensorboard", "--report-to tensorboard")
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(out_dir / "tensorboard"))

        def to_tensorboard(record: dict[str, Any]) -> None:
            for key in ("loss", "lr", "train_loss", "val_loss"):
                if key in record:
                    writer.add_scalar(key, record[key], record["step"])
            writer.flush()
        return to_tensorboard
    if report_to == "wandb":
        run = require("wandb", "wandb", "--report-to wandb").init(project="minigpt", dir=str(out_dir))
        return lambda record: run.log({k: v for k, v in record.items()
                                       if isinstance(v, (int, float)) and k != "step"}, step=record["step"])
    raise ConfigError(f"unknown --report-to {report_to!r}; use none, tensorboard or wandb")


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl; unreadable lines (one cut short by a crash or a full disk)
    are left out, and reported on stderr."""
    records, bad = [], []
    for lineno, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(dict(json.loads(line)))
        except (json.JSONDecodeError, TypeError, ValueError):
            bad.append(lineno)
    if bad:
        print(f"{path}: left out unreadable line(s) {', '.join(map(str, bad))} (cut short by an interrupted "
              "write?)", file=sys.stderr)
    return records


def keep_metrics_until(path: Path, step: int) -> None:
    """Drop metrics logged after `step` by the run being resumed (they will be logged again);
    the file is replaced atomically, so an interruption leaves the old one whole."""
    if not path.exists():
        return
    kept = [r for r in read_metrics(path) if r.get("step", 0) <= step]
    try:
        with atomic_file(path, "w") as f:
            f.write("".join(json.dumps(r) + "\n" for r in kept))
    except OSError as e:
        check_storage(e, path, "not rewritten; the old file is intact")
        raise


class MetricsLog:
    """One JSON record per line in `path`, each also sent to the `report_to` service.
    Disabled (`enabled=False`) on all ranks but the first, which alone writes."""

    def __init__(self, path: Path, report_to: str, enabled: bool = True) -> None:
        self.path, self.enabled = path, enabled
        self.reporter = make_reporter(report_to, path.parent) if enabled else _ignore

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        try:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as e:
            check_storage(e, self.path, "a record was not logged")
            raise
        self.reporter(record)


class Progress:
    """The steps' progress bar, showing the last loss read, learning rate and tokens per second."""

    def __init__(self, total: int, initial: int, tokens_seen: int, enabled: bool) -> None:
        self.bar = tqdm(total=total, initial=initial, disable=not enabled, unit="step", dynamic_ncols=True)
        self.t0, self.tokens0 = time.perf_counter(), tokens_seen
        self.shown: dict[str, str] = {}

    def show(self, loss: float | None, lr: float) -> None:
        """The loss the host last read (every --log-interval steps) and the rate."""
        if loss is not None:
            self.shown.update(loss=f"{loss:.3f}", lr=f"{lr:.2e}")

    def update(self, tokens_seen: int) -> None:
        """One more step done."""
        if self.bar.disable:
            return
        elapsed = time.perf_counter() - self.t0
        self.bar.set_postfix(**self.shown, tok_s=f"{(tokens_seen - self.tokens0) / max(elapsed, 1e-9):.0f}")
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()
