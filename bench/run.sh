#!/usr/bin/env bash
# bench/run.sh — the training benchmarks of issue 3 in one process, on the device
# machine: throughput and device memory of ./train against the PyTorch peer
# (bench/pytorch_train.py, eager and torch.compile) for the mini and small presets,
# then the time from process start to validation loss <= 1.47 on tinyshakespeare.
# Prints one line per measurement; the PyTorch results also go to $OUT (or bench/out).
#
#   bash bench/run.sh [runs] [tinyshakespeare.txt]     (default 5 runs of each of ours)
#
# The tinyshakespeare part is skipped when the text file is missing (it is never
# committed; copy it into an ignored folder and pass its path).
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-5}
text=${2:-.bench_data/tinyshakespeare.txt}
out=${OUT:-bench/out}
mkdir -p "$out"
make -j16 train data/prepare >/dev/null
[ -f data/default/train.bin ] || ./data/prepare --default --out data/default --vocab 1024 >/dev/null
card=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)
echo "card: $card, $(date -u +%Y-%m-%d)"

median() { sort -g | awk '{ a[NR] = $1 } END { print a[int((NR + 1) / 2)] }'; }

# ours: median tokens/s over steps 11.. of each run, then the median over runs
ours() {  # preset batch seq steps vocab
    local preset=$1 b=$2 t=$3 steps=$4 vocab=$5 all=()
    for r in $(seq "$runs"); do
        ./train --preset "$preset" --vocab-size "$vocab" --batch-size "$b" --seq-len "$t" --steps "$steps" --device gpu \
            --val-every 0 --sample-every 0 --save-every 0 --overwrite --out "/tmp/bench_$preset" > "/tmp/bench_$preset.log"
        [ "$r" = 1 ] && grep -o 'gpu ([0-9.]* MiB of device memory)' "/tmp/bench_$preset.log" | sed "s/^/ours $preset: /"
        all+=("$(awk -F, 'NR > 11 { print $6 }' "/tmp/bench_$preset/metrics.csv" | median)")
    done
    printf '%s\n' "${all[@]}" | sort -g | awk -v p="$preset" -v b="$b" -v t="$t" '{ a[NR] = $1 } END { printf "ours %s B=%d T=%d: %.0f tok/s (median of %d runs: %s)\n", p, b, t, a[int((NR + 1) / 2)], NR, a[1] "-" a[NR] }'
}
peer() {  # preset batch seq mode
    PYTHONUNBUFFERED=1 python3 bench/pytorch_train.py --preset "$1" --batch-size "$2" --seq-len "$3" --mode "$4" --steps 30 \
        --quiet --json "$out/pytorch_$1_$4.json" 2>/dev/null | grep RESULT || echo "pytorch $1 $4: failed"
}
# bytes, first 90% train / last 10% val; the mini preset, batch 32 x 256, 2000 steps
shakespeare() {
    ./data/prepare --input "$text" --out /tmp/ts --vocab 256 >/dev/null
    local times=()
    for r in $(seq "$runs"); do
        local start end
        start=$(date +%s.%N)
        ./train --data /tmp/ts --preset mini --vocab-size 256 --batch-size 32 --seq-len 256 --steps 2000 --warmup 100 --lr 3e-3 \
            --val-every 100 --sample-every 0 --save-every 0 --out /tmp/ts_run --overwrite > /tmp/ts_run.log  # val: the whole split
        end=$(date +%s.%N)
        times+=("$(awk -v a="$start" -v b="$end" 'BEGIN { printf "%.3f", b - a }')")
        awk -F, -v r="$r" -v s="${times[-1]}" 'NR > 1 && $3 != "" { if (!hit && $3 <= 1.47) { hit = $1; at = $3 } last = $3 }
            END { printf "tinyshakespeare run %d: %.2f s, val <= 1.47 first at step %s (%.4f), final val %.4f\n", r, s, hit ? hit : "never", at, last }' \
            /tmp/ts_run/metrics.csv
    done
    printf '%s\n' "${times[@]}" | median | awk '{ printf "tinyshakespeare: median %.2f s from process start to exit\n", $1 }'
}
ours mini 8 256 60 1024
ours small 8 256 40 32768
peer mini 8 256 eager
peer small 8 256 eager
peer mini 8 256 compile
peer small 8 256 compile
if [ -f "$text" ]; then shakespeare; else echo "tinyshakespeare: skipped ($text not found)"; fi
