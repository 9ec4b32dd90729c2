#!/usr/bin/env bash
# bench/fp8.sh — FP8 against BF16 training in one call on the device machine:
# ./train with and without --fp8, alternated so that drift of the card hits both
# alike, at small 8 x 256 and 16 x 1024. Prints the median tokens/s of each side,
# the speed-up and the device memory of each.
#
#   bash bench/fp8.sh [runs]            (default 5 runs per side and shape)
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-5}
make -j16 train data/prepare >/dev/null
[ -f data/default/train.bin ] || ./data/prepare --default --out data/default --vocab 1024 >/dev/null
echo "card: $(nvidia-smi --query-gpu=name --format=csv,noheader | head -1), $(date -u +%Y-%m-%d)"
median() { sort -g | awk '{ a[NR] = $1 } END { print a[int((NR + 1) / 2)] }'; }
tokens_per_s() {  # flags preset batch seq steps: median tok/s over steps 11..
    ./train --data data/default --preset "$2" --vocab-size 32768 --batch-size "$3" --seq-len "$4" --steps "$5" $1 \
        --device gpu --val-every 0 --sample-every 0 --save-every 0 --overwrite --out /tmp/fp8_run > /tmp/fp8_run.log
    grep -o 'gpu ([0-9.]* MiB' /tmp/fp8_run.log | tr -d '(' | awk '{ print $2 }' > /tmp/fp8_mem
    awk -F, 'NR > 11 { print $6 }' /tmp/fp8_run/metrics.csv | median
}
for shape in "small 8 256 40" "small 16 1024 25"; do
    read -r preset b t steps <<< "$shape"
    bf16=() fp8=()
    for _ in $(seq "$runs"); do
        bf16+=("$(tokens_per_s "" $shape)")
        mem16=$(cat /tmp/fp8_mem)
        fp8+=("$(tokens_per_s --fp8 $shape)")
        mem8=$(cat /tmp/fp8_mem)
    done
    m16=$(printf '%s\n' "${bf16[@]}" | median)
    m8=$(printf '%s\n' "${fp8[@]}" | median)
    echo "$preset B=$b T=$t: bf16 $m16 tok/s ($mem16 MiB), fp8 $m8 tok/s ($mem8 MiB), fp8/bf16 $(awk -v a="$m8" -v b="$m16" 'BEGIN { printf "%.3f", a / b }')"
done
