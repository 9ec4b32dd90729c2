#!/usr/bin/env bash
# bench/ab.sh — training throughput of an older tree against this one, in one call
# on the device machine: builds both, then alternates their ./train runs (the same
# presets and shapes as run.sh, plus small at 16 x 1024), so drift of the card
# hits both alike. Prints the median tokens/s of each side per shape.
#
#   git archive REV | tar -x -C OLD        (here, into an ignored folder; carry it)
#   bash bench/ab.sh OLD [runs] [shapes]   (default 5 runs per side and shape; shapes: a
#                                          list of "preset batch seq steps vocab", default the three below)
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/lib.bash
old=${1:?usage: bash bench/ab.sh OLD [runs] [shapes]}
runs=${2:-5}
shapes=${3:-"mini 8 256 60 1024,small 8 256 40 32768,small 16 1024 20 32768"}
ab_build "$old" "train data/prepare" train
[ -f data/default/train.bin ] || ./data/prepare --default --out data/default --vocab 1024 >/dev/null
card_line
tokens_per_s() {  # dir preset batch seq steps vocab: median tok/s over steps 11..
    (cd "$1" && ./train --data "$OLDPWD/data/default" --preset "$2" --vocab-size "$6" --batch-size "$3" --seq-len "$4" --steps "$5" \
        --device gpu --val-every 0 --sample-every 0 --save-every 0 --overwrite --out /tmp/ab_run > /tmp/ab_run.log)
    awk -F, 'NR > 11 { print $6 }' /tmp/ab_run/metrics.csv | median
}
report() {  # side values...: the median and the range of the runs
    local side=$1
    shift
    printf '%s\n' "$@" | sort -g | awk -v s="$side" -v p="$preset" -v b="$b" -v t="$t" \
        '{ a[NR] = $1 } END { printf "%s %s B=%d T=%d: %.0f tok/s (runs %s-%s)\n", s, p, b, t, a[int((NR + 1) / 2)], a[1], a[NR] }'
}
IFS=, read -r -a shape_list <<< "$shapes"
for shape in "${shape_list[@]}"; do
    read -r preset b t _ _ <<< "$shape"
    before=() after=()
    for _ in $(seq "$runs"); do
        before+=("$(tokens_per_s "$old" $shape)")
        after+=("$(tokens_per_s . $shape)")
    done
    report before "${before[@]}"
    report after "${after[@]}"
    grep -o 'gpu ([0-9.]* MiB of device memory)' /tmp/ab_run.log | sed "s/^/after $preset B=$b T=$t: /"
done
