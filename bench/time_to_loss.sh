#!/usr/bin/env bash
# bench/time_to_loss.sh — seconds from process start to a validation loss of 1.47 over the
# whole validation split of tinyshakespeare as bytes (nanoGPT's train_shakespeare_char, whose
# evaluation samples the whole split too, ends at 1.4697).
#
#   bash bench/time_to_loss.sh TEXT [runs]
#   NANOGPT=DIR bash bench/time_to_loss.sh TEXT [runs]     with nanoGPT's run beside ours (below)
#
# First each candidate below trains once, evaluating the whole split every 100 steps, every line
# of its log stamped with the seconds since the process started; a run stops at its first
# val loss <= 1.47. Then the candidate that got there soonest trains [runs] more times (default
# 3) with --steps set to that step, so that its schedule ends there, evaluating at the end only:
# the median of those processes' whole times (start to exit, checkpoint included) and each
# final val loss. Logs under bench/out/ttl/.
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/lib.bash
text=${1:?usage: bash bench/time_to_loss.sh TEXT [runs]} runs=${2:-3} target=1.47
bench_setup train data/prepare
out=bench/out/ttl
mkdir -p "$out"
./data/prepare --input "$text" --out "$out/data" --vocab 256 > /dev/null

# config FILE KEY=VALUE...: the mini preset's config.json (vocab 256) with the given fields changed
config() {
    local file=$1
    shift
    ./train --data "$out/data" --preset mini --vocab-size 256 --steps 1 --batch-size 1 --seq-len 8 --val-every 0 --sample-every 0 \
        --device cpu --overwrite --out "$out/base" > /dev/null
    python3 - "$out/base/checkpoint/config.json" "$file" "$@" <<'EOF'
import json, sys
c = json.load(open(sys.argv[1]))
for kv in sys.argv[3:]:
    k, v = kv.split("=")
    c[k] = int(v)
json.dump(c, open(sys.argv[2], "w"), indent=2)
EOF
}
config "$out/w384l6_dense.json" hidden_size=384 num_hidden_layers=6 num_attention_heads=6 intermediate_size=1536 n_routed_experts=0 \
    n_shared_experts=0

# name|flags beyond the data, the sequence length, warm-up and logging, --steps last: the last round of
# the sweep in bench/RESULTS.md, its best first, then its neighbours (attention dropout 0.1 and 0.3, and a
# schedule that ends at 1000 steps), then the best run without attention dropout, for comparison
candidates=(
    "w384l6_dense_d0.2_ad0.2_1500|--config $out/w384l6_dense.json --batch-size 64 --lr 1.5e-3 --dropout 0.2 --attn-dropout 0.2 --shuffle --steps 1500"
    "w384l6_dense_d0.2_ad0.2_1000|--config $out/w384l6_dense.json --batch-size 64 --lr 1.5e-3 --dropout 0.2 --attn-dropout 0.2 --shuffle --steps 1000"
    "w384l6_dense_d0.2_ad0.1_1500|--config $out/w384l6_dense.json --batch-size 64 --lr 1.5e-3 --dropout 0.2 --attn-dropout 0.1 --shuffle --steps 1500"
    "w384l6_dense_d0.2_ad0.3_1500|--config $out/w384l6_dense.json --batch-size 64 --lr 1.5e-3 --dropout 0.2 --attn-dropout 0.3 --shuffle --steps 1500"
    "w384l6_dense_d0.2_ad0.2_lr1e-3_2000|--config $out/w384l6_dense.json --batch-size 64 --lr 1e-3 --dropout 0.2 --attn-dropout 0.2 --shuffle --steps 2000"
    "w384l6_dense_d0.25_1000|--config $out/w384l6_dense.json --batch-size 64 --lr 1.5e-3 --dropout 0.25 --shuffle --steps 1000"
)

# stamped RUN: runs a command with each line of its output prefixed by the seconds since it started;
# with UNTIL set, stops (the reader exits, train dies of SIGPIPE) after the first val loss <= UNTIL
stamped() {
    local start
    start=$(date +%s.%N)
    "$@" 2>&1 | python3 -u -c '
import sys, time
start, until = float(sys.argv[1]), float(sys.argv[2])
for line in sys.stdin:
    print(f"{time.time() - start:8.2f} {line}", end="")
    if line.startswith("val loss") and float(line.split("(best")[0].split()[-1]) <= until:
        break' "$start" "${UNTIL:-0}" || true
}

best="" best_s=1e9 best_step=0
for entry in "${candidates[@]}"; do
    name=${entry%%|*} flags=${entry#*|}
    # shellcheck disable=SC2086
    UNTIL=$target stamped timeout 60 ./train --data "$out/data" --seq-len 256 --warmup 100 --val-every 100 --sample-every 0 --save-every 0 \
        --device gpu --overwrite --out "$out/$name" $flags > "$out/$name.log"
    hit=$(awk -v t=$target '$2 == "val" && $(NF - 2) <= t { print $1; exit }' "$out/$name.log")
    step=$(awk -v t=$target '$2 == "step" { s = $3 } $2 == "val" && $(NF - 2) <= t { sub("/.*", "", s); print s; exit }' "$out/$name.log")
    tps=$(awk '$2 == "step" { for (i = 1; i <= NF; i++) if ($i == "tok/s") print $(i - 1) }' "$out/$name.log" | median)
    last=$(awk '$2 == "val" { v = $(NF - 2) } END { print v }' "$out/$name.log")
    echo "$name: $([ -n "$hit" ] && echo "val <= $target at step $step, ${hit}s from start" || echo "not reached (last val $last)"), $tps tok/s | $flags"
    if [ -n "$hit" ] && awk -v a="$hit" -v b="$best_s" 'BEGIN { exit !(a < b) }'; then best=$entry best_s=$hit best_step=$step; fi
done
# nanoGPT beside ours when NANOGPT names a checkout of it (github.com/karpathy/nanoGPT; it needs torch and numpy):
# its train_shakespeare_char as published, on the text split as its prepare.py splits it (its character
# vocabulary, the first 90% / the last 10%), its log stamped the same way. Its val loss is an estimate from 200
# random batches of the split, every 250 steps.
if [ -n "${NANOGPT:-}" ]; then
    mkdir -p "$NANOGPT/data/shakespeare_char"
    python3 - "$text" "$NANOGPT/data/shakespeare_char" <<'PY'
import numpy as np, os, pickle, sys
text = open(sys.argv[1]).read()
chars = sorted(set(text))
stoi = {c: i for i, c in enumerate(chars)}
n = int(len(text) * 0.9)
for name, part in (("train", text[:n]), ("val", text[n:])):
    np.array([stoi[c] for c in part], dtype=np.uint16).tofile(os.path.join(sys.argv[2], name + ".bin"))
with open(os.path.join(sys.argv[2], "meta.pkl"), "wb") as f:
    pickle.dump({"vocab_size": len(chars), "itos": dict(enumerate(chars)), "stoi": stoi}, f)
PY
    (cd "$NANOGPT" && PYTHONUNBUFFERED=1 stamped python3 train.py config/train_shakespeare_char.py) > "$out/nanogpt.log"
    hit=$(awk -v t=$target '$2 == "step" && $NF <= t { sub(":", "", $3); print "val <= " t " at step " $3 ", " $1 "s from start"; exit }' "$out/nanogpt.log")
    last=$(awk '$2 == "step" { v = $NF; at = $1 } END { print "last val " v " at " at "s" }' "$out/nanogpt.log")
    echo "nanoGPT train_shakespeare_char: ${hit:-not reached}; $last; ended at $(tail -1 "$out/nanogpt.log" | awk '{ print $1 }')s"
fi

[ -n "$best" ] || { echo "no candidate reached $target"; exit 0; }

name=${best%%|*} flags=${best#*|}
flags="${flags% --steps *} --steps $best_step"
echo "fastest: $name; $runs runs with its schedule ending at step $best_step, val at the end only:"
times=()
for run in $(seq "$runs"); do
    start=$(date +%s.%N)
    # shellcheck disable=SC2086
    ./train --data "$out/data" --seq-len 256 --warmup 100 --val-every 0 --sample-every 0 --save-every 0 --device gpu --overwrite \
        --out "$out/${name}_final" $flags > "$out/${name}_final_$run.log"
    end=$(date +%s.%N)
    times+=("$(awk -v a="$start" -v b="$end" 'BEGIN { printf "%.2f", b - a }')")
    echo "  run $run: ${times[-1]} s, $(grep '^val loss' "$out/${name}_final_$run.log" | tail -1)"
done
echo "median $(printf '%s\n' "${times[@]}" | median) s | ./train --data DIR --seq-len 256 --warmup 100 --val-every 0 --sample-every 0 --save-every 0 $flags"
