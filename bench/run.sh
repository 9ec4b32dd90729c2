#!/usr/bin/env bash
# bench/run.sh — training throughput of ./train against the PyTorch peer
# (bench/pytorch_train.py) on the same GPU, in one run. Prints one line per
# measurement and writes bench/out/*.json and a summary table to stdout.
#
#   bash bench/run.sh [runs]      (default 3 runs of each of ours, 1 of each peer mode)
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-3}
out=${OUT:-bench/out}
mkdir -p "$out"
make -j16 train data/prepare >/dev/null
[ -f data/default/train.bin ] || ./data/prepare --default --out data/default --vocab 1024 >/dev/null
card=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)
echo "card: $card, $(date -u +%Y-%m-%d)"

# ours: median tokens/s over steps 11.. of each run, then the median over runs
ours() {  # preset batch seq steps vocab
    local preset=$1 b=$2 t=$3 steps=$4 vocab=$5 all=()
    for r in $(seq "$runs"); do
        ./train --preset "$preset" --vocab-size "$vocab" --batch-size "$b" --seq-len "$t" --steps "$steps" --device gpu \
            --val-every 0 --sample-every 0 --save-every 0 --overwrite --out "/tmp/bench_$preset" > "/tmp/bench_$preset.log"
        [ "$r" = 1 ] && grep -o 'gpu ([0-9.]* MiB of device memory)' "/tmp/bench_$preset.log" | sed "s/^/ours $preset: /"
        all+=("$(awk -F, 'NR > 11 { print $6 }' "/tmp/bench_$preset/metrics.csv" | sort -g | awk '{ a[NR] = $1 } END { print a[int((NR + 1) / 2)] }')")
    done
    printf '%s\n' "${all[@]}" | sort -g | awk -v p="$preset" -v b="$b" -v t="$t" '{ a[NR] = $1 } END { printf "ours %s B=%d T=%d: %.0f tok/s (median of %d runs: %s)\n", p, b, t, a[int((NR + 1) / 2)], NR, a[1] "-" a[NR] }'
}
peer() {  # preset batch seq mode
    PYTHONUNBUFFERED=1 python3 bench/pytorch_train.py --preset "$1" --batch-size "$2" --seq-len "$3" --mode "$4" --steps 30 \
        --quiet --json "$out/pytorch_$1_$4.json" 2>/dev/null | grep RESULT || echo "pytorch $1 $4: failed"
}
ours mini 8 256 60 1024
ours small 8 256 40 32768
peer mini 8 256 eager
peer small 8 256 eager
peer mini 8 256 compile
peer small 8 256 compile
