#!/usr/bin/env bash
# bench/mtp.sh — the multi-token-prediction module (--mtp) against the same model without
# it, ours against ours, in one call on the device machine.
#
#   bash bench/mtp.sh speed [runs]   small at 16 x 1024 with and without --mtp, alternated so
#                                    that drift of the card hits both alike: median tokens/s
#                                    (of the main model's tokens), the overhead, device memory
#   bash bench/mtp.sh loss [steps] [data]   small at 8 x 256, both ways from the same seed and
#                                    data order: the main model's validation loss over the
#                                    whole split every 250 steps (metrics.csv of each under
#                                    bench/out/; default 2000 steps on data/default)
#   bash bench/mtp.sh decode [runs] [data] [prompt]   the --mtp model of `loss` (trained
#                                    here when bench/out has none): ./generate at batch 1,
#                                    1,000 new tokens, self-speculative and plain, greedy and
#                                    sampled (0.8, top-p 0.95): median tokens/s (prefill
#                                    included) and the drafts' acceptance
set -euo pipefail
cd "$(dirname "$0")/.."
mode=${1:-speed}
make -j16 train data/prepare >/dev/null
[ -f data/default/train.bin ] || ./data/prepare --default --out data/default --vocab 1024 >/dev/null
echo "card: $(nvidia-smi --query-gpu=name --format=csv,noheader | head -1), $(date -u +%Y-%m-%d)"
median() { sort -g | awk '{ a[NR] = $1 } END { print a[int((NR + 1) / 2)] }'; }
if [ "$mode" = speed ]; then
    runs=${2:-3}
    plain=() mtp=()
    for _ in $(seq "$runs"); do
        for flags in "" --mtp; do
            ./train --data data/default --preset small --vocab-size 32768 --batch-size 16 --seq-len 1024 --steps 25 $flags \
                --device gpu --sample-every 0 --save-every 0 --val-every 0 --val-tokens 2 --overwrite --out /tmp/mtp_run > /tmp/mtp_run.log
            tps=$(awk -F, 'NR > 6 { print $6 }' /tmp/mtp_run/metrics.csv | median)
            mem=$(grep -o 'gpu ([0-9.]* MiB' /tmp/mtp_run.log | tr -d '(' | awk '{ print $2 }')
            if [ -z "$flags" ]; then plain+=("$tps"); mem_plain=$mem; else mtp+=("$tps"); mem_mtp=$mem; fi
        done
    done
    a=$(printf '%s\n' "${plain[@]}" | median)
    b=$(printf '%s\n' "${mtp[@]}" | median)
    echo "small B=16 T=1024: without $a tok/s ($mem_plain MiB), --mtp $b tok/s ($mem_mtp MiB), step time +$(awk -v a="$a" -v b="$b" 'BEGIN { printf "%.1f", (a / b - 1) * 100 }')% (runs: ${plain[*]} / ${mtp[*]})"
elif [ "$mode" = decode ]; then
    runs=${2:-3} data=${3:-data/default} prompt=${4:-"The "}
    make -j16 generate >/dev/null
    ckpt=bench/out/mtp_loss_$(basename "$data")_mtp
    [ -f "$ckpt/checkpoint/config.json" ] || ./train --data "$data" --preset small --batch-size 8 --seq-len 256 --steps 2000 --mtp \
        --device gpu --sample-every 0 --save-every 0 --val-every 0 --overwrite --out "$ckpt" > "$ckpt.log"
    for temperature in 0 0.8; do
        for flag in --speculative --no-speculative; do
            speeds=() decode=() accepted=""
            for run in $(seq "$runs"); do
                ./generate --model "$ckpt" --prompt "$prompt" --max-new-tokens 1000 --temperature "$temperature" --seed "$run" $flag \
                    --device gpu > /dev/null 2> /tmp/mtp_generate.err
                speeds+=("$(grep -o '[0-9.]* tokens/s' /tmp/mtp_generate.err | awk '{ print $1 }')")
                # after the first token: (tokens - 1) / (elapsed - time to first token)
                decode+=("$(grep -o 'generated.*' /tmp/mtp_generate.err |
                    awk '{ for (i = 1; i <= NF; i++) if ($i == "first") t = $(i + 2); printf "%.1f", ($2 - 1) / ($5 - t) }')")
                # (awk, not grep: a plain run has no such line, and grep's status would stop this script)
                accepted+="$(awk 'match($0, /[0-9.]+% of [0-9]+ drafts/) { split(substr($0, RSTART, RLENGTH), a, " "); print a[1] }' \
                    /tmp/mtp_generate.err) "
            done
            echo "batch 1, temperature $temperature, $flag: $(printf '%s\n' "${speeds[@]}" | median) tokens/s with the prefill" \
                "(runs: ${speeds[*]}), $(printf '%s\n' "${decode[@]}" | median) after the first token (runs: ${decode[*]});" \
                "accepted: ${accepted:-n/a}"
        done
    done
else
    steps=${2:-2000} data=${3:-data/default}
    mkdir -p bench/out
    for flags in "" --mtp; do
        name=bench/out/mtp_loss_$(basename "$data")_${flags:-plain}
        name=${name//--/}
        ./train --data "$data" --preset small --batch-size 8 --seq-len 256 --steps "$steps" $flags --device gpu --sample-every 0 \
            --save-every 0 --val-every 250 --val-tokens 100000000 --overwrite --out "$name" > "$name.log"
        echo "small 8x256 ${flags:-plain} on $data: step,loss,val_loss at the end: $(tail -1 "$name/metrics.csv" | cut -d, -f1-3)"
    done
fi
