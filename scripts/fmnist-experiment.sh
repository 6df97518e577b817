#!/usr/bin/env bash
# The Fashion-MNIST experiment of the README, end to end: pre-train a small pixel-space DiT,
# fine-tune DyDiT at λ = 0.7 / 0.5 / 0.3, evaluate FID and speed, draw the pictures, and write
# the shipped f16 checkpoints. Every stage is resumable and skips what is already done.
#
#   scripts/fmnist-experiment.sh [pretrain|finetune|eval|bench|pictures|ship|sit|latte|peft|fid10k|t2i]...
#   (default: the DiT/DyDiT stages; `sit` and `latte` add the SiT/DySiT and Latte/DyLatte rows;
#   `t2i` the small text-to-image MMDiT and its DyFLUX version)
#
# Knobs (environment): DYDIT (binary), RUNS (run dir), PRE_STEPS, FT_STEPS, FT_BATCH, FID_N,
# FID_STEPS, SIT_STEPS, LATTE_STEPS, VID_N. The README's tables were made with the defaults below.
set -euo pipefail
cd "$(dirname "$0")/.."

D=${DYDIT:-./target/release/dydit}
R=${RUNS:-runs}
F=/usr/share/datasets/fashion-mnist
PRE_STEPS=${PRE_STEPS:-4500}
FT_STEPS=${FT_STEPS:-500}
FT_BATCH=${FT_BATCH:-32}
FID_N=${FID_N:-2000}
FID_STEPS=${FID_STEPS:-50}
LAMBDAS=${LAMBDAS:-"0.7 0.5 0.3"}
# The SiT gets the DiT's pre-training length (the first run stopped at 2134 for session time).
SIT_STEPS=${SIT_STEPS:-4500}
LATTE_STEPS=${LATTE_STEPS:-4000}
VID_N=${VID_N:-500}
VID_STEPS=${VID_STEPS:-50}
LATTE_FT_STEPS=${LATTE_FT_STEPS:-500}
DATA=(--data "$F/train-images-idx3-ubyte.gz" --pad-to 32)
# One sampling protocol for every row: DDPM with 50 respaced steps, cfg 1.5, seed 0, classes
# balanced, FID_N samples (2000 for the README table; 10000 is the issue's FID-10k), FID
# against the 10k test images.
PROTO=(--num-samples "$FID_N" --num-steps "$FID_STEPS" --sampler ddpm --cfg-scale 1.5 --seed 0
       --batch-size 40)

[ -x "$D" ] || cargo build --release
# shellcheck source=scripts/fmnist-recipes.sh
source scripts/fmnist-recipes.sh

pretrain() {
    pretrain_run "$R/fmnist-dit" "$PRE_STEPS" 25
}

finetune() {
    for l in $LAMBDAS; do
        local out="$R/fmnist-dydit-$l"
        [ -f "$out/model.safetensors" ] && continue
        if [ -d "$out/ckpt" ]; then
            "$D" finetune --resume --out "$out"
        else
            # Routers start saturated (bias 15 / 35); --router-lr lets them reach λ in a short
            # run, the rest of the model keeps the recipe's 1e-4.
            "$D" finetune --from "$R/fmnist-dit/model.safetensors" --target-ratio "$l" \
                "${DATA[@]}" --steps "$FT_STEPS" --batch-size "$FT_BATCH" --lr 1e-4 \
                --router-lr 1e-3 --warmup-steps 200 --ema-decay 0.99 --reorder-by-importance \
                --ckpt-every 100 --log-every 10 --seed 2 --out "$out"
        fi
    done
}

eval_all() {
    mkdir -p "$R/eval"
    for m in dit $(for l in $LAMBDAS; do echo "dydit-$l"; done); do
        [ -f "$R/eval/$m.json" ] && continue
        "$D" eval --ckpt "$R/fmnist-$m/model.safetensors" "${PROTO[@]}" \
            --out "$R/eval/$m.json" --grid "$R/eval/$m.png"
    done
}

bench() {
    local list="$R/fmnist-dit/model.safetensors"
    for l in $LAMBDAS; do list="$list,$R/fmnist-dydit-$l/model.safetensors"; done
    "$D" bench --ckpt "$list" --batch 40 --grid-steps "$FID_STEPS" --cfg-scale 1.5 --runs 3 \
        --json | tee "$R/eval/bench.jsonl"
}

pictures() {
    mkdir -p docs/fmnist
    for l in $LAMBDAS; do
        "$D" inspect --ckpt "$R/fmnist-dydit-$l/model.safetensors" --num-steps 250 \
            --out "docs/fmnist/widths-$l.png"
    done
    "$D" sample --ckpt "$R/fmnist-dydit-0.5/model.safetensors" --class 0,1,2,3,4,5,6,7,8,9 \
        --token-maps "$R/eval/token-maps" --out "$R/eval/token-maps.png"
    for m in dit $(for l in $LAMBDAS; do echo "dydit-$l"; done); do
        cp "$R/eval/$m.png" "docs/fmnist/samples-$m.png"
    done
    "$D" plot-log "$R/fmnist-dit/log.jsonl" --out docs/fmnist/pretrain-log.png
    "$D" plot-log "$R/fmnist-dydit-0.5/log.jsonl" --out docs/fmnist/finetune-0.5-log.png
}

# SiT / DySiT: the DiT recipe with flow matching; FID with a fixed-step Heun ODE on 26 grid
# points (50 network calls, as DDPM-50) so that the rows compare.
sit() {
    local s="$R/fmnist-sit" ds="$R/fmnist-dysit-0.5"
    pretrain_run "$s" "$SIT_STEPS" 25 --family SiT
    if [ -d "$ds/ckpt" ] && [ ! -f "$ds/model.safetensors" ]; then
        "$D" finetune --resume --out "$ds"
    elif [ ! -f "$ds/model.safetensors" ]; then
        "$D" finetune --from "$s/model.safetensors" --target-ratio 0.5 "${DATA[@]}" \
            --steps "$FT_STEPS" --batch-size "$FT_BATCH" --lr 1e-4 --router-lr 1e-3 \
            --warmup-steps 200 --ema-decay 0.99 --reorder-by-importance --ckpt-every 100 \
            --log-every 10 --seed 2 --out "$ds"
    fi
    mkdir -p "$R/eval"
    for m in sit dysit-0.5; do
        [ -f "$R/eval/$m.json" ] && continue
        "$D" eval --ckpt "$R/fmnist-$m/model.safetensors" --num-samples "$FID_N" \
            --flow-method heun --num-steps 26 --cfg-scale 1.5 --seed 0 --batch-size 40 \
            --out "$R/eval/$m.json" --grid "$R/eval/$m.png"
    done
    "$D" bench --ckpt "$s/model.safetensors,$ds/model.safetensors" --batch 40 --grid-steps 26 \
        --cfg-scale 1.5 --runs 3 --json | tee "$R/eval/bench-sit.jsonl"
}

# DiT → DyDiT λ = 0.5 by parameter-efficient fine-tuning: LoRA and TD-LoRA (rank 8 on qkv,
# proj, fc1, fc2; TD-LoRA in 4 groups with a 0.5 rank budget) with the DyDiT row's schedule
# (500 iterations of batch 32, reordering, router lr 1e-3, EMA 0.99); the adapters use lr 1e-3
# (LoRA's usual 10× the full fine-tuning rate). Then the same FID protocol and one interleaved
# speed run of DiT / full / LoRA / TD-LoRA, and a side-by-side training cost measurement
# (PEFT_PROBE steps of each method, peak memory from /usr/bin/time).
PEFT_PROBE=${PEFT_PROBE:-40}
peft_finetune() {  # METHOD OUT STEPS [extra flags]
    local method=$1 out=$2 steps=$3; shift 3
    local flags=()
    [ "$method" != full ] && flags=(--peft "$method" --rank 8 --groups 4 --lr 1e-3)
    [ "$method" = full ] && flags=(--lr 1e-4)
    "$D" finetune --from "$R/fmnist-dit/model.safetensors" --target-ratio 0.5 "${DATA[@]}" \
        --steps "$steps" --batch-size "$FT_BATCH" "${flags[@]}" --router-lr 1e-3 \
        --warmup-steps 200 --ema-decay 0.99 --reorder-by-importance --ckpt-every 100 \
        --log-every 10 --seed 2 --out "$out" "$@"
}
peft() {
    mkdir -p "$R/eval"
    for m in lora td-lora; do
        local out="$R/fmnist-dydit-0.5-$m"
        if [ -d "$out/ckpt" ] && [ ! -f "$out/model.safetensors" ]; then
            "$D" finetune --resume --out "$out"
        elif [ ! -f "$out/model.safetensors" ]; then
            peft_finetune "$m" "$out" "$FT_STEPS"
        fi
        [ -f "$R/eval/dydit-0.5-$m.json" ] && continue
        "$D" eval --ckpt "$R/fmnist-dit/model.safetensors" --adapter "$out/adapter.safetensors" \
            "${PROTO[@]}" --out "$R/eval/dydit-0.5-$m.json" --grid "$R/eval/dydit-0.5-$m.png"
    done
    "$D" bench --ckpt "$R/fmnist-dit/model.safetensors,$R/fmnist-dydit-0.5/model.safetensors,$R/fmnist-dydit-0.5-lora/model.safetensors,$R/fmnist-dydit-0.5-td-lora/model.safetensors" \
        --batch 40 --grid-steps "$FID_STEPS" --cfg-scale 1.5 --runs 3 --json \
        | tee "$R/eval/bench-peft.jsonl"
    peft_cost
}
# Training cost side by side: PEFT_PROBE steps of each method from the same DiT, one after the
# other on an otherwise idle machine; steps/s from the run's log, peak memory from /usr/bin/time.
peft_cost() {
    mkdir -p "$R/eval"
    : > "$R/eval/peft-cost.txt"
    for m in full lora td-lora; do
        rm -rf "$R/probe-$m"
        /usr/bin/time -v -o "$R/probe-$m.time" \
            bash -c "$(declare -f peft_finetune); D=$D R=$R FT_BATCH=$FT_BATCH; DATA=(${DATA[*]}); peft_finetune $m $R/probe-$m $PEFT_PROBE" \
            > "$R/probe-$m.out" 2>&1
        echo "$m $(grep -o '"steps_per_s":[0-9.]*' "$R/probe-$m/log.jsonl" | tail -1) \
peak_rss_kb=$(grep 'Maximum resident' "$R/probe-$m.time" | grep -o '[0-9]*') \
$(grep -o '([0-9.]* M [a-z -]*parameters' "$R/probe-$m.out")" | tee -a "$R/eval/peft-cost.txt"
    done
}

# FID-10k in pieces that survive across sessions: each model's 10k samples (the eval protocol:
# DDPM-50 — for a SiT/DySiT (NAME containing "sit") Heun on 26 grid points, the same 50 network
# calls — cfg 1.5, seed 0, balanced classes, noise seeded by the global sample index) as
# FID10K_SHARDS `.npz` shards (each written atomically; existing ones are skipped), joined by
# merge-npz and scored by `dydit fid` against the cached test-split statistics.
# FID10K_MODELS: space-separated NAME=CKPT[+ADAPTER]. FID_DYDIT: the binary for the Inception
# pass (the MKL build's is faster there).
FID10K_SHARDS=${FID10K_SHARDS:-8}
FID10K_MODELS=${FID10K_MODELS:-"dydit-0.5=$R/fmnist-dydit-0.5/model.safetensors dydit-0.5-lora=$R/fmnist-dit/model.safetensors+$R/fmnist-dydit-0.5-lora/adapter.safetensors dydit-0.5-td-lora=$R/fmnist-dit/model.safetensors+$R/fmnist-dydit-0.5-td-lora/adapter.safetensors dit=$R/fmnist-dit/model.safetensors dydit-0.7=$R/fmnist-dydit-0.7/model.safetensors dydit-0.3=$R/fmnist-dydit-0.3/model.safetensors sit=$R/fmnist-sit/model.safetensors dysit-0.5=$R/fmnist-dysit-0.5/model.safetensors"}
fid10k() {
    local dir="$R/fid10k"
    mkdir -p "$dir"
    for entry in $FID10K_MODELS; do
        local name=${entry%%=*} spec=${entry#*=}
        local ckpt=${spec%%+*} ad=()
        [ "$spec" != "$ckpt" ] && ad=(--adapter "${spec#*+}")
        [ -f "$dir/$name.json" ] && continue
        local steps=(--num-steps "$FID_STEPS" --sampler ddpm)
        case "$name" in *sit*) steps=(--num-steps 26 --method heun) ;; esac
        local parts=()
        for ((i = 0; i < FID10K_SHARDS; i++)); do
            local part="$dir/$name.part$i-of-$FID10K_SHARDS.npz"
            parts+=("$part")
            [ -f "$part" ] && continue
            "$D" sample --ckpt "$ckpt" "${ad[@]}" --npz "$part" --num-samples 10000 \
                --shard "$i/$FID10K_SHARDS" "${steps[@]}" --cfg-scale 1.5 --seed 0 --batch-size 40
        done
        "$D" merge-npz "${parts[@]}" --out "$dir/$name.npz" --expect 10000
        "${FID_DYDIT:-$D}" fid --real weights/fid_stats_fashion_test.safetensors --fake "$dir/$name.npz" \
            --json > "$dir/$name.json.tmp" && mv "$dir/$name.json.tmp" "$dir/$name.json"
        cat "$dir/$name.json"
    done
}

# Latte / DyLatte on moving Fashion-MNIST clips (16 frames, 16² garments on 32²); per-frame FID
# of frames 0, 5, 10, 15 of VID_N samples (DDPM with VID_STEPS steps) against the same frames of
# VID_N moving test clips.
latte() {
    local l="$R/fmnist-latte" dl="$R/fmnist-dylatte-0.5"
    latte_pretrain_run "$l" "$LATTE_STEPS" 25
    if [ -d "$dl/ckpt" ] && [ ! -f "$dl/model.safetensors" ]; then
        "$D" finetune --resume --out "$dl" --steps "$LATTE_FT_STEPS"
    elif [ ! -f "$dl/model.safetensors" ]; then
        "$D" finetune --from "$l/model.safetensors" --target-ratio 0.5 "${LATTE_CLIPS[@]}" \
            --steps "$LATTE_FT_STEPS" --batch-size 32 --lr 1e-4 \
            --router-lr 1e-3 --warmup-steps 200 \
            --ema-decay 0.99 --reorder-by-importance --ckpt-every 100 --log-every 10 --seed 2 \
            --out "$dl"
    fi
    mkdir -p "$R/eval"
    for m in latte dylatte-0.5; do
        [ -f "$R/eval/$m.json" ] && continue
        "$D" eval --ckpt "$R/fmnist-$m/model.safetensors" --num-samples "$VID_N" \
            --num-steps "$VID_STEPS" --sampler ddpm --cfg-scale 1.5 --seed 0 --batch-size 20 \
            --out "$R/eval/$m.json" --grid "$R/eval/$m.png"
    done
    "$D" bench --ckpt "$l/model.safetensors,$dl/model.safetensors" --batch 10 \
        --grid-steps "$VID_STEPS" --cfg-scale 1.5 --warmup 1 --runs 2 --json | tee "$R/eval/bench-latte.jsonl"
    mkdir -p docs/fmnist
    for m in latte dylatte-0.5; do
        "$D" sample --ckpt "$R/fmnist-$m/model.safetensors" --class 0,1,2,3,4,5,6,7,8,9 \
            --num-steps "$VID_STEPS" --cfg-scale 4 --nrow 5 --out "$R/eval/clips-$m.gif"
        cp "$R/eval/clips-$m.gif" "docs/fmnist/clips-$m.gif"
    done
}

# Text-to-image at small scale: an MMDiT (FLUX blocks, width 128, 2 double + 4 single) and a
# small text encoder trained on captioned Fashion-MNIST, its DyFLUX version (token + width
# routers) fine-tuned at λ = 0.5, then per model FID-10k against the test split and prompt
# adherence (the classifier's accuracy on the samples against their prompts' classes), plus
# timing of both models interleaved in one run.
T2I_STEPS=${T2I_STEPS:-4000}
T2I_FT_STEPS=${T2I_FT_STEPS:-500}
T2I_SAMPLE_STEPS=${T2I_SAMPLE_STEPS:-25}
T2I_CFG=${T2I_CFG:-3}
t2i() {
    local b="$R/fmnist-t2i" dy="$R/fmnist-dyt2i-0.5" e="$R/eval-t2i"
    if [ ! -f "$b/model.safetensors" ]; then
        if [ -d "$b/ckpt" ]; then
            "$D" t2i-train --resume --out "$b" --steps "$T2I_STEPS" --quiet
        else
            "$D" t2i-train --out "$b" --steps "$T2I_STEPS" --batch-size 64 --lr 3e-4 \
                --ema-decay 0.999 --seed 1 --ckpt-every 250 --log-every 25 --quiet
        fi
    fi
    if [ ! -f "$dy/model.safetensors" ]; then
        if [ -d "$dy/ckpt" ]; then
            "$D" t2i-train --resume --out "$dy" --quiet
        else
            # DyDiT's recipe as in the DiT rows: lr 1e-4, routers 1e-3, λ warm-up over 200.
            "$D" t2i-train --init-from "$b/model.safetensors" --target-ratio 0.5 --out "$dy" \
                --steps "$T2I_FT_STEPS" --batch-size 32 --lr 1e-4 --router-lr 1e-3 \
                --warmup-steps 200 --ema-decay 0.99 --seed 2 --ckpt-every 100 --log-every 10 --quiet
        fi
    fi
    [ -f weights/fmnist-classifier.safetensors ] || "$D" classifier-train --epochs 8 \
        --out weights/fmnist-classifier.safetensors
    mkdir -p "$e"
    for entry in "t2i=$b" "dyt2i-0.5=$dy"; do
        local name=${entry%%=*} dir=${entry#*=}
        [ -f "$e/$name.json" ] && continue
        local parts=()
        for ((i = 0; i < 8; i++)); do
            local part="$e/$name.part$i-of-8.npz"
            parts+=("$part")
            [ -f "$part" ] && continue
            "$D" t2i-sample --ckpt "$dir/model.safetensors" --npz "$part" --num-samples 10000 \
                --shard "$i/8" --steps "$T2I_SAMPLE_STEPS" --cfg-scale "$T2I_CFG" --seed 0 \
                --batch-size 50 --json > "$part.json"
        done
        "$D" merge-npz "${parts[@]}" --out "$e/$name.npz" --expect 10000
        "${FID_DYDIT:-$D}" fid --real weights/fid_stats_fashion_test.safetensors \
            --fake "$e/$name.npz" --json > "$e/$name.fid.json"
        "$D" classify --classifier weights/fmnist-classifier.safetensors --npz "$e/$name.npz" \
            --json > "$e/$name.classify.json"
        cat "$e/$name".part*.json "$e/$name.fid.json" "$e/$name.classify.json" > "$e/$name.json.tmp"
        mv "$e/$name.json.tmp" "$e/$name.json"
        cat "$e/$name.json"
    done
    [ -f "$e/bench.jsonl" ] || "$D" t2i-bench --ckpt "$b/model.safetensors,$dy/model.safetensors" \
        --batch 40 --steps "$T2I_SAMPLE_STEPS" --cfg-scale "$T2I_CFG" --runs 3 --json \
        | tee "$e/bench.jsonl"
    mkdir -p docs/fmnist
    for entry in "t2i=$b" "dyt2i-0.5=$dy"; do
        "$D" t2i-sample --ckpt "${entry#*=}/model.safetensors" --per-prompt 8 \
            --steps "$T2I_SAMPLE_STEPS" --cfg-scale 4 --seed 1 --out "docs/fmnist/${entry%%=*}-grid.png"
    done
}

ship() {
    "$D" convert "$R/fmnist-dit/model.safetensors" models/fashion-mnist/dit.safetensors \
        --dtype f16
    "$D" convert "$R/fmnist-dydit-0.5/model.safetensors" \
        models/fashion-mnist/dydit-0.5.safetensors --dtype f16
    echo "rebuild (cargo build --release) to embed the new models"
}

stages=("$@")
[ ${#stages[@]} -eq 0 ] && stages=(pretrain finetune eval bench pictures ship)
for s in "${stages[@]}"; do
    case "$s" in
        pretrain) pretrain ;;
        finetune) finetune ;;
        eval) eval_all ;;
        bench) bench ;;
        pictures) pictures ;;
        ship) ship ;;
        sit) sit ;;
        latte) latte ;;
        peft) peft ;;
        peft-cost) peft_cost ;;
        fid10k) fid10k ;;
        t2i) t2i ;;
        *) echo "unknown stage '$s' (pretrain finetune eval bench pictures ship sit latte peft peft-cost fid10k t2i)" >&2; exit 2 ;;
    esac
done
