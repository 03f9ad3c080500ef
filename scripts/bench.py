"""minigpt against Hugging Face transformers, side by side, in one run.

    python scripts/bench.py            # the full table
    python scripts/bench.py --quick    # a smaller, shorter run
    python scripts/bench.py --device cuda --json bench.json

First the machine's ceilings (matmul GFLOP/s in float32 and bfloat16, copy bandwidth), then
training and generation throughput. On a CPU that only emulates bfloat16 (no AVX512-BF16 or
AMX: its bf16 matmul peak is below float32's) the bf16 training rows and Hugging Face's bf16
generation are skipped unless --emulated-bf16 asks for them (then with 1 warm-up and 2 timed
steps, and minigpt's bf16 MFU against the float32 peak: it multiplies in float32 there). Every
contender runs in a subprocess of its own, so its peak memory is its own; each row is the median
over timed repetitions after warm-up.

What is compared:
- Training: forward + backward + AdamW step on random token windows. Both models are GPT-2 with
  qkv biases and a tied output head (equal parameter counts); both use `torch.optim.AdamW(fused=True)`
  (Hugging Face's Trainer default with torch >= 2.8) and the same threads, batch and sequence length.
  minigpt runs as `python -m minigpt.train` does (its CPU backend and allocator setting included,
  the loss from `model(x, targets=y)` without whole logits); Hugging Face runs as a user's process
  would (logits, then cross-entropy in float32, as its own loss does), plus a row with minigpt's
  allocator setting. "bf16" means autocast to bfloat16 with float32 weights, for both (minigpt's
  loss keeps its softmax in float32, and its output head too where the CPU only emulates bfloat16:
  see `minigpt.backends.cpu`).
  MFU = model FLOPs per second / measured matmul peak of the dtype, counting 6 x parameters
  (without the position embedding) per token plus attention 12 x layers x context x emb_dim.
- Generation: greedy, 100 new tokens after an 8-token prompt, GPT-2 124M shape, batch 1 and 8.
  minigpt with and without its KV cache, in float32 and in bfloat16 (the whole model), and with
  weight-only quantized linear layers (`quantize_weights`: "int8 w" and "bf16 w", float32
  activations); Hugging Face `generate` (sdpa, its own cache) in float32. The floor is the time to
  read the weights a step reads (every layer's and the head's, not the embedding tables) once per
  step at the measured copy bandwidth; "of floor" is the share of that speed reached.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # minigpt from this checkout, installed or not (workers get it on PYTHONPATH)

TRAIN_CONFIGS = {
    # name: (n_layers, n_heads, emb_dim, context, batch)
    "seed-124M": (12, 12, 768, 256, 2),
    "small": (6, 6, 384, 256, 8),
}
QUICK_TRAIN_CONFIGS = {"small": (6, 6, 384, 256, 8)}


# ------------------------------------------------------------------------------------------------
# timing helpers


def timed(fn, device: torch.device) -> float:
    """Seconds one call of `fn` takes (CUDA events on a GPU, wall clock on the CPU)."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize(device)
        return start.elapsed_time(end) / 1000
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def peak_rss_mb() -> float:
    """This process's peak resident memory. Linux's ru_maxrss carries the parent's peak over
    fork and exec, so the kernel's per-process high-water mark (VmHWM) is read where it exists."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def peak_cuda_mb(device: torch.device) -> float | None:
    """Peak memory PyTorch allocated on the GPU (None on other devices)."""
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None


# ------------------------------------------------------------------------------------------------
# ceilings


def matmul_gflops(n: int, m: int, k: int, dtype: torch.dtype, device: torch.device, seconds: float) -> float:
    """The best rate of (n x k) @ (k x m) over `seconds` of repetitions: a peak, not a typical value.
    In float32 on the CPU, the better of torch's `@` and oneDNN's product (`minigpt.backends.cpu.mm_nt`,
    what minigpt's layers use there), so that MFU is measured against what the machine can do."""
    from minigpt.backends.cpu import mm_nt, onednn_float32

    a = torch.randn(n, k, device=device, dtype=dtype)
    b = torch.randn(k, m, device=device, dtype=dtype)
    products = [lambda: a @ b]
    if onednn_float32(a, b):
        b_t = b.t().contiguous()
        products.append(lambda: mm_nt(a, b_t))
    best = 0.0
    for product in products:
        product()
        times = []
        deadline = time.perf_counter() + seconds
        while time.perf_counter() < deadline or len(times) < 3:
            times.append(timed(product, device))
        best = max(best, 2 * n * m * k / min(times) / 1e9)
    return best


def copy_gbps(device: torch.device, mb: int = 512) -> float:
    src = torch.ones(mb * 2**20 // 4, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = [timed(lambda: dst.copy_(src), device) for _ in range(7)]
    return 2 * src.numel() * 4 / statistics.median(times) / 1e9  # read + write


# GPT-2 small's own largest multiplies at 512 tokens (the MLP and the output head), and square 2048.
MATMUL_SHAPES = {"mlp": (512, 3072, 768), "head": (512, 50304, 768), "2048^3": (2048, 2048, 2048)}


def ceilings(device: torch.device, quick: bool) -> dict:
    """Matmul GFLOP/s per dtype and shape, the peak per dtype (the best shape), copy GB/s."""
    seconds = 0.5 if quick else 1.5
    out: dict = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        rates = {}
        for shape, dims in MATMUL_SHAPES.items():
            rates[shape] = matmul_gflops(*dims, dtype, device, seconds)
            if name == "bf16" and rates[shape] < out["fp32_gflops"] / 4:
                break  # emulated bfloat16: the larger shapes would take minutes to say the same
        out[f"{name}_gflops_by_shape"] = rates
        out[f"{name}_gflops"] = max(rates.values())
    out["copy_gbps"] = copy_gbps(device, 256 if quick else 1024)
    # A CPU without bfloat16 arithmetic (AVX512-BF16, AMX) emulates it, far below float32.
    out["bf16_emulated"] = device.type == "cpu" and out["bf16_gflops"] < out["fp32_gflops"]
    return out


# ------------------------------------------------------------------------------------------------
# contenders (each runs in its own process: `bench.py --worker JSON`)


def build(kind: str, n_layers: int, n_heads: int, emb_dim: int, context: int, device: torch.device):
    """The model; minigpt's as the commands build it, with its CPU backend applied (a no-op off the CPU)."""
    torch.manual_seed(0)
    if kind == "minigpt":
        from minigpt.backends import optimize_for_cpu
        from minigpt.config import GPTConfig
        from minigpt.model import GPTModel

        cfg = GPTConfig(context_length=context, emb_dim=emb_dim, n_heads=n_heads, n_layers=n_layers,
                        drop_rate=0.0, qkv_bias=True, tie_weights=True)
        return optimize_for_cpu(GPTModel(cfg).to(device))
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(n_positions=context, n_embd=emb_dim, n_head=n_heads, n_layer=n_layers, resid_pdrop=0.0,
                     embd_pdrop=0.0, attn_pdrop=0.0, attn_implementation="sdpa")
    model = GPT2LMHeadModel(cfg).to(device)
    assert model.config._attn_implementation == "sdpa"
    return model


def loss_of(kind: str, model, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Each library's training loss as its users compute it: minigpt's trainer asks the model
    (which skips the full logits), Hugging Face's returns logits for cross-entropy."""
    if kind == "minigpt":
        return model(x, targets=y)
    return torch.nn.functional.cross_entropy(model(x).logits.flatten(0, 1).float(), y.flatten())


def train_worker(spec: dict) -> dict:
    device = torch.device(spec["device"])
    n_layers, n_heads, emb_dim, context, batch = spec["shape"]
    kind = spec["kind"]
    if spec.get("allocator"):
        from minigpt.backends import keep_freed_memory

        keep_freed_memory()
    model = build(kind, n_layers, n_heads, emb_dim, context, device).train()
    if kind == "minigpt":
        from minigpt.training.optim import configure_optimizer

        optimizer = configure_optimizer(model, 1e-4, 0.1, device)
    else:
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, fused=True)
    amp = torch.autocast(device.type, dtype=torch.bfloat16) if spec["dtype"] == "bf16" else None
    gen = torch.Generator().manual_seed(0)
    data = torch.randint(0, 50257, (8, batch, context + 1), generator=gen)
    losses = []

    def step(i: int) -> None:
        xy = data[i % len(data)].to(device)
        x, y = xy[:, :-1], xy[:, 1:]
        with amp or contextlib.nullcontext():
            loss = loss_of(kind, model, x, y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())

    for i in range(spec["warmup"]):
        step(i)
    times = [timed(lambda i=i: step(i), device) for i in range(spec["warmup"], spec["warmup"] + spec["steps"])]
    params = sum(p.numel() for p in model.parameters())
    return {"step_s": statistics.median(times), "tokens_per_s": batch * context / statistics.median(times),
            "params": params, "peak_rss_mb": peak_rss_mb(), "peak_cuda_mb": peak_cuda_mb(device), "losses": losses}


GPT2_SHAPE = (12, 12, 768, 1024)  # n_layers, n_heads, emb_dim, context of the generation rows


def step_bytes(model) -> int:
    """Bytes of the weights one decoding step reads: every parameter and buffer but the embedding
    tables (a lookup reads one row), the output head's weight included even when tied to one."""
    tables = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    head = model.get_output_embeddings().weight if hasattr(model, "get_output_embeddings") else model.out_head.weight
    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()] if id(t) not in tables or t is head}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def generate_worker(spec: dict) -> dict:
    device = torch.device(spec["device"])
    kind = spec["kind"]
    from minigpt.backends import keep_freed_memory

    if kind.startswith("minigpt"):
        keep_freed_memory()
    model = build("minigpt" if kind.startswith("minigpt") else "hf", *spec.get("shape_gen", GPT2_SHAPE), device).eval()
    dtype = torch.bfloat16 if spec["dtype"] == "bf16" else torch.float32
    model = model.to(dtype)
    if spec.get("weights"):
        from minigpt.backends.quantize import quantize_weights

        model = quantize_weights(model, spec["weights"])
    gen = torch.Generator().manual_seed(1)
    idx = torch.randint(0, 50256, (spec["batch"], 8), generator=gen).to(device)
    n = spec["new_tokens"]
    if kind.startswith("minigpt"):
        from minigpt.generation import generate

        use_cache = kind == "minigpt"

        def run(n: int = n) -> None:
            with torch.inference_mode():
                out = generate(model, idx, n, use_cache=use_cache)
            assert out.shape[1] == 8 + n
    else:
        def run(n: int = n) -> None:
            with torch.inference_mode():
                out = model.generate(idx, attention_mask=torch.ones_like(idx), do_sample=False, max_new_tokens=n,
                                     min_new_tokens=n, pad_token_id=0)
            assert out.shape[1] == 8 + n

    run(10)  # warm-up
    times = [timed(run, device) for _ in range(spec["repeats"])]
    return {"seconds": statistics.median(times), "tokens_per_s": spec["batch"] * n / statistics.median(times),
            "weight_bytes": step_bytes(model), "peak_rss_mb": peak_rss_mb(), "peak_cuda_mb": peak_cuda_mb(device)}


def run_worker(spec: dict, threads: int) -> dict:
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "OMP_NUM_THREADS": str(threads)}
    proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], env=env, capture_output=True,
                          text=True, timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(f"worker {spec} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------------
# the report


def train_flops_per_token(params_no_pos: int, n_layers: int, emb_dim: int, context: int) -> float:
    return 6 * params_no_pos + 12 * n_layers * emb_dim * context


def median_runs(specs: dict, args, key: str) -> dict:
    """Run each contender's worker `args.repeats` times, in rounds (every contender once per round,
    so a slow spell of a shared machine hits them all alike); keep each one's median run by `key`."""
    runs: dict = {label: [] for label in specs}
    for _ in range(args.repeats):
        for label, spec in specs.items():
            runs[label].append(run_worker(spec, args.threads))
    return {label: sorted(rs, key=lambda r: r[key])[len(rs) // 2] for label, rs in runs.items()}


def run_emulated_rows(args, ceil: dict) -> bool:
    """Whether to run the bf16 rows that crawl where the CPU only emulates bfloat16."""
    return args.emulated_bf16 or not ceil["bf16_emulated"]


def bench_training(args, device: torch.device, ceil: dict) -> list[dict]:
    rows = []
    configs = QUICK_TRAIN_CONFIGS if args.quick else TRAIN_CONFIGS
    dtypes = ("fp32", "bf16") if run_emulated_rows(args, ceil) else ("fp32",)
    for name, shape in configs.items():
        n_layers, _, emb_dim, context, batch = shape
        for dtype in dtypes:
            # Emulated bfloat16: Hugging Face's steps take a minute or more, so fewer of them and no
            # +alloc row; minigpt multiplies in float32 there, so its MFU is against float32's peak.
            crawl = dtype == "bf16" and ceil["bf16_emulated"]
            peak = ceil["fp32_gflops"] if dtype == "fp32" or crawl else ceil["bf16_gflops"]
            contenders = [("minigpt", True), ("hf", False)] + ([] if args.quick or crawl else [("hf", True)])
            specs = {kind + (" +alloc" if kind == "hf" and allocator else ""):
                     {"kind": kind, "shape": shape, "dtype": dtype, "device": str(device), "allocator": allocator,
                      "warmup": 1 if crawl else 2, "steps": 2 if crawl else 3 if args.quick else 5}
                     for kind, allocator in contenders}
            results = median_runs(specs, args, "step_s")
            for label, r in results.items():
                flops = train_flops_per_token(r["params"] - context * emb_dim, n_layers, emb_dim, context)
                r.update(config=name, dtype=dtype, contender=label, mfu=flops * r["tokens_per_s"] / (peak * 1e9))
                rows.append(r)
            base = results["hf"]["tokens_per_s"]
            for r in results.values():
                r["vs_hf"] = r["tokens_per_s"] / base
    return rows


def bench_generation(args, device: torch.device, ceil: dict) -> list[dict]:
    rows = []
    n = 20 if args.quick else 100
    for batch in ((1,) if args.quick else (1, 8)):
        contenders = [("minigpt", "fp32"), ("minigpt", "bf16"), ("minigpt", "int8 w"), ("minigpt", "bf16 w"),
                      ("minigpt-nocache", "fp32"), ("hf", "fp32")]
        if not args.quick and run_emulated_rows(args, ceil):
            contenders.append(("hf", "bf16"))
        specs = {(kind, dtype): {"kind": kind, "dtype": "bf16" if dtype == "bf16" else "fp32", "batch": batch,
                                 "weights": WEIGHT_ROWS.get(dtype), "new_tokens": n, "device": str(device),
                                 "repeats": 1 if args.quick or kind == "minigpt-nocache" else 2}
                 for kind, dtype in contenders}
        results = median_runs(specs, args, "seconds")
        hf = results[("hf", "fp32")]["tokens_per_s"]
        for (kind, dtype), r in results.items():
            floor = batch * ceil["copy_gbps"] * 1e9 / r["weight_bytes"]
            r.update(batch=batch, dtype=dtype, contender=kind, floor_tokens_per_s=floor,
                     of_floor=r["tokens_per_s"] / floor, vs_hf_fp32=r["tokens_per_s"] / hf)
            rows.append(r)
    return rows


WEIGHT_ROWS = {"int8 w": "int8", "bf16 w": "bfloat16"}  # generation rows with quantize_weights(model, ...)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller, shorter run (a smoke test)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="threads per contender")
    parser.add_argument("--repeats", type=int, default=1,
                        help="processes per row, run in interleaved rounds; each row shows its median one "
                             "(single runs vary a lot on a shared CPU)")
    parser.add_argument("--only", choices=("train", "generate"), default=None, help="run one half")
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--emulated-bf16", action="store_true",
                        help="on a CPU that only emulates bfloat16, also run the bf16 training rows and Hugging "
                             "Face's bf16 generation (skipped by default: Hugging Face's run several times slower "
                             "than float32 there, minigpt's at about float32's speed)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        spec = json.loads(args.worker)
        result = train_worker(spec) if "shape" in spec else generate_worker(spec)
        print(json.dumps(result))
        return 0

    device = torch.device(args.device)
    import transformers

    print(f"torch {torch.__version__}, transformers {transformers.__version__}, device {device}, "
          f"{args.threads} threads")
    ceil = ceilings(device, args.quick)
    for name in ("fp32", "bf16"):
        shapes = ", ".join(f"{shape} {rate:.0f}" for shape, rate in ceil[f"{name}_gflops_by_shape"].items())
        print(f"matmul {name}: peak {ceil[f'{name}_gflops']:.0f} GFLOP/s ({shapes})")
    print(f"copy bandwidth {ceil['copy_gbps']:.1f} GB/s")
    if ceil["bf16_emulated"]:
        print("this CPU emulates bfloat16 (no AVX512-BF16 or AMX): "
              + ("its bf16 rows run anyway (--emulated-bf16)" if args.emulated_bf16 else
                 "bf16 training and Hugging Face's bf16 generation are skipped (--emulated-bf16 runs them); "
                 "minigpt's bf16 generation stays: one-row bf16 products have a vectorised kernel of their own"))
    report: dict = {"ceilings": ceil, "threads": args.threads, "device": str(device)}
    # Peak memory: the process's RSS on the CPU; what PyTorch allocated on the GPU under CUDA.
    mem_key, mem_title = ("peak_cuda_mb", "GPU MB") if device.type == "cuda" else ("peak_rss_mb", "RSS MB")
    if args.only in (None, "train"):
        rows = bench_training(args, device, ceil)
        report["training"] = rows
        print("\ntraining (median step; tokens/s; MFU vs the dtype's matmul peak; peak memory)")
        print(f"{'config':10} {'dtype':5} {'contender':12} {'tokens/s':>9} {'vs HF':>6} {'MFU':>6} {'step ms':>8} "
              f"{mem_title:>7} {'params':>11}")
        for r in rows:
            print(f"{r['config']:10} {r['dtype']:5} {r['contender']:12} {r['tokens_per_s']:9.0f} {r['vs_hf']:5.2f}x "
                  f"{r['mfu']:6.1%} {r['step_s'] * 1000:8.0f} {r[mem_key]:7.0f} {r['params']:11,}")
    if args.only in (None, "generate"):
        rows = bench_generation(args, device, ceil)
        report["generation"] = rows
        print("\ngeneration (greedy, 8-token prompt; new tokens/s; floor = weights read once per step at copy "
              "bandwidth)")
        print(f"{'batch':5} {'dtype':6} {'contender':16} {'tokens/s':>9} {'ms/token':>8} {'vs HF fp32':>10} "
              f"{'floor':>7} {'of floor':>8} {mem_title:>7}")
        for r in rows:
            print(f"{r['batch']:5} {r['dtype']:6} {r['contender']:16} {r['tokens_per_s']:9.1f} "
                  f"{1000 * r['batch'] / r['tokens_per_s']:8.1f} {r['vs_hf_fp32']:9.2f}x "
                  f"{r['floor_tokens_per_s']:7.0f} {r['of_floor']:8.0%} {r[mem_key]:7.0f}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
