#!/usr/bin/env bash
# bench/decode_ab.sh — GPU decoding speed of an older tree against this one, in one call on the device machine:
# builds bench/decode_bench in both, trains the one-step `small` checkpoint that generate_bench.sh decodes with
# (lib.bash decode_checkpoint), then alternates the two trees' runs per case, so that drift of the card hits both
# alike. Prints each side's median ms a token per case and the speed-up.
#
#   git archive REV | tar -x -C OLD             (here, into an ignored folder; carry it)
#   bash bench/decode_ab.sh OLD [runs] [cases]  (default 3 runs a side; cases: a list of "batch prompt_len new_tokens",
#                                               default "1 128 128,4 128 128,32 128 128,1 1024 32")
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/lib.bash
old=${1:?usage: bash bench/decode_ab.sh OLD [runs] [cases]}
runs=${2:-3}
cases=${3:-"1 128 128,4 128 128,32 128 128,1 1024 32"}
ab_build "$old" "train data/prepare bench/decode_bench" bench/decode_bench
card_line
ckpt=/tmp/decode_ab_small
decode_checkpoint "$ckpt" /tmp/decode_ab_train.log
ms_per_token() {  # dir batch prompt_len new_tokens: the median over 3 timed generations, from decode_bench's JSON
    (cd "$1" && ./bench/decode_bench --model "$ckpt" --batch "$2" --prompt-len "$3" --new-tokens "$4" --runs 3) |
        tail -1 | grep -o '"decode_token_ms": [0-9.]*' | awk '{ print $2 }'
}
IFS=, read -r -a case_list <<< "$cases"
for c in "${case_list[@]}"; do
    read -r b p n <<< "$c"
    before=() after=()
    for _ in $(seq "$runs"); do
        before+=("$(ms_per_token "$old" "$b" "$p" "$n")")
        after+=("$(ms_per_token . "$b" "$p" "$n")")
    done
    mb=$(printf '%s\n' "${before[@]}" | median)
    ma=$(printf '%s\n' "${after[@]}" | median)
    echo "batch $b, prompt $p, $n new: before $mb ms a token (runs ${before[*]}), after $ma ms (runs ${after[*]}):" \
        "$(awk -v a="$mb" -v b="$ma" 'BEGIN { printf "%.2fx", a / b }')"
done
