# bench/lib.bash — what the benchmark scripts (bench/*.sh) share, sourced from the repository root after their
# `set -euo pipefail`: the median, the setup every run starts with, and the with/without comparisons of one
# ./train flag that fp8.sh and mtp.sh make.

median() { sort -g | awk '{ a[NR] = $1 } END { print a[int((NR + 1) / 2)] }'; }

# card_line: the card and the date, the line every benchmark's output starts with
card_line() { echo "card: $(nvidia-smi --query-gpu=name --format=csv,noheader | head -1), $(date -u +%Y-%m-%d)"; }

# bench_setup TARGET...: builds them, writes the default dataset when it is missing, names the card and the date
bench_setup() {
    make -j16 "$@" >/dev/null
    [ -f data/default/train.bin ] || ./data/prepare --default --out data/default --vocab 1024 >/dev/null
    card_line
}

# ab_build OLD "TARGETS HERE" TARGETS IN OLD...: what ab.sh and decode_ab.sh do first, refusing an OLD that is not a
# source tree in one line, then building both trees at once
ab_build() {
    local old=$1 here=$2
    shift 2
    [ -f "$old/Makefile" ] || { echo "$0: $old is not a source tree (git archive REV | tar -x -C $old)" >&2; exit 1; }
    (make -j16 $here >/dev/null) & (make -C "$old" -j16 "$@" >/dev/null) & wait
}

# decode_checkpoint DIR LOG: `small` (vocabulary 32,768) after one training step, the checkpoint the decoding
# benchmarks time (decoding speed does not depend on the weights' values), written to DIR, ./train's output to LOG
decode_checkpoint() {
    ./train --preset small --vocab-size 32768 --steps 1 --warmup 1 --batch-size 1 --seq-len 64 --device gpu --val-every 0 \
        --sample-every 0 --save-every 0 --overwrite --out "$1" >"$2" 2>&1
}

# flag_speed FLAG PRESET BATCH SEQ STEPS RUNS: ./train on the default data without and with FLAG, alternated so
# that drift of the card hits both alike. Each run's median tokens/s over the steps after the sixth, then the
# median over the runs; the device memory train reports; the ratio and the step-time change.
flag_speed() {
    local flag=$1 preset=$2 b=$3 t=$4 steps=$5 runs=$6 without=() with=() mem_without mem_with
    for _ in $(seq "$runs"); do
        for flags in "" "$flag"; do
            ./train --data data/default --preset "$preset" --vocab-size 32768 --batch-size "$b" --seq-len "$t" --steps "$steps" $flags \
                --device gpu --sample-every 0 --save-every 0 --val-every 0 --val-tokens 2 --overwrite --out /tmp/flag_run > /tmp/flag_run.log
            local tps mem
            tps=$(awk -F, 'NR > 6 { print $6 }' /tmp/flag_run/metrics.csv | median)
            mem=$(grep -o 'gpu ([0-9.]* MiB' /tmp/flag_run.log | tr -d '(' | awk '{ print $2 }')
            if [ -z "$flags" ]; then without+=("$tps"); mem_without=$mem; else with+=("$tps"); mem_with=$mem; fi
        done
    done
    local tps_without tps_with
    tps_without=$(printf '%s\n' "${without[@]}" | median)
    tps_with=$(printf '%s\n' "${with[@]}" | median)
    echo "$preset B=$b T=$t: without $tps_without tok/s ($mem_without MiB), $flag $tps_with tok/s ($mem_with MiB):" \
        "$(awk -v a="$tps_without" -v b="$tps_with" 'BEGIN { printf "%.3fx the tokens/s, step time %+.1f%%", b / a, (a / b - 1) * 100 }')" \
        "(runs: ${without[*]} / ${with[*]})"
}

# loss_run_dir FLAG DATA PRESET SEED SIDE: where flag_loss leaves one run (SIDE: plain or the flag's name)
loss_run_dir() {
    local flag=$1 data=$2 preset=$3 seed=$4 side=$5
    echo "bench/out/${flag#--}_loss_$([ "$preset" = small ] || echo "${preset}_")$(basename "$data")${seed:+_seed$seed}_$side"
}

# final_val_loss FLAG DATA PRESET SEED SIDE: the last validation loss of that run
final_val_loss() { tail -1 "$(loss_run_dir "$@")/metrics.csv" | cut -d, -f3; }

# flag_loss FLAG STEPS DATA [PRESET BATCH SEQ EVERY SEED]: PRESET (default small) at BATCH x SEQ (8 x 256) without
# and with FLAG, from the same seed (./train's default, or SEED) and data order, the validation loss over the whole
# split every EVERY steps (250); each run's log and metrics.csv under
# bench/out/<flag>_loss_[<preset>_]<data>[_seed<SEED>]_{plain,<flag>} (the preset named unless small)
flag_loss() {
    local flag=$1 steps=$2 data=$3 preset=${4:-small} b=${5:-8} t=${6:-256} every=${7:-250} seed=${8:-} name flags seeded=()
    if [ -n "$seed" ]; then seeded=(--seed "$seed"); fi
    mkdir -p bench/out
    for flags in "" "$flag"; do
        name=$(loss_run_dir "$flag" "$data" "$preset" "$seed" "${flags:-plain}")
        name=${name//--/}
        ./train --data "$data" --preset "$preset" --batch-size "$b" --seq-len "$t" --steps "$steps" $flags "${seeded[@]}" --device gpu \
            --sample-every 0 --save-every 0 --val-every "$every" --overwrite --out "$name" > "$name.log"
        echo "$preset ${b}x$t ${flags:-plain}${seed:+ seed $seed} on $data: step,loss,val_loss at the end: $(tail -1 "$name/metrics.csv" | cut -d, -f1-3)"
    done
}

# flag_seeds FLAG STEPS DATA COUNT [PRESET BATCH SEQ]: flag_loss on PRESET (default small) at BATCH x SEQ (8 x 256)
# for seeds 1..COUNT, then seeds_summary
flag_seeds() {
    local flag=$1 steps=$2 data=$3 count=$4 preset=${5:-small} b=${6:-8} t=${7:-256} seed
    for seed in $(seq "$count"); do flag_loss "$flag" "$steps" "$data" "$preset" "$b" "$t" 250 "$seed"; done
    seeds_summary "$flag" "$data" "$count" "$preset"
}

# seeds_summary FLAG DATA COUNT PRESET: of flag_seeds' runs, each side's final validation losses, their mean and
# spread (sample standard deviation), the mean difference in per cent (the noise a single pair of runs has to be
# read against), and each seed's paired difference with their mean and spread
seeds_summary() {
    local flag=$1 data=$2 count=$3 preset=$4 seed side means=() final=()
    for side in plain "${flag#--}"; do
        local losses=()
        for seed in $(seq "$count"); do
            losses+=("$(final_val_loss "$flag" "$data" "$preset" "$seed" "$side")")
        done
        means+=("$(printf '%s\n' "${losses[@]}" | awk '{ s += $1 } END { print s / NR }')")
        printf '%s\n' "${losses[@]}" | awk -v side="$side" -v m="${means[-1]}" '{ v[NR] = $1; d += ($1 - m) ^ 2 } END {
            sd = sqrt(d / (NR > 1 ? NR - 1 : 1)); printf "%s: final val losses", side
            for (i = 1; i <= NR; i++) printf " %.4f", v[i]
            printf "; mean %.4f, spread %.4f (%.2f%%)\n", m, sd, 100 * sd / m }'
    done
    awk -v a="${means[0]}" -v b="${means[1]}" -v f="$flag" 'BEGIN { printf "%s against plain, mean final val loss: %+.2f%%\n", f, 100 * (b / a - 1) }'
    for seed in $(seq "$count"); do
        for side in plain "${flag#--}"; do final+=("$(final_val_loss "$flag" "$data" "$preset" "$seed" "$side")"); done
    done
    printf '%s %s\n' "${final[@]}" | awk -v f="$flag" '{ d[NR] = 100 * ($2 / $1 - 1); s += d[NR] } END {
        m = s / NR; printf "%s against plain, paired by seed:", f
        for (i = 1; i <= NR; i++) { printf " %+.2f%%", d[i]; v += (d[i] - m) ^ 2 }
        printf "; mean %+.2f%%, spread %.2f%%\n", m, sqrt(v / (NR > 1 ? NR - 1 : 1)) }'
}
