#!/usr/bin/env bash
# GPU readiness in one go (issue 24): run on a machine with one CUDA GPU, from the checkout:
#     bash scripts/gpu_check.sh            # DEVICE=cuda:1 bash scripts/gpu_check.sh for another GPU
# Prints one summary line per item (PASS/FAIL, seconds, the item's last output line); the full
# output of each item is kept in $LOG_DIR. Every command here is also run on the CPU by the tests.
set -u
cd "$(dirname "$0")/.."
DEVICE="${DEVICE:-cuda}"
PY="${PYTHON:-python3}"
LOG_DIR="${LOG_DIR:-$(mktemp -d -t minigpt-gpu-check.XXXXXX)}"
RUN_DIR="$LOG_DIR/runs"
TRAIN=(--data the-verdict --preset gpt2 --n-layers 6 --n-heads 6 --emb-dim 384 --context-length 256
       --batch-size 8 --max-steps 50 --eval-interval 1000 --log-interval 10 --dtype bfloat16 --overwrite)
failed=0

# item NAME COMMAND...: run COMMAND, print one line, keep its output in $LOG_DIR/NAME.log
item() {
    local name="$1"; shift
    local start=$SECONDS status last
    "$@" >"$LOG_DIR/$name.log" 2>&1
    status=$?
    last="$(grep -v '^\s*$' "$LOG_DIR/$name.log" | tail -n 1 | cut -c1-160)"
    if [ "$status" -eq 0 ]; then
        printf 'PASS %-16s %4ds  %s\n' "$name" $((SECONDS - start)) "$last"
    else
        printf 'FAIL %-16s %4ds  exit %d: %s\n' "$name" $((SECONDS - start)) "$status" "$last"
        failed=$((failed + 1))
    fi
}

echo "minigpt GPU check on $DEVICE; logs in $LOG_DIR"
item cuda-available "$PY" -c "import sys, torch; ok = torch.cuda.is_available(); print(torch.__version__, torch.cuda.get_device_name(0) if ok else 'no CUDA'); sys.exit(0 if ok else 1)"
item cuda-tests "$PY" -m pytest -q -m "not repro" -k cuda tests
item bench-quick "$PY" scripts/bench.py --device "$DEVICE" --quick --json "$LOG_DIR/bench.json"
item train-bf16 "$PY" -m minigpt.train "${TRAIN[@]}" --device "$DEVICE" --out-dir "$RUN_DIR/bf16"
item train-bf16-compile "$PY" -m minigpt.train "${TRAIN[@]}" --device "$DEVICE" --compile --out-dir "$RUN_DIR/compile"
item torchrun-1 "$PY" -m torch.distributed.run --standalone --nproc_per_node 1 -m minigpt.train "${TRAIN[@]}" --device "$DEVICE" --out-dir "$RUN_DIR/torchrun"
item generate-bf16 "$PY" -m minigpt.generate --preset gpt2 --seed 0 --device "$DEVICE" --dtype bfloat16 --prompt "Every effort moves you" --max-new-tokens 100
item generate-int8 "$PY" -m minigpt.generate --preset gpt2 --seed 0 --device "$DEVICE" --weights int8 --prompt "Every effort moves you" --max-new-tokens 20
item peak-memory "$PY" -c "import json, sys; rows = json.load(open(sys.argv[1]))['training']; print('peak GPU MB (bench training):', ', '.join(f\"{r['contender']} {r['dtype']} {r['peak_cuda_mb']:.0f}\" for r in rows))" "$LOG_DIR/bench.json"
echo "$failed item(s) failed"
exit $((failed > 0))
