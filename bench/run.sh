#!/usr/bin/env bash
# bench/run.sh — the training benchmarks in one process, on the device machine:
# throughput and device memory of ./train against the PyTorch peer
# (bench/pytorch_train.py, eager and torch.compile) for the mini and small presets at
# 8 x 256 and at the shapes people train with (small 16 x 1024, mini 64 x 512), our
# MFU by the peer's FLOP count and peak, then the time from process start to a
# whole-split validation loss <= 1.47 on tinyshakespeare.
# Prints one line per measurement; the PyTorch results also go to $OUT (or bench/out).
#
#   bash bench/run.sh [runs] [tinyshakespeare.txt] [shapes]     (default 5 runs of each of ours;
#                                    shapes: "preset batch seq" list, default all four below)
#
# The tinyshakespeare part is skipped when the text file is missing (it is never
# committed; copy it into an ignored folder and pass its path).
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/lib.bash
runs=${1:-5}
text=${2:-.bench_data/tinyshakespeare.txt}
shapes=${3:-"mini 8 256,small 8 256,small 16 1024,mini 64 512"}
out=${OUT:-bench/out}
mkdir -p "$out"
bench_setup train data/prepare

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
    printf '%s\n' "${all[@]}" | median > "$out/ours_${preset}_${b}x${t}.txt"
}
peer() {  # preset batch seq mode
    PYTHONUNBUFFERED=1 python3 bench/pytorch_train.py --preset "$1" --batch-size "$2" --seq-len "$3" --mode "$4" --steps 30 \
        --quiet --json "$out/pytorch_$1_$2x$3_$4.json" 2>/dev/null | grep RESULT || echo "pytorch $1 B=$2 T=$3 $4: failed"
}
# our MFU with the peer's analytic FLOP count and peak (bench/pytorch_train.py), and ours over the peer
mfu() {  # preset batch seq mode
    local json="$out/pytorch_$1_$2x$3_$4.json"
    [ -f "$json" ] || { echo "mfu $1 B=$2 T=$3: no peer result"; return; }
    python3 - "$json" "$(cat "$out/ours_$1_$2x$3.txt")" "$1 B=$2 T=$3" "$4" <<'PY'
import json, sys
r, ours, what, mode = json.load(open(sys.argv[1])), float(sys.argv[2]), sys.argv[3], sys.argv[4]
flops, peak = r["flops_per_token"], r["peak_tflops"]
print(f"mfu {what}: ours {100 * ours * flops / (peak * 1e12):.1f}%, peer ({mode}) {100 * r['mfu']:.1f}% "
      f"({flops / 1e6:.1f} MFLOP/token, peak {peak:g} TFLOP/s); ours / peer {ours / r['tokens_per_sec_median']:.2f}x")
PY
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
IFS=, read -r -a shape_list <<< "$shapes"
for shape in "${shape_list[@]}"; do
    read -r preset _ _ <<< "$shape"
    if [ "$preset" = mini ]; then ours $shape 60 1024; else ours $shape 40 32768; fi
done
for shape in "${shape_list[@]}"; do
    for mode in eager compile; do
        peer $shape $mode
        mfu $shape $mode
    done
done
if [ -f "$text" ]; then shakespeare; else echo "tinyshakespeare: skipped ($text not found)"; fi
