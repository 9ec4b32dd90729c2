#!/usr/bin/env bash
# bench/fp8.sh — FP8 against BF16 training, ours against ours, in one call on the
# device machine.
#
#   bash bench/fp8.sh speed [runs]   the GEMM-by-GEMM table (bench/fp8_gemm) for small and
#                                    medium, then ./train with and without --fp8,
#                                    alternated so that drift of the card hits both
#                                    alike: median tokens/s and device memory (default 3 runs)
#   bash bench/fp8.sh loss [steps] [data]   small at 8 x 256, both ways from the same seed:
#                                    the loss curves (metrics.csv of each, under bench/out/),
#                                    validation over the whole split every 250 steps (default
#                                    2000 steps on data/default; data: a data/prepare folder)
set -euo pipefail
cd "$(dirname "$0")/.."
mode=${1:-speed}
make -j16 train data/prepare bench/fp8_gemm >/dev/null
[ -f data/default/train.bin ] || ./data/prepare --default --out data/default --vocab 1024 >/dev/null
echo "card: $(nvidia-smi --query-gpu=name --format=csv,noheader | head -1), $(date -u +%Y-%m-%d)"
median() { sort -g | awk '{ a[NR] = $1 } END { print a[int((NR + 1) / 2)] }'; }
if [ "$mode" = speed ]; then
    runs=${2:-3}
    ./bench/fp8_gemm --preset small --tokens 16384
    ./bench/fp8_gemm --preset medium --tokens 8192
    for shape in "small 16 1024 25 $runs" "medium 8 1024 15 1"; do  # medium: one run each, its setup takes a while
        read -r preset b t steps n <<< "$shape"
        bf16=() fp8=()
        for _ in $(seq "$n"); do
            for flags in "" --fp8; do
                ./train --data data/default --preset "$preset" --vocab-size 32768 --batch-size "$b" --seq-len "$t" --steps "$steps" $flags \
                    --device gpu --sample-every 0 --save-every 0 --val-every 0 --val-tokens 2 --overwrite --out /tmp/fp8_run > /tmp/fp8_run.log
                tps=$(awk -F, 'NR > 6 { print $6 }' /tmp/fp8_run/metrics.csv | median)
                mem=$(grep -o 'gpu ([0-9.]* MiB' /tmp/fp8_run.log | tr -d '(' | awk '{ print $2 }')
                if [ -z "$flags" ]; then bf16+=("$tps"); mem16=$mem; else fp8+=("$tps"); mem8=$mem; fi
            done
        done
        m16=$(printf '%s\n' "${bf16[@]}" | median)
        m8=$(printf '%s\n' "${fp8[@]}" | median)
        echo "$preset B=$b T=$t: bf16 $m16 tok/s ($mem16 MiB), fp8 $m8 tok/s ($mem8 MiB), fp8/bf16 $(awk -v a="$m8" -v b="$m16" 'BEGIN { printf "%.3f", a / b }') (runs: ${bf16[*]} / ${fp8[*]})"
    done
else
    steps=${2:-2000} data=${3:-data/default}
    mkdir -p bench/out
    for flags in "" --fp8; do
        name=bench/out/fp8_loss_$(basename "$data")_${flags:-bf16}
        name=${name//--/}
        ./train --data "$data" --preset small --batch-size 8 --seq-len 256 --steps "$steps" $flags --device gpu --sample-every 0 \
            --save-every 0 --val-every 250 --val-tokens 100000000 --overwrite --out "$name" > "$name.log"
        echo "small 8x256 ${flags:-bf16} on $data: step,loss,val_loss at the end: $(tail -1 "$name/metrics.csv" | cut -d, -f1-3)"
    done
fi
