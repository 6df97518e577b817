# The Fashion-MNIST pre-training recipes shared by fmnist-experiment.sh (CPU) and fmnist-gpu.sh
# (CUDA), sourced by both so that their DiT/SiT and Latte rows come from one command each. Uses D
# (binary), DATA (the IDX flags) and F (the dataset folder) of the sourcing script.

# pretrain_run OUT STEPS LOG_EVERY [FLAGS…]: C = 192, depth 6, 6 heads, patch 4, batch 64, lr 3e-4,
# EMA 0.999, seed 1 (FLAGS e.g. `--family SiT`); resumes OUT's run, skips a finished one.
pretrain_run() {
    local out=$1 steps=$2 log_every=$3
    [ -f "$out/model.safetensors" ] && return 0
    if [ -d "$out/ckpt" ]; then
        "$D" train --resume --out "$out" --steps "$steps"
    else
        "$D" train "${DATA[@]}" "${@:4}" --model custom --patch-size 4 --hidden-size 192 \
            --depth 6 --num-heads 6 --batch-size 64 --lr 3e-4 --ema-decay 0.999 \
            --steps "$steps" --ckpt-every 250 --log-every "$log_every" --seed 1 --out "$out"
    fi
}

# The moving-clip flags: 16 frames of a 16² garment bouncing on a 32² canvas.
LATTE_CLIPS=(--data "$F/train-images-idx3-ubyte.gz" --moving-frames 16 --moving-item 16 --pad-to 32)

# latte_pretrain_run OUT STEPS LOG_EVERY: a Latte of C = 128, depth 4 (2 spatial + 2 temporal),
# 4 heads, patch 4, batch 32, lr 5e-4, EMA 0.999, seed 1; resumes OUT's run, skips a finished one.
latte_pretrain_run() {
    local out=$1 steps=$2 log_every=$3
    [ -f "$out/model.safetensors" ] && return 0
    if [ -d "$out/ckpt" ]; then
        "$D" train --resume --out "$out" --steps "$steps"
    else
        "$D" train "${LATTE_CLIPS[@]}" --model custom --patch-size 4 --hidden-size 128 --depth 4 \
            --num-heads 4 --batch-size 32 --lr 5e-4 --ema-decay 0.999 --steps "$steps" \
            --ckpt-every 250 --log-every "$log_every" --seed 1 --out "$out"
    fi
}
