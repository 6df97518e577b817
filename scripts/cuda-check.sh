#!/usr/bin/env bash
# The GPU checks of a CUDA build (`cargo build --release --features cuda`), in one pass:
#   1. every golden file on the GPU, f32 (the CPU tolerances) and the forwards in bf16;
#   2. `dydit bench` static forward, f32 and bf16, beside PyTorch on the same card
#      (scripts/bench_pytorch.py --device cuda, when python3 has torch);
#   3. `dydit bench --dynamic`: static vs DyDiT (λ = 0.5 synthetic routers) sampling steps;
#   4. `dydit sample` (the README's main job) and `dydit bench --ckpt fmnist-dit,fmnist-dydit-0.5`: whole sampling runs of the bundled Fashion-MNIST models.
# Results go to OUTDIR (default runs/cuda-check): golden-*.txt and *.jsonl, one JSON line per row.
#
# Usage: scripts/cuda-check.sh [DYDIT_BINARY] [GOLDEN_DIR]
#        (defaults: target/release/dydit, ../shared/golden)
set -uo pipefail
BIN=${1:-target/release/dydit}
GOLDEN=${2:-../shared/golden}
OUTDIR=${OUTDIR:-runs/cuda-check}
MODELS=${MODELS:-DiT-S/2,DiT-XL/2}
BATCHES=${BATCHES:-2,8,64}
mkdir -p "$OUTDIR"
step() { echo "== $* ($(date +%T))"; }

step "device"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUTDIR/gpu.txt"

step "golden f32"
"$BIN" golden --skip-unsupported "$GOLDEN"/*.safetensors 2>&1 | tee "$OUTDIR/golden-f32.txt"
step "golden bf16 (forwards)"
"$BIN" golden --dtype bf16 "$GOLDEN"/{dit,dydit,latte,dyflux}_forward_*.safetensors 2>&1 |
    tee "$OUTDIR/golden-bf16.txt"

for dt in f32 bf16; do
    step "forward $dt"
    "$BIN" bench --model "$MODELS" --batch "$BATCHES" --dtype "$dt" --warmup 3 --runs 10 --json |
        tee "$OUTDIR/forward-$dt.jsonl"
    if python3 -c 'import torch' 2>/dev/null; then
        python3 scripts/bench_pytorch.py --device cuda --model "$MODELS" --batch "$BATCHES" \
            --dtype "$dt" --warmup 3 --runs 10 --json | tee "$OUTDIR/forward-pytorch-$dt.jsonl"
    fi
    step "static vs dynamic $dt"
    "$BIN" bench --dynamic --model "$MODELS" --batch "$BATCHES" --dtype "$dt" --warmup 2 --runs 5 \
        --json | tee "$OUTDIR/dynamic-$dt.jsonl"
done

step "the main job on the GPU: a grid from the bundled DyDiT"
"$BIN" sample --out "$OUTDIR/sample-cuda.png" --json | tee "$OUTDIR/sample-cuda.json"

step "sampling runs of the bundled models"
"$BIN" bench --ckpt fmnist-dit,fmnist-dydit-0.5 --batch 64 --grid-steps 250 --runs 3 --json |
    tee "$OUTDIR/sample-bundled.jsonl"
step "done"
