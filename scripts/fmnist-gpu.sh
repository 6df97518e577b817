#!/usr/bin/env bash
# The GPU half of the Fashion-MNIST experiment: the training runs and the 10k-sample sampling
# runs that take hours on the 2-core CPU, with a CUDA build
# (`cargo build --release --features cuda --target-dir target-cuda`). Same recipes, flags and
# sampling protocol as scripts/fmnist-experiment.sh; every stage skips what is already done.
#
#   scripts/fmnist-gpu.sh train    # DyDiT λ = 0.7 / 0.3 from the bundled DiT; SiT + DySiT λ = 0.5
#   scripts/fmnist-gpu.sh latte    # Latte + DyLatte λ = 0.5 on moving Fashion-MNIST clips
#   scripts/fmnist-gpu.sh sample   # 10k samples per image row → RUNS/fid10k-gpu/NAME.npz (+ .json)
#   scripts/fmnist-gpu.sh fid      # FID of each .npz against the 10k test images (any machine
#                                  # with the FID weights; the CPU here)
#
# Measured on one H100 (2026-11-27): a 500-step DyDiT fine-tune (batch 32) in 80 s (6.2 it/s;
# 1.1 it/s on the 2-core CPU), SiT pre-training 11 it/s at batch 64, DyLatte 6.9 it/s at batch
# 32; 10k DDPM-50 samples at batch 400 in 42–71 s per model.
#
# Knobs (environment): DYDIT (binary), RUNS (run dir), DATA_DIR (the Fashion-MNIST IDX files,
# images and labels), SIT_STEPS, LATTE_STEPS, FT_STEPS, SAMPLE_BATCH, MODELS (sample rows,
# NAME=CHECKPOINT ...), FID_DYDIT (binary for the fid stage).
set -uo pipefail
cd "$(dirname "$0")/.."

D=${DYDIT:-target-cuda/release/dydit}
R=${RUNS:-runs}
F=${DATA_DIR:-/usr/share/datasets/fashion-mnist}
SIT_STEPS=${SIT_STEPS:-4500}
LATTE_STEPS=${LATTE_STEPS:-4000}
FT_STEPS=${FT_STEPS:-500}
# Samples use per-sample noise streams (pipeline::PerSampleNoise): the batch size changes the
# speed, not the images, so the GPU takes 400 at a time where the CPU took 40.
SAMPLE_BATCH=${SAMPLE_BATCH:-400}
DATA=(--data "$F/train-images-idx3-ubyte.gz" --pad-to 32)
FT=(--steps "$FT_STEPS" --batch-size 32 --lr 1e-4 --router-lr 1e-3 --warmup-steps 200
    --ema-decay 0.99 --reorder-by-importance --ckpt-every 100 --log-every 50 --seed 2)
# shellcheck source=scripts/fmnist-recipes.sh
source scripts/fmnist-recipes.sh
step() { echo "== $* ($(date +%T))"; }

# The CUDA 13 libraries: the system toolkit's or a PyTorch cu13 install's.
for d in /usr/local/cuda/lib64 $(python3 -c 'import nvidia, os; print(os.path.join(nvidia.__path__[0], "cu13", "lib"))' 2>/dev/null); do
    [ -d "$d" ] && export LD_LIBRARY_PATH="$d:${LD_LIBRARY_PATH:-}"
done

finetune() { # NAME FROM λ [data and extra flags]
    local out="$R/$1"
    [ -f "$out/model.safetensors" ] && return 0
    step "fine-tune $1"
    if [ -d "$out/ckpt" ]; then
        "$D" finetune --resume --out "$out"
    else
        "$D" finetune --from "$2" --target-ratio "$3" "${@:4}" "${FT[@]}" --out "$out"
    fi
}

train() {
    finetune fmnist-dydit-0.7 fmnist-dit 0.7 "${DATA[@]}"
    finetune fmnist-dydit-0.3 fmnist-dit 0.3 "${DATA[@]}"
    local s="$R/fmnist-sit"
    [ -f "$s/model.safetensors" ] || step "pre-train SiT ($SIT_STEPS it.)"
    pretrain_run "$s" "$SIT_STEPS" 100 --family SiT
    [ -f "$s/model.safetensors" ] &&
        finetune fmnist-dysit-0.5 "$s/model.safetensors" 0.5 "${DATA[@]}"
}

# Latte on 16-frame clips of garments (16²) bouncing on a 32² canvas: the recipe of the README's
# CPU run (batch 32, lr 5e-4, 4000 iterations).
latte() {
    local l="$R/fmnist-latte"
    [ -f "$l/model.safetensors" ] || step "pre-train Latte ($LATTE_STEPS it.)"
    latte_pretrain_run "$l" "$LATTE_STEPS" 100
    [ -f "$l/model.safetensors" ] && finetune fmnist-dylatte-0.5 "$l/model.safetensors" 0.5 \
        "${LATTE_CLIPS[@]}" --complete-model-steps 75
}

# The FID-10k protocol of the README: DDPM-50 (SiT: Heun on 26 grid points), cfg 1.5, seed 0,
# balanced classes; the JSON beside each .npz holds the GFLOPs of the real masks and the time.
sample() {
    mkdir -p "$R/fid10k-gpu"
    local models=${MODELS:-"dit=fmnist-dit dydit-0.5=fmnist-dydit-0.5 dydit-0.7=$R/fmnist-dydit-0.7/model.safetensors dydit-0.3=$R/fmnist-dydit-0.3/model.safetensors sit=$R/fmnist-sit/model.safetensors dysit-0.5=$R/fmnist-dysit-0.5/model.safetensors"}
    for entry in $models; do
        local name=${entry%%=*} ckpt=${entry#*=} steps=(--num-steps 50 --sampler ddpm)
        local out="$R/fid10k-gpu/$name"
        [ -f "$out.npz" ] && continue
        case "$name" in *sit*) steps=(--num-steps 26 --method heun) ;; esac
        step "10k samples: $name"
        "$D" sample --ckpt "$ckpt" --npz "$out.npz" --num-samples 10000 "${steps[@]}" \
            --cfg-scale 1.5 --seed 0 --batch-size "$SAMPLE_BATCH" --json > "$out.json.tmp" &&
            mv "$out.json.tmp" "$out.json" && cat "$out.json"
    done
}

fid() {
    local fd=${FID_DYDIT:-$D} stats=weights/fid_stats_fashion_test.safetensors
    for npz in "$R"/fid10k-gpu/*.npz; do
        local out="${npz%.npz}.fid.json"
        [ -f "$out" ] && continue
        local real=(--real "$stats")
        [ -f "$stats" ] ||
            real=(--real "$F/t10k-images-idx3-ubyte.gz" --save-real-stats "$stats")
        step "FID: $npz"
        "$fd" fid "${real[@]}" --fake "$npz" --json > "$out.tmp" && mv "$out.tmp" "$out" &&
            cat "$out"
    done
}

for s in "$@"; do
    case "$s" in
        train) train ;;
        latte) latte ;;
        sample) sample ;;
        fid) fid ;;
        *) echo "unknown stage $s (train|latte|sample|fid)"; exit 2 ;;
    esac
done
