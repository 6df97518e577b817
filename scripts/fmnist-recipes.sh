# The Fashion-MNIST pre-training recipe shared by fmnist-experiment.sh (CPU) and fmnist-gpu.sh
# (CUDA), sourced by both so that their DiT/SiT rows come from one command. Uses D (binary) and
# DATA (the IDX flags) of the sourcing script.

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
