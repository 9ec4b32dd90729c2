#!/usr/bin/env bash
# test/cli_train.sh — black-box checks of ./train from the repository root (run by
# `make test` after the build): help, one-line errors for bad input, the run
# directory a short run leaves, the loss falling, exact resume, and Ctrl-C.
# Uses the tiny preset on a few kilobytes of text; finishes in well under a minute.
set -euo pipefail
# libgomp spin-waits at every barrier by default; on a busy 2-core machine that makes
# the tiny model dozens of times slower. Passive waiting changes no result.
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-passive}

source "$(dirname "$0")/cli_lib.bash"

# le32 N: N as 4 little-endian bytes; le16 N: 2 bytes
le32() { printf "\\x$(printf %02x $(($1 & 255)))\\x$(printf %02x $((($1 >> 8) & 255)))\\x$(printf %02x $((($1 >> 16) & 255)))\\x$(printf %02x $((($1 >> 24) & 255)))"; }
le16() { printf "\\x$(printf %02x $(($1 & 255)))\\x$(printf %02x $((($1 >> 8) & 255)))"; }

# loss column of metrics.csv for steps FROM..TO
losses() { awk -F, -v a="$2" -v b="$3" 'NR > 1 && $1 >= a && $1 <= b { print $1, $2 }' "$1/metrics.csv"; }

# ---------------------------------------------------------------------------
# a small dataset: repetitive text, a 300-token BPE vocabulary
for i in $(seq 1 150); do
    printf 'the quick brown fox number %d jumps over the lazy dog. the dog sleeps.\n' "$i"
done >"$T/text.txt"
./data/prepare --input "$T/text.txt" --out "$T/data" --vocab 300 >/dev/null
D="$T/data"
SMALL=(--data "$D" --preset tiny --batch-size 4 --seq-len 32 --val-tokens 512 --sample-tokens 16)

# ---------------------------------------------------------------------------
# help
if ./train --help >"$T/help" 2>&1 && grep -q -- '--resume' "$T/help" && grep -q -- '--val-every' "$T/help"; then
    pass "--help exits 0 and documents --resume"
else
    fail "--help exits 0 and documents --resume"
fi

# ---------------------------------------------------------------------------
# bad input: one line, "error: ...", naming the flag or file
expect_error "unknown flag" "--bogus" ./train --bogus
expect_error "bad number" "--steps" ./train --steps 12x
expect_error "number out of range" "--lr" ./train --lr -1
expect_error "bad choice" "--save-dtype" ./train --save-dtype fp16
expect_error "a value for a flag" "--no-cuda-graph" ./train --no-cuda-graph=1
expect_error "unknown preset" "huge" ./train --preset huge
expect_error "--fp8-wgrad alone" "needs --fp8" ./train --fp8-wgrad
expect_error "missing data directory" "$T/nope" ./train --data "$T/nope" --out "$T/r_missing"
expect_error "missing token file" "$T/nope.bin" ./train --train-data "$T/nope.bin" --out "$T/r_missing"
if ! nvidia-smi -L >/dev/null 2>&1; then
    expect_error "--device gpu without a GPU" "no CUDA device" ./train --device gpu
    expect_error "a rank without a GPU" "rank 1 of 2: no CUDA device" ./train --num-processes 2 --process-rank 1 --init-dir "$T"
fi
expect_error "--gpus on the CPU" "--device cpu" ./train --gpus 2 --device cpu
expect_error "--gpus and --num-processes" "--gpus or --num-processes" ./train --gpus 2 --num-processes 2 --process-rank 0
expect_error "a rank outside the group" "--process-rank 2" ./train --num-processes 2 --process-rank 2
expect_error "bad --nccl-timeout" "--nccl-timeout" ./train --nccl-timeout 0

cp "$D/train.bin" "$T/badmagic.bin"
printf '\x01\x02\x03\x04' | dd of="$T/badmagic.bin" bs=1 count=4 conv=notrunc status=none
expect_error "wrong magic" "badmagic.bin" ./train --train-data "$T/badmagic.bin" --preset tiny --out "$T/r_bad1"
grep -q magic "$T/stderr" || fail "wrong magic message says 'magic'" "$(cat "$T/stderr")"

size=$(wc -c <"$D/train.bin")
head -c $((size - 7)) "$D/train.bin" >"$T/truncated.bin"
expect_error "truncated token file" "truncated.bin" ./train --train-data "$T/truncated.bin" --preset tiny --out "$T/r_bad2"
grep -q truncated "$T/stderr" || fail "truncated message says 'truncated'" "$(cat "$T/stderr")"

# a valid version-1 file of 400 tokens whose last id (300) is >= the byte vocabulary (256)
{
    le32 20240520
    le32 1
    le32 400
    head -c $((253 * 4)) /dev/zero
    for _ in $(seq 1 399); do le16 65; done
    le16 300
} >"$T/bigid.bin"
expect_error "token id >= vocab" "bigid.bin" ./train --train-data "$T/bigid.bin" --preset tiny --batch-size 2 --seq-len 16 --out "$T/r_bad3"
grep -q 'vocab_size 256' "$T/stderr" || fail "token id message names vocab_size" "$(cat "$T/stderr")"

# ---------------------------------------------------------------------------
# a short run: the run directory
R="$T/run"
if ./train "${SMALL[@]}" --steps 12 --val-every 4 --save-every 5 --sample-every 6 --out "$R" >"$T/run.log" 2>&1; then
    pass "short run exits 0"
else
    fail "short run exits 0" "$(tail -5 "$T/run.log")"
fi
for f in checkpoint/config.json checkpoint/model.safetensors checkpoint/tokenizer.bin checkpoint/trainer_state.json \
    checkpoint/optimizer.safetensors metrics.csv loss.svg; do
    if [ -s "$R/$f" ]; then pass "run writes $f"; else fail "run writes $f"; fi
done
if [ "$(wc -l <"$R/metrics.csv")" -eq 13 ] && head -1 "$R/metrics.csv" | grep -qx 'step,loss,val_loss,lr,grad_norm,tokens_per_sec'; then
    pass "metrics.csv has a header and 12 step lines"
else
    fail "metrics.csv has a header and 12 step lines" "$(head -3 "$R/metrics.csv")"
fi
if [ "$(awk -F, 'NR > 1 && $3 != ""' "$R/metrics.csv" | wc -l)" -eq 3 ]; then
    pass "val loss logged at steps 4, 8, 12"
else
    fail "val loss logged at steps 4, 8, 12" "$(cat "$R/metrics.csv")"
fi
# a val loss over part of the split names the sample; without --val-tokens the whole split is evaluated
if ./train "${SMALL[@]}" --val-tokens 100 --steps 1 --sample-every 0 --out "$T/part" >"$T/part.log" 2>&1 &&
    grep -q 'the first 100 evaluated, --val-tokens' "$T/part.log" && grep -q '^val loss (first 100 tokens) [0-9.]* (best ' "$T/part.log" &&
    grep -q 'final val loss (first 100 tokens) ' "$T/part.log"; then
    pass "a capped val loss names its sample"
else
    fail "a capped val loss names its sample" "$(grep -i val "$T/part.log" | head -3)"
fi
if ./train --data "$D" --preset tiny --batch-size 4 --seq-len 32 --steps 1 --sample-every 0 --out "$T/whole" >"$T/whole.log" 2>&1 &&
    grep -q 'tokens, all evaluated)' "$T/whole.log" && grep -q '^val loss [0-9.]* (best ' "$T/whole.log"; then
    pass "by default the whole validation split is evaluated"
else
    fail "by default the whole validation split is evaluated" "$(grep -i val "$T/whole.log" | head -3)"
fi
expect_error "--val-tokens 1" "--val-tokens" ./train --val-tokens 1
if grep -q '<svg' "$R/loss.svg" && grep -q '</svg>' "$R/loss.svg" && grep -q 'polyline' "$R/loss.svg"; then
    pass "loss.svg is an SVG with a curve"
else
    fail "loss.svg is an SVG with a curve"
fi
if grep -q '^step  *12/12 | loss ' "$T/run.log" && grep -q '^val loss ' "$T/run.log" && grep -q '^sample at step 6' "$T/run.log"; then
    pass "progress, val and sample lines printed"
else
    fail "progress, val and sample lines printed" "$(head -5 "$T/run.log")"
fi
# without a GPU the run says once, up front, that it is on the slow CPU path
notes=$(grep -c '^note: no GPU found, so this is the slow CPU reference path' "$T/run.log" || true)
if nvidia-smi -L >/dev/null 2>&1; then want=0; else want=1; fi
if [ "$notes" -eq "$want" ] && { [ "$want" -eq 0 ] || [ "$(grep -n '^note: no GPU' "$T/run.log" | cut -d: -f1)" -lt "$(grep -n '^step ' "$T/run.log" | head -1 | cut -d: -f1)" ]; }; then
    pass "the CPU-path note is printed $want time(s), before the first step"
else
    fail "the CPU-path note is printed $want time(s), before the first step" "printed $notes time(s)"
fi
expect_error "refuses to overwrite a checkpoint" "--overwrite" ./train "${SMALL[@]}" --steps 2 --out "$R"
expect_error "--resume keeps the checkpoint's options" "--lr" ./train --data "$D" --out "$R" --resume --steps 20 --lr 1e-3
expect_error "--resume without a checkpoint" "--resume" ./train --data "$D" --out "$T/empty" --resume

# a bad config.json: top-k above the number of experts
sed 's/"num_experts_per_tok": [0-9]*/"num_experts_per_tok": 99/' "$R/checkpoint/config.json" >"$T/badconfig.json"
expect_error "bad --config (top-k > experts)" "badconfig.json" ./train --data "$D" --config "$T/badconfig.json" --out "$T/r_bad4"
grep -q num_experts_per_tok "$T/stderr" || fail "bad config message names the field" "$(cat "$T/stderr")"

# ---------------------------------------------------------------------------
# the loss falls
L="$T/learn"
./train "${SMALL[@]}" --steps 25 --warmup 2 --lr 1e-2 --val-every 0 --sample-every 0 --out "$L" >"$T/learn.log" 2>&1
first=$(awk -F, 'NR == 2 { print $2 }' "$L/metrics.csv")
last=$(awk -F, 'END { print $2 }' "$L/metrics.csv")
if awk -v a="$first" -v b="$last" 'BEGIN { exit !(b < a - 0.5) }'; then
    pass "loss falls ($first -> $last)"
else
    fail "loss falls ($first -> $last)"
fi

# ---------------------------------------------------------------------------
# exact resume: steps 1..6 straight vs 1..3 then --resume to 6 (within the warmup,
# so the first leg's shorter schedule does not change its learning rates)
EXACT=("${SMALL[@]}" --warmup 10 --dropout 0.1 --attn-dropout 0.1 --val-every 2 --sample-every 0)
./train "${EXACT[@]}" --steps 6 --out "$T/straight" >/dev/null
./train "${EXACT[@]}" --steps 3 --out "$T/resumed" >/dev/null
./train --data "$D" --out "$T/resumed" --resume --steps 6 >"$T/resume.log"
if grep -q 'resuming from .* at step 3' "$T/resume.log" && [ "$(losses "$T/straight" 4 6)" = "$(losses "$T/resumed" 4 6)" ] &&
    [ -n "$(losses "$T/straight" 4 6)" ]; then
    pass "exact resume: identical losses at steps 4..6"
else
    fail "exact resume: identical losses at steps 4..6" "straight: $(losses "$T/straight" 4 6 | tr '\n' ' ') resumed: $(losses "$T/resumed" 4 6 | tr '\n' ' ')"
fi
# the same with --shuffle, recorded in the checkpoint: the windows come from the seed and the data position
./train "${EXACT[@]}" --shuffle --steps 6 --out "$T/straight_shuffled" >/dev/null
./train "${EXACT[@]}" --shuffle --steps 3 --out "$T/resumed_shuffled" >/dev/null
./train --data "$D" --out "$T/resumed_shuffled" --resume --steps 6 >"$T/resume_shuffled.log"
if grep -q '"shuffle": true' "$T/resumed_shuffled/checkpoint/trainer_state.json" && grep -q 'random offsets' "$T/resume_shuffled.log" &&
    [ "$(losses "$T/straight_shuffled" 4 6)" = "$(losses "$T/resumed_shuffled" 4 6)" ] &&
    [ "$(losses "$T/straight_shuffled" 1 6)" != "$(losses "$T/straight" 1 6)" ]; then
    pass "--shuffle: other batches than in order, and exact resume"
else
    fail "--shuffle: other batches than in order, and exact resume" "straight: $(losses "$T/straight_shuffled" 4 6 | tr '\n' ' ') resumed: $(losses "$T/resumed_shuffled" 4 6 | tr '\n' ' ')"
fi
if [ "$(awk -F, 'NR > 1 { print $1 }' "$T/resumed/metrics.csv" | tr '\n' ' ')" = "1 2 3 4 5 6 " ]; then
    pass "resumed metrics.csv has each step once"
else
    fail "resumed metrics.csv has each step once" "$(cat "$T/resumed/metrics.csv")"
fi
# lines logged after the last checkpoint (a crash before the next save) are dropped on resume
./train "${EXACT[@]}" --steps 3 --out "$T/rewind" >/dev/null
printf '4,123.456,,0,0,0\n5,123.456,,0,0,0\n' >>"$T/rewind/metrics.csv"
./train --data "$D" --out "$T/rewind" --resume --steps 4 >/dev/null
if [ "$(awk -F, 'NR > 1 { print $1 }' "$T/rewind/metrics.csv" | tr '\n' ' ')" = "1 2 3 4 " ] && ! grep -q ',123\.456,' "$T/rewind/metrics.csv"; then
    pass "resume drops metrics lines after the checkpoint's step"
else
    fail "resume drops metrics lines after the checkpoint's step" "$(cat "$T/rewind/metrics.csv")"
fi

# ---------------------------------------------------------------------------
# Ctrl-C: SIGINT after the first progress line saves a loadable checkpoint, exit 130
# start_long_run OUT LOG: a run in the background (pid in $pid), once it has printed its first step
start_long_run() {
    ./train "${SMALL[@]}" --steps 1000000 --val-every 0 --save-every 0 --sample-every 0 --out "$1" >"$2" 2>&1 &
    pid=$!
    for _ in $(seq 1 300); do
        grep -q '^step ' "$2" && break
        sleep 0.1
    done
}
S="$T/sigint"
start_long_run "$S" "$T/sigint.log"
kill -INT "$pid"
rc=0
wait "$pid" || rc=$?
if [ "$rc" -eq 130 ] && grep -q '^interrupted: saved checkpoint at step [0-9]* to ' "$T/sigint.log"; then
    pass "SIGINT saves and exits 130"
else
    fail "SIGINT saves and exits 130" "exit $rc: $(tail -3 "$T/sigint.log")"
fi
n=$(sed -n 's/^interrupted: saved checkpoint at step \([0-9]*\) .*/\1/p' "$T/sigint.log")
if [ -n "$n" ] && ./train --data "$D" --out "$S" --resume --steps $((n + 1)) >"$T/sigint2.log" 2>&1 &&
    grep -q "resuming from .* at step $n" "$T/sigint2.log"; then
    pass "the interrupted checkpoint loads and resumes (step $n)"
else
    fail "the interrupted checkpoint loads and resumes" "$(tail -3 "$T/sigint2.log" 2>/dev/null)"
fi

# ---------------------------------------------------------------------------
# a second ./train on a run directory in use is refused (the first holds its lock)
L="$T/locked"
start_long_run "$L" "$T/lock1.log"
expect_error "a second run on the same --out is refused" "is in use by another ./train" ./train "${SMALL[@]}" --steps 2 --overwrite --out "$L"
kill -INT "$pid"
wait "$pid" || true

# a save killed at each step of its commit (DSV3_CRASH_AT, a test hook in fileutil.h) leaves a checkpoint
# that generate loads, and the next ./train recovers it and removes the temporaries
for at in 1 2 3; do
    K="$T/kill$at"
    ./train "${SMALL[@]}" --steps 2 --save-every 1 --val-every 0 --sample-every 0 --out "$K" >/dev/null 2>&1
    rc=0
    # 137: killed by SIGKILL inside the save (the braces keep bash's "Killed" notice quiet)
    { DSV3_CRASH_AT=$at ./train --data "$D" --resume --steps 3 --out "$K" >"$T/kill.log" 2>&1; } 2>/dev/null || rc=$?
    if [ "$rc" -eq 137 ] && ./generate --model "$K" --prompt the --max-new-tokens 2 --quiet --device cpu >/dev/null 2>&1; then
        pass "a save killed at commit step $at leaves a loadable checkpoint"
    else
        fail "a save killed at commit step $at leaves a loadable checkpoint" "exit $rc; $(ls "$K")"
    fi
    if ./train --data "$D" --resume --steps 4 --out "$K" >"$T/kill2.log" 2>&1 && [ ! -e "$K/checkpoint.tmp" ] && [ ! -e "$K/checkpoint.old" ]; then
        pass "the next run recovers the save killed at step $at and leaves no temporaries"
    else
        fail "the next run recovers the save killed at step $at" "$(tail -2 "$T/kill2.log"); $(ls "$K")"
    fi
done

# a resumed run keeps the run's data, logging and saving options (issue 10: --save-every 1 resumed with the
# default 100 and saved nothing), and takes the ones given again
R="$T/keep"
./train "${SMALL[@]}" --steps 2 --save-every 1 --val-every 1 --sample-every 0 --out "$R" >/dev/null 2>&1
./train --resume --steps 4 --out "$R" >"$T/keep.log" 2>&1
if [ "$(grep -c '^checkpoint: step' "$T/keep.log")" -eq 2 ] && [ "$(grep -c 'val' "$T/keep.log")" -ge 2 ]; then
    pass "resume keeps --data, --save-every and --val-every from the checkpoint"
else
    fail "resume keeps --data, --save-every and --val-every from the checkpoint" "$(tail -5 "$T/keep.log")"
fi
./train --resume --steps 6 --save-every 0 --out "$R" >"$T/keep2.log" 2>&1
if [ "$(grep -c '^checkpoint: step' "$T/keep2.log")" -eq 1 ]; then
    pass "an option given again on --resume replaces the recorded one"
else
    fail "an option given again on --resume replaces the recorded one" "$(grep '^checkpoint' "$T/keep2.log")"
fi

# a NaN loss skips the update and says so; the third in a row stops the run, the checkpoint untouched
# (issue 10). The head's first weight set to FLT_MAX (finite, so the checkpoint loads) overflows the logits.
N="$T/nan"
./train "${SMALL[@]}" --steps 2 --val-every 0 --sample-every 0 --out "$N" >/dev/null 2>&1
W="$N/checkpoint/model.safetensors"
hlen=$(od -An -t u8 -N 8 "$W" | tr -d ' ')
at=$(head -c $((8 + hlen)) "$W" | tail -c "$hlen" | grep -o '"lm_head.weight":{[^}]*}' | sed 's/.*"data_offsets":\[\([0-9]*\),.*/\1/')
printf '\xff\xff\x7f\x7f' | dd of="$W" bs=1 seek=$((8 + hlen + at)) conv=notrunc 2>/dev/null
before=$(md5sum <"$W")
expect_error "three NaN steps in a row stop the run" "3 updates skipped in a row; the last good checkpoint is" \
    ./train --data "$D" --resume --steps 9 --save-every 1 --out "$N"
if [ "$(grep -c 'update skipped' "$T/stdout")" -eq 3 ] && [ "$(md5sum <"$W")" = "$before" ]; then
    pass "each skipped update is reported, and the checkpoint is left as it was"
else
    fail "each skipped update is reported, and the checkpoint is left as it was" "$(tail -3 "$T/stdout")"
fi

# bad inputs are reported as such even where --out already holds a checkpoint
expect_error "a missing --config before the --out check" "nonexistent.json" ./train --config "$T/nonexistent.json" --data "$D" --out "$K"
expect_error "a mistyped --data before the --out check" "no such directory" ./train --data "$T/dta" --out "$K"

# ---------------------------------------------------------------------------
# the multi-token-prediction module: trains (on the GPU when there is one), its checkpoint has it, generate runs it
M="$T/mtp"
if ./train "${SMALL[@]}" --mtp --mtp-lambda 0.5 --steps 3 --val-every 0 --sample-every 0 --out "$M" >"$T/mtp.log" 2>&1 &&
    grep -q '^step  *3/3 | loss [0-9.]* | mtp [0-9.]* | ' "$T/mtp.log" && grep -q 'MTP module (lambda 0.5)' "$T/mtp.log" &&
    grep -q '"num_nextn_predict_layers": 1,' "$M/checkpoint/config.json" && grep -q '"mtp_lambda": 0.5,' "$M/checkpoint/trainer_state.json" &&
    grep -q 'model.layers.3.eh_proj.weight' "$M/checkpoint/model.safetensors"; then
    pass "--mtp trains the MTP module and saves it"
else
    fail "--mtp trains the MTP module and saves it" "$(tail -3 "$T/mtp.log")"
fi
if ./generate --model "$M" --prompt "the quick" --max-new-tokens 8 --device cpu --quiet >"$T/mtp_gen" 2>&1 && [ -s "$T/mtp_gen" ]; then
    pass "generate loads an MTP checkpoint and runs its main model"
else
    fail "generate loads an MTP checkpoint and runs its main model" "$(tail -3 "$T/mtp_gen")"
fi
if ./validate --model "$M" --data "$D/val.bin" --seq-len 32 >"$T/mtp_val" 2>&1 &&
    grep -q '^mtp loss [0-9.]* over [0-9]* predictions (the token after next); drafts accepted: [0-9.]*% sampled' "$T/mtp_val"; then
    pass "validate reports the MTP module's loss and its drafts' acceptance"
else
    fail "validate reports the MTP module's loss and its drafts' acceptance" "$(tail -3 "$T/mtp_val")"
fi
expect_error "--mtp-lambda out of range" "--mtp-lambda" ./train --mtp-lambda -1
expect_error "--attn-dropout out of range" "--attn-dropout" ./train --attn-dropout 1.5

# ---------------------------------------------------------------------------
finish
