#!/usr/bin/env bash
# test/cli_multi_gpu.sh — ./train on 2 GPUs (data parallel, ZeRO-1), black-box, from the repository root:
# 20 steps on 2 GPUs against 20 steps on 1 GPU with --grad-accum 2 on the same data, two 2-GPU runs
# bit-identical, a 2-GPU checkpoint resumed on 1 GPU and the reverse, mismatched options refused, and a rank
# killed mid-run (launched by --gpus, and by hand with --num-processes) ending the other with one line.
# Skips, passing, on a machine with fewer than 2 GPUs (CI has none). About two minutes on 2 H200s.
set -euo pipefail
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-passive}
# NVLink multicast (NVLS) stays off: on the shared device machines a program using it can take the GPUs out of
# service; NCCL's plain NVLink ring and tree serve these checks
export NCCL_NVLS_ENABLE=0

gpus=$( (nvidia-smi -L 2>/dev/null || true) | grep -c '^GPU' || true)
if [ "${gpus:-0}" -lt 2 ]; then
    echo "SKIP  test/cli_multi_gpu.sh: needs 2 GPUs, this machine has ${gpus:-0}"
    exit 0
fi

source "$(dirname "$0")/cli_lib.bash"

# the largest relative difference of the loss (column 2) of two runs over steps FROM..TO; "missing" when a
# step is absent from either
maxrel() {
    awk -F, -v from="$3" -v to="$4" '
        FNR == 1 { f++; next }
        $1 < from || $1 > to { next }
        f == 1 { a[$1] = $2; next }
        ($1 in a) { d = a[$1] - $2; if (d < 0) d = -d; m0 = $2 < 0 ? -$2 : $2; r = d / m0; if (r > m) m = r; n++ }
        END { if (n != to - from + 1) print "missing"; else printf "%.3g\n", m }' "$1/metrics.csv" "$2/metrics.csv" 2>/dev/null ||
        echo missing
}
below() { awk -v x="$1" -v lim="$2" 'BEGIN { exit !(x != "missing" && x + 0 < lim + 0) }'; }
# check_below NAME VALUE LIMIT [DETAIL]: passes when VALUE is a number below LIMIT
check_below() {
    if below "$2" "$3"; then pass "$1 ($2)"; else fail "$1" "$2, not below $3${4:+; $4}"; fi
}
# metrics.csv without the tokens/s column
numbers() { cut -d, -f1-5 "$1/metrics.csv"; }

# ---------------------------------------------------------------------------
# a dataset of repetitive text; the mini preset (MoE layers, so the expert loads and biases are exercised)
for i in $(seq 1 3000); do
    printf 'the quick brown fox number %d jumps over the lazy dog. the dog sleeps %d times.\n' "$i" $((i * 7 % 13))
done >"$T/text.txt"
./data/prepare --input "$T/text.txt" --out "$T/data" --vocab 512 >/dev/null
# --warmup 100: the learning rate of steps 1..20 does not depend on --steps, so a run stopped at step 10 and
# resumed to 20 follows the schedule of a run of 20
RUN=(--data "$T/data" --batch-size 8 --seq-len 128 --warmup 100 --val-every 0 --sample-every 0 --val-tokens 2048)

./train "${RUN[@]}" --steps 20 --grad-accum 2 --out "$T/one" >"$T/one.log" 2>&1 || fail "1 GPU, --grad-accum 2: 20 steps" "$(tail -3 "$T/one.log")"
./train "${RUN[@]}" --steps 20 --gpus 2 --out "$T/two" >"$T/two.log" 2>&1 || fail "2 GPUs: 20 steps" "$(tail -3 "$T/two.log")"
./train "${RUN[@]}" --steps 20 --gpus 2 --out "$T/two_again" >"$T/two_again.log" 2>&1 || fail "2 GPUs again" "$(tail -3 "$T/two_again.log")"
if grep -q 'training: 20 steps of 2 x 8 x 128 x 1 = 2048 tokens' "$T/two.log" && grep -q '2 processes' "$T/two.log"; then
    pass "the 2-GPU header counts both processes' tokens"
else
    fail "the 2-GPU header counts both processes' tokens" "$(grep training: "$T/two.log")"
fi

# step 1 sees the same weights and the same tokens: only the order of two float additions differs
first=$(maxrel "$T/one" "$T/two" 1 1)
check_below "step 1 loss: 2 GPUs = 1 GPU with --grad-accum 2 (rel diff)" "$first" 1e-5
all=$(maxrel "$T/one" "$T/two" 1 20)
check_below "20 steps: 2 GPUs = 1 GPU with --grad-accum 2 within bf16 tolerance (max rel diff)" "$all" 2e-2 \
    "$(paste -d' ' <(numbers "$T/one") <(numbers "$T/two") | tail -4)"
if cmp -s <(numbers "$T/two") <(numbers "$T/two_again"); then
    pass "two 2-GPU runs are bit-identical (loss, lr, grad norm)"
else
    fail "two 2-GPU runs are bit-identical" "$(diff <(numbers "$T/two") <(numbers "$T/two_again") | head -4)"
fi
if cmp -s "$T/two/checkpoint/model.safetensors" "$T/two_again/checkpoint/model.safetensors" &&
    cmp -s "$T/two/checkpoint/optimizer.safetensors" "$T/two_again/checkpoint/optimizer.safetensors"; then
    pass "two 2-GPU runs save bit-identical weights and moments (the ZeRO shards gathered)"
else
    fail "two 2-GPU runs save bit-identical weights and moments"
fi

# ---------------------------------------------------------------------------
# resume across GPU counts: 10 steps on one count, 10 more on the other, against the uninterrupted runs
./train "${RUN[@]}" --steps 10 --gpus 2 --out "$T/r21" >"$T/r21.log" 2>&1 || fail "2 GPUs: 10 steps" "$(tail -3 "$T/r21.log")"
if ./train --out "$T/r21" --resume --steps 20 --grad-accum 2 >"$T/r21b.log" 2>&1; then
    rel=$(maxrel "$T/one" "$T/r21" 11 20)
    check_below "a 2-GPU checkpoint resumes on 1 GPU (steps 11-20 vs the 1-GPU run: max rel diff)" "$rel" 2e-2
else
    fail "a 2-GPU checkpoint resumes on 1 GPU" "$(tail -3 "$T/r21b.log")"
fi
./train "${RUN[@]}" --steps 10 --grad-accum 2 --out "$T/r12" >"$T/r12.log" 2>&1 || fail "1 GPU: 10 steps" "$(tail -3 "$T/r12.log")"
if ./train --out "$T/r12" --resume --steps 20 --grad-accum 1 --gpus 2 >"$T/r12b.log" 2>&1; then
    rel=$(maxrel "$T/two" "$T/r12" 11 20)
    check_below "a 1-GPU checkpoint resumes on 2 GPUs (steps 11-20 vs the 2-GPU run: max rel diff)" "$rel" 2e-2
else
    fail "a 1-GPU checkpoint resumes on 2 GPUs" "$(tail -3 "$T/r12b.log")"
fi

# ---------------------------------------------------------------------------
# mismatched options: both ranks refuse with one line
mkdir -p "$T/init_mismatch"
./train "${RUN[@]}" --steps 5 --num-processes 2 --process-rank 0 --init-dir "$T/init_mismatch" --lr 1e-3 --out "$T/mm" \
    >"$T/mm0.log" 2>"$T/mm0.err" &
p0=$!
rc1=0
./train "${RUN[@]}" --steps 5 --num-processes 2 --process-rank 1 --init-dir "$T/init_mismatch" --lr 2e-3 --out "$T/mm" \
    >"$T/mm1.log" 2>"$T/mm1.err" || rc1=$?
rc0=0
wait $p0 || rc0=$?
if [ $rc0 -ne 0 ] && [ $rc1 -ne 0 ] && grep -q '^error: rank 0 of 2: the ranks were started with different options' "$T/mm0.err" &&
    grep -q '^error: rank 1 of 2: the ranks were started with different options' "$T/mm1.err"; then
    pass "ranks started with different options refuse, each with one line"
else
    fail "ranks started with different options refuse" "exit $rc0/$rc1: $(tail -1 "$T/mm0.err") | $(tail -1 "$T/mm1.err")"
fi

# ---------------------------------------------------------------------------
# a rank killed mid-run
# wait_steps DIR N: until DIR/metrics.csv has N step lines (60 s at most)
wait_steps() {
    for _ in $(seq 600); do
        [ -f "$1/metrics.csv" ] && [ "$(($(wc -l <"$1/metrics.csv") - 1))" -ge "$2" ] && return 0
        sleep 0.1
    done
    return 1
}

# --gpus: the launcher sees the death at once, stops the other rank and names the dead one
./train "${RUN[@]}" --steps 100000 --gpus 2 --out "$T/kill_gpus" >"$T/kill_gpus.log" 2>"$T/kill_gpus.err" &
parent=$!
if wait_steps "$T/kill_gpus" 3; then
    victim=$(pgrep -P $parent | sort -n | tail -1)
    kill -9 "$victim"
    start=$(date +%s)
    rc=0
    wait $parent || rc=$?
    took=$(($(date +%s) - start))
    if [ $rc -ne 0 ] && [ $took -le 10 ] && [ "$(tail -1 "$T/kill_gpus.err")" = "error: rank 1 of 2 was killed by signal 9 (Killed); the other ranks were stopped" ] &&
        [ -z "$(pgrep -P $parent || true)" ]; then
        pass "--gpus 2, rank 1 killed: train exits $rc in ${took}s naming the rank"
    else
        fail "--gpus 2, rank 1 killed" "exit $rc after ${took}s: $(tail -2 "$T/kill_gpus.err")"
    fi
else
    kill $parent 2>/dev/null || true
    fail "--gpus 2 run reaches step 3" "$(tail -3 "$T/kill_gpus.err")"
fi

# by hand: rank 0 has only its watchdog (or NCCL's error) to learn that rank 1 is gone, within --nccl-timeout
mkdir -p "$T/init_kill"
HAND=("${RUN[@]}" --steps 100000 --num-processes 2 --init-dir "$T/init_kill" --nccl-timeout 20 --out "$T/kill_hand")
./train "${HAND[@]}" --process-rank 0 >"$T/kill0.log" 2>"$T/kill0.err" &
p0=$!
./train "${HAND[@]}" --process-rank 1 >"$T/kill1.log" 2>"$T/kill1.err" &
p1=$!
if wait_steps "$T/kill_hand" 3; then
    kill -9 $p1
    start=$(date +%s)
    rc=0
    wait $p0 || rc=$?
    took=$(($(date +%s) - start))
    if [ $rc -ne 0 ] && [ $took -le 40 ] && tail -1 "$T/kill0.err" | grep -Eq '^error: rank 0 of 2: (no progress for [0-9]+ s: another rank died or hung|NCCL failed)'; then
        pass "--num-processes 2, rank 1 killed: rank 0 exits $rc in ${took}s with one line"
    else
        fail "--num-processes 2, rank 1 killed: rank 0 exits within the timeout" "exit $rc after ${took}s: $(tail -2 "$T/kill0.err")"
    fi
else
    kill $p0 $p1 2>/dev/null || true
    fail "--num-processes 2 run reaches step 3" "$(tail -3 "$T/kill0.err")"
fi

finish
