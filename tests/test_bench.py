"""`scripts/bench.py --quick` runs end to end (a smoke test: no timings are asserted)."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _bench():
    spec = importlib.util.spec_from_file_location("bench", ROOT / "scripts" / "bench.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("weights", [None, "int8", "bfloat16"])
def test_generation_worker_on_a_small_model_counts_the_bytes_a_step_reads(weights):
    bench = _bench()
    spec = {"kind": "minigpt", "dtype": "fp32", "batch": 2, "weights": weights, "new_tokens": 12, "device": "cpu",
            "repeats": 1, "shape_gen": [2, 2, 32, 64]}
    r = bench.generate_worker(spec)
    assert r["tokens_per_s"] > 0
    # The blocks' and the (tied) head's weights, in their stored bytes; not the embedding tables.
    linear = 2 * (4 * 32 * 32 + 2 * 4 * 32 * 32) + 50257 * 32
    per_weight = {None: 4, "int8": 1, "bfloat16": 2}[weights]
    assert linear * per_weight < r["weight_bytes"] < linear * per_weight + 4 * 60_000


@pytest.mark.slow
def test_quick_benchmark_runs_and_writes_its_table(tmp_path):
    out = tmp_path / "bench.json"
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench.py"), "--quick", "--device", "cpu",
                             "--json", str(out)],
                            capture_output=True, text=True, timeout=1200, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    assert report["ceilings"]["fp32_gflops"] > 0 and report["ceilings"]["copy_gbps"] > 0
    train = {(r["dtype"], r["contender"]): r for r in report["training"]}
    # bf16 training is skipped (and said so) where the CPU only emulates bfloat16.
    dtypes = ("fp32",) if report["ceilings"]["bf16_emulated"] else ("fp32", "bf16")
    assert set(train) == {(d, c) for d in dtypes for c in ("minigpt", "hf")}
    assert ("emulates bfloat16" in result.stdout) == report["ceilings"]["bf16_emulated"]
    # Same model size on both sides, and every contender trains (finite, roughly ln(vocab) losses).
    assert train["fp32", "minigpt"]["params"] == train["fp32", "hf"]["params"]
    assert all(9 < r["losses"][0] < 12 and r["tokens_per_s"] > 0 for r in train.values())
    gen = {r["contender"] + "/" + r["dtype"]: r for r in report["generation"]}
    assert {"minigpt/fp32", "minigpt/bf16", "minigpt/int8 w", "minigpt/bf16 w", "minigpt-nocache/fp32",
            "hf/fp32"} <= set(gen)
    assert gen["minigpt/int8 w"]["weight_bytes"] < gen["minigpt/bf16 w"]["weight_bytes"] < gen["minigpt/fp32"][
        "weight_bytes"]
    assert "vs HF" in result.stdout and "generation" in result.stdout
