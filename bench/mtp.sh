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
#                                    included) and the drafts' acceptance; then
#                                    bench/decode_bench at batch 1 and 32 (random prompts,
#                                    greedy), decode alone, both ways
#   bash bench/mtp.sh seeds [steps] [data] [count]   the `loss` pair for seeds 1..count (default
#                                    2000 steps, data/default, 3 seeds): each side's final main-model
#                                    validation losses, their mean and seed-to-seed spread
#   bash bench/mtp.sh lambdas [steps] [data] [list]   `loss`'s --mtp run at each --mtp-lambda of
#                                    the list (default "0.1 0.3 1"): the main model's final
#                                    validation loss, and the module's training loss at the last step
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/lib.bash
mode=${1:-speed}
bench_setup train data/prepare generate bench/decode_bench
mkdir -p bench/out
if [ "$mode" = speed ]; then
    flag_speed --mtp small 16 1024 25 "${2:-3}"
elif [ "$mode" = decode ]; then
    runs=${2:-3} data=${3:-data/default} prompt=${4:-"The "}
    ckpt=$(loss_run_dir --mtp "$data" small "" mtp)
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
    for batch in 1 32; do
        for flag in --speculative ""; do
            ./bench/decode_bench --model "$ckpt" --batch "$batch" --prompt-len 64 --new-tokens 256 --runs "$runs" $flag
        done
    done
elif [ "$mode" = seeds ]; then
    flag_seeds --mtp "${2:-2000}" "${3:-data/default}" "${4:-3}"
elif [ "$mode" = lambdas ]; then
    steps=${2:-2000} data=${3:-data/default}
    for lambda in ${4:-0.1 0.3 1}; do
        out=bench/out/mtp_lambda_${lambda}_$(basename "$data")
        ./train --data "$data" --preset small --batch-size 8 --seq-len 256 --steps "$steps" --mtp --mtp-lambda "$lambda" --device gpu \
            --sample-every 0 --save-every 0 --val-every 250 --overwrite --out "$out" > "$out.log"
        echo "--mtp-lambda $lambda on $data: step,loss,val_loss at the end: $(tail -1 "$out/metrics.csv" | cut -d, -f1-3);" \
            "the module's training loss at the last step: $(grep -o '| mtp [0-9.]*' "$out.log" | tail -1 | cut -c7-)"
    done
else
    flag_loss --mtp "${2:-2000}" "${3:-data/default}"
fi
