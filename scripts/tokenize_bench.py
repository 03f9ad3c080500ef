"""Tokenization speed and memory of the token cache on a large corpus, for .txt, JSONL and parquet.

Builds, in a scratch directory, a text file of `--gb` gigabytes (the lines of the given source
texts in a new random order per block), a JSONL file of their sentences as short records (as
BookCorpus is) of about the same size, and a parquet file of the same records; then tokenizes
each in a fresh subprocess (`load_tokens`, cache in the scratch directory) and prints a table of
wall time, MB/s of text and peak RSS of the main process and of its largest worker. The scratch
directory is deleted at the end unless `--keep`.

    python scripts/tokenize_bench.py --source ../shared/data/tinyshakespeare.txt \\
        --source ../shared/data/the-verdict.txt --gb 2
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
MEASURE = """
import json, resource, sys, time
from minigpt.token_cache import load_tokens
from minigpt.tokenizer import get_tokenizer
path, cache, workers = sys.argv[1], sys.argv[2], int(sys.argv[3]) or None
tokenizer = get_tokenizer()
start = time.perf_counter()
corpus = load_tokens(path, tokenizer, cache_dir=cache, progress=False, workers=workers)
seconds = time.perf_counter() - start
me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
cpu = me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime
print(json.dumps({"seconds": seconds, "cpu": cpu, "tokens": len(corpus.ids), "docs": len(corpus.doc_starts),
                  "rss_main": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                  "rss_worker": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024}))
"""


def source_lines(sources: list[Path]) -> list[str]:
    return [line for s in sources for line in s.read_text(encoding="utf-8").splitlines(keepends=True)]


def build_text(path: Path, lines: list[str], size: int, rng: np.random.Generator) -> int:
    """Blocks of the lines in a new order each until `size` bytes; the bytes written."""
    written = 0
    with open(path, "wb") as f:
        while written < size:
            block = "".join(lines[i] for i in rng.permutation(len(lines))).encode("utf-8")
            f.write(block)
            written += len(block)
    return written


def sentences(lines: list[str]) -> list[str]:
    text = " ".join(line.strip() for line in lines if line.strip())
    return [s for s in re.split(r"(?<=[.!?])\s+", text) if s]


def build_records(jsonl: Path, parquet: Path | None, sents: list[str], size: int, rng: np.random.Generator) -> int:
    """A JSONL file of {"text": sentence} records of about `size` bytes, and the same records as a
    parquet file (if pyarrow is installed); the bytes of text written."""
    writer = None
    if parquet is not None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        writer = pq.ParquetWriter(parquet, pa.schema([("text", pa.string())]))
    written = text_bytes = 0
    with open(jsonl, "wb") as f:
        while written < size:
            batch = [sents[i] for i in rng.permutation(len(sents))]
            data = "".join(json.dumps({"text": s}) + "\n" for s in batch).encode("utf-8")
            f.write(data)
            written += len(data)
            text_bytes += sum(len(s.encode("utf-8")) for s in batch)
            if writer is not None:
                writer.write_table(pa.table({"text": batch}), row_group_size=1 << 18)
    if writer is not None:
        writer.close()
    return text_bytes


def measure(path: Path, cache: Path, workers: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", MEASURE, str(path), str(cache), str(workers)], env=env,
                         capture_output=True, text=True, check=True)
    shutil.rmtree(cache, ignore_errors=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def machine() -> str:
    load = os.getloadavg()
    cpuinfo = Path("/proc/cpuinfo")
    flags = sorted(set(re.findall(r"avx\w*", cpuinfo.read_text()))) if cpuinfo.exists() else []
    return f"{os.cpu_count()} CPUs, load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}, flags: {' '.join(flags)}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, action="append", required=True, help="a UTF-8 text to repeat")
    parser.add_argument("--gb", type=float, default=2.0, help="size of the text corpus (default: 2)")
    parser.add_argument("--records-gb", type=float, default=None, help="size of the JSONL (default: --gb)")
    parser.add_argument("--workers", type=int, default=0, help="worker processes (default: one per CPU)")
    parser.add_argument("--kinds", default="txt,jsonl,parquet", help="which corpora to measure")
    parser.add_argument("--dir", type=Path, default=None, help="scratch directory (default: a new one in /tmp)")
    parser.add_argument("--keep", action="store_true", help="keep the scratch directory")
    args = parser.parse_args(argv)
    scratch = args.dir or Path(tempfile.mkdtemp(prefix="minigpt-tokbench-"))
    scratch.mkdir(parents=True, exist_ok=True)
    kinds = args.kinds.split(",")
    size, rng = int(args.gb * 1e9), np.random.default_rng(0)
    try:
        lines = source_lines(args.source)
        corpora = {}
        if "txt" in kinds:
            corpora["txt"] = (scratch / "corpus.txt", build_text(scratch / "corpus.txt", lines, size, rng))
        if "jsonl" in kinds or "parquet" in kinds:
            parquet = scratch / "sentences.parquet" if "parquet" in kinds else None
            records = int((args.records_gb or args.gb) * 1e9)
            text_bytes = build_records(scratch / "sentences.jsonl", parquet, sentences(lines), records, rng)
            if "jsonl" in kinds:
                corpora["jsonl"] = (scratch / "sentences.jsonl", text_bytes)
            if parquet is not None:
                corpora["parquet"] = (parquet, text_bytes)
        print(machine(), flush=True)
        print("| input | file GB | text GB | documents | tokens | seconds | MB/s of text | CPU s | MB per CPU s | "
              "peak RSS main | peak RSS worker |\n|---|---|---|---|---|---|---|---|---|---|---|", flush=True)
        for kind, (path, text_bytes) in corpora.items():
            r = measure(path, scratch / f"cache-{kind}", args.workers)
            print(f"| {kind} | {path.stat().st_size / 1e9:.2f} | {text_bytes / 1e9:.2f} | {r['docs']:,} | "
                  f"{r['tokens']:,} | {r['seconds']:.0f} | {text_bytes / 1e6 / r['seconds']:.1f} | {r['cpu']:.0f} | "
                  f"{text_bytes / 1e6 / r['cpu']:.2f} | "
                  f"{r['rss_main'] / 2**20:.0f} MiB | {r['rss_worker'] / 2**20:.0f} MiB |", flush=True)
        print(machine())
    finally:
        if not args.keep:
            shutil.rmtree(scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
