#!/usr/bin/env bash
# bench/multi_gpu.sh — data-parallel scaling of ./train (issue 11), on the device machine with 2 GPUs: tokens/s
# of the small preset at batch 16 x 1024 per GPU, on 1 GPU and on 2 (--gpus 2, ZeRO-1), the median over steps
# 11.. of each run, then the median over runs; prints the speed-up and the scaling efficiency.
#
#   bash bench/multi_gpu.sh [runs] [steps]      (default 3 runs of 30 steps each)
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/lib.bash
# NVLink multicast (NVLS) stays off: on the shared device machines a program using it can take the GPUs out of
# service; the plain NVLink ring and tree are what this measures
export NCCL_NVLS_ENABLE=0
runs=${1:-3}
steps=${2:-30}
make -j16 train data/prepare >/dev/null
[ -f data/default/train.bin ] || ./data/prepare --default --out data/default --vocab 1024 >/dev/null
echo "cards: $(nvidia-smi --query-gpu=name --format=csv,noheader | sort | uniq -c | xargs), $(date -u +%Y-%m-%d)"

# tokens/s (all ranks' tokens) of one configuration: the median over runs
measure() {  # name, then train's extra options
    local name=$1 all=()
    shift
    for r in $(seq "$runs"); do
        ./train --preset small --vocab-size 32768 --batch-size 16 --seq-len 1024 --steps "$steps" --val-every 0 --sample-every 0 \
            --save-every 0 --overwrite --out "/tmp/bench_mgpu_$name" "$@" >"/tmp/bench_mgpu_$name.log"
        [ "$r" = 1 ] && grep -o 'device .*' "/tmp/bench_mgpu_$name.log" | head -1 | sed "s/^/$name: /"
        all+=("$(awk -F, 'NR > 11 { print $6 }' "/tmp/bench_mgpu_$name/metrics.csv" | median)")
    done
    printf '%s\n' "${all[@]}" | median
}

one=$(measure 1gpu)
two=$(measure 2gpu --gpus 2)
awk -v a="$one" -v b="$two" -v n="$runs" 'BEGIN {
    printf "small 16x1024 per GPU: 1 GPU %.0f tok/s, 2 GPUs %.0f tok/s (median of %d runs): %.2fx, %.0f%% scaling efficiency\n",
           a, b, n, b / a, 100 * b / (2 * a) }'
