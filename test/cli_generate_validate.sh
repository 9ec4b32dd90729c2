#!/usr/bin/env bash
# test/cli_generate_validate.sh — black-box checks of ./generate and ./validate:
# help, bad input (one 'error:' line and a non-zero exit), repeatable sampling,
# raw token mode, the integration checks (their summary, JSON records, memory growth,
# an unbalanced expert load, a run's own data; their GPU parts on a GPU, reported as
# skipped without one) and the loss mode (its default window). Runs from the repo root
# after the build (make test); needs ./train and ./data/prepare too. No Python.
set -euo pipefail

source "$(dirname "$0")/cli_lib.bash"

for bin in ./generate ./validate ./train ./data/prepare; do
    if [ ! -x "$bin" ]; then
        echo "FAIL: $bin is not built (run make first)"
        exit 1
    fi
done

# runs "$@" and expects exit status 0
expect_ok() {
    local desc=$1
    shift
    if "$@" >"$T/out" 2>"$T/err" </dev/null; then
        pass "$desc"
    else
        fail "$desc: exit status $?, stderr: $(tail -n 3 "$T/err")"
    fi
}

# ---------------------------------------------------------------------------
# a tiny checkpoint: bytes dataset from the repo's own sources, 3 training steps
cat common.h cli.h config.h >"$T/text.txt"
./data/prepare --input "$T/text.txt" --out "$T/data" --vocab 256 >/dev/null
./train --preset tiny --steps 3 --seq-len 16 --batch-size 2 --out "$T/run" --data "$T/data" >"$T/train.log" 2>&1 ||
    { echo "FAIL: ./train could not make the test checkpoint:"; tail -n 5 "$T/train.log"; exit 1; }
RUN=$T/run        # a run directory: the binaries find RUN/checkpoint
CKPT=$T/run/checkpoint
CONTEXT=64          # the tiny preset's max_position_embeddings
GEN=(./generate --model "$RUN" --max-new-tokens 12 --quiet)

# ---------------------------------------------------------------------------
# help and bad command lines
expect_ok "generate --help exits 0" ./generate --help
grep -q -- "--max-new-tokens" "$T/out" && pass "generate --help lists the options" || fail "generate --help lists the options"
expect_ok "validate --help exits 0" ./validate --help
grep -q -- "--preset" "$T/out" && pass "validate --help lists the options" || fail "validate --help lists the options"

expect_error "generate: unknown flag" "--bogus" ./generate --model "$RUN" --bogus
expect_error "validate: unknown flag" "--bogus" ./validate --model "$RUN" --bogus
expect_error "generate: missing model dir" "does not exist" ./generate --model "$T/nowhere" --prompt hi
expect_error "validate: missing model dir" "does not exist" ./validate --model "$T/nowhere"
expect_error "generate: bad number" "not an integer" ./generate --model "$RUN" --max-new-tokens 12x
expect_error "generate: bad float" "not a number" ./generate --model "$RUN" --temperature hot
expect_error "generate: top-p out of range" "outside" ./generate --model "$RUN" --top-p 2
expect_error "validate: bad number" "not an integer" ./validate --preset tiny --batches many
expect_error "validate: unknown preset" "unknown preset" ./validate --preset huge
expect_error "validate: --model and --preset" "not both" ./validate --model "$RUN" --preset tiny
expect_error "validate: --seq-len beyond the context" "exceeds" ./validate --preset tiny --seq-len 65
if ! nvidia-smi -L >/dev/null 2>&1; then
    expect_error "generate: --device gpu without a GPU" "no CUDA device" ./generate --model "$RUN" --device gpu --prompt hi
fi
expect_error "generate: --prompt with --prompts-file" "give one of" ./generate --model "$RUN" --prompt hi --prompts-file x
expect_error "generate: missing prompts file" "x_missing" ./generate --model "$RUN" --prompts-file "$T/x_missing"
: >"$T/empty_prompts.txt"
expect_error "generate: empty prompts file" "no prompts" ./generate --model "$RUN" --prompts-file "$T/empty_prompts.txt"
expect_error "generate: --tokens id >= vocab" "outside the model's vocabulary" "${GEN[@]}" --tokens "1 2 256"
expect_error "generate: --tokens not a number" "not a token id" "${GEN[@]}" --tokens "1 two"
LONG=$(printf 'a%.0s' $(seq 1 100))
expect_error "generate: prompt longer than the context" "prompt is 100 tokens but the model's context is $CONTEXT" \
    "${GEN[@]}" --prompt "$LONG"

# damaged checkpoints: each one is refused by both binaries
damaged() {  # damaged NAME: a copy of the checkpoint to break
    rm -rf "${T:?}/$1"
    cp -r "$CKPT" "$T/$1"
    echo "$T/$1"
}
D=$(damaged truncated)
size=$(wc -c <"$D/model.safetensors")
head -c $((size - 100)) "$CKPT/model.safetensors" >"$D/model.safetensors"
expect_error "generate: truncated model.safetensors" "model.safetensors" ./generate --model "$D" --prompt hi
expect_error "validate: truncated model.safetensors" "model.safetensors" ./validate --model "$D"

D=$(damaged badconfig)
sed 's/"num_experts_per_tok": [0-9]*/"num_experts_per_tok": 9/' "$CKPT/config.json" >"$D/config.json"
grep -q '"num_experts_per_tok": 9' "$D/config.json" || fail "test setup: could not edit num_experts_per_tok"
expect_error "generate: config with top-k > experts" "num_experts_per_tok" ./generate --model "$D" --prompt hi
expect_error "validate: config with top-k > experts" "num_experts_per_tok" ./validate --model "$D"

D=$(damaged missingtensor)
sed 's/"num_hidden_layers": [0-9]*/"num_hidden_layers": 4/' "$CKPT/config.json" >"$D/config.json"
grep -q '"num_hidden_layers": 4' "$D/config.json" || fail "test setup: could not edit num_hidden_layers"
expect_error "generate: safetensors missing a tensor" "model.layers.3" ./generate --model "$D" --prompt hi
expect_error "validate: safetensors missing a tensor" "model.layers.3" ./validate --model "$D"

D=$(damaged notjson)
echo '{"vocab_size": 256,' >"$D/config.json"
expect_error "validate: config.json that is not JSON" "config.json" ./validate --model "$D"

# ---------------------------------------------------------------------------
# sampling
"${GEN[@]}" --prompt "int main" --seed 5 >"$T/a.txt" || fail "generate exited with status $? (line 118)"
"${GEN[@]}" --prompt "int main" --seed 5 >"$T/b.txt" || fail "generate exited with status $? (line 119)"
cmp -s "$T/a.txt" "$T/b.txt" && pass "generate: the same seed gives the same output" ||
    fail "generate: the same seed gives different outputs"
head -c 8 "$T/a.txt" | grep -q "^int main" && pass "generate: the prompt is printed first" ||
    fail "generate: output does not start with the prompt"
printf 'int main' | "${GEN[@]}" --seed 5 >"$T/c.txt" || fail "generate exited with status $? (line 124)"
cmp -s "$T/a.txt" "$T/c.txt" && pass "generate: a prompt on stdin equals --prompt" ||
    fail "generate: a prompt on stdin differs from --prompt"
"${GEN[@]}" --prompt "int main" --temperature 0 --seed 1 >"$T/g1.txt" || fail "generate exited with status $? (line 127)"
"${GEN[@]}" --prompt "int main" --temperature 0 --seed 2 >"$T/g2.txt" || fail "generate exited with status $? (line 128)"
cmp -s "$T/g1.txt" "$T/g2.txt" && pass "generate: --temperature 0 is the same for every seed" ||
    fail "generate: --temperature 0 depends on the seed"
"${GEN[@]}" --tokens "105 110 116 32" --seed 3 >"$T/t.txt" || fail "generate exited with status $? (line 131)"
if grep -Eq '^[0-9]+( [0-9]+)*$' "$T/t.txt" && [ "$(wc -l <"$T/t.txt")" -eq 1 ] &&
    [ "$(wc -w <"$T/t.txt")" -eq 16 ]; then
    pass "generate --tokens prints only integers (4 prompt ids + 12 new): $(cat "$T/t.txt")"
else
    fail "generate --tokens output is not 16 integers on one line: $(cat "$T/t.txt")"
fi
"${GEN[@]}" --tokens "" --seed 3 >"$T/e.txt" || fail "generate exited with status $? (line 138)"
[ "$(wc -w <"$T/e.txt")" -eq 12 ] && pass "generate: an empty prompt starts from '\\n' and generates" ||
    fail "generate: empty prompt output: $(cat "$T/e.txt")"
./generate --model "$RUN" --prompt "int main" --max-new-tokens 1000 >"$T/full.txt" 2>"$T/full.err" || fail "generate exited with status $? (line 141)"
grep -q "context is full" "$T/full.err" && grep -q "tokens/s" "$T/full.err" &&
    grep -q "time to first token" "$T/full.err" &&
    pass "generate: stops at a full context and reports tokens/s and time to first token" ||
    fail "generate: stderr was: $(cat "$T/full.err")"

# without a GPU generate says once on stderr that it is on the slow CPU path (not with --quiet)
./generate --model "$RUN" --prompt "int" --max-new-tokens 2 >/dev/null 2>"$T/note.err" || fail "generate exited with status $? (note)"
./generate --model "$RUN" --prompt "int" --max-new-tokens 2 --quiet >/dev/null 2>"$T/quiet.err" || fail "generate exited with status $? (quiet)"
if nvidia-smi -L >/dev/null 2>&1; then want=0; else want=1; fi
[ "$(grep -c '^note: no GPU found, so this is the slow CPU reference path' "$T/note.err")" -eq "$want" ] && [ ! -s "$T/quiet.err" ] &&
    pass "generate: the CPU-path note is printed $want time(s), and not with --quiet" ||
    fail "generate: CPU note: '$(cat "$T/note.err")', with --quiet: '$(cat "$T/quiet.err")'"

# batch generation from a prompts file
printf 'int main\nstatic\n\n' >"$T/prompts.txt"
"${GEN[@]}" --prompts-file "$T/prompts.txt" --seed 5 >"$T/batch1.txt" || fail "generate exited with status $? (batch)"
"${GEN[@]}" --prompts-file "$T/prompts.txt" --seed 5 >"$T/batch2.txt" || fail "generate exited with status $? (batch)"
if [ "$(grep -c '^\[[0-2]\] ' "$T/batch1.txt")" -ge 3 ] && grep -q '^\[0\] int main' "$T/batch1.txt" &&
    grep -q '^\[1\] static' "$T/batch1.txt"; then
    pass "generate --prompts-file prints each output with its index"
else
    fail "generate --prompts-file output: $(cat "$T/batch1.txt")"
fi
cmp -s "$T/batch1.txt" "$T/batch2.txt" && pass "generate --prompts-file: the same seed gives the same outputs" ||
    fail "generate --prompts-file: the same seed gives different outputs"
# prompt 0 of a batch draws the coins of a single run with the same seed (on the CPU,
# where a batch row computes exactly what a single sequence does; GPU GEMMs may
# round differently for another batch size)
"${GEN[@]}" --device cpu --prompt "int main" --seed 5 >"$T/a_cpu.txt" || fail "generate exited with status $? (cpu)"
"${GEN[@]}" --device cpu --prompts-file "$T/prompts.txt" --seed 5 >"$T/batch_cpu.txt" || fail "generate exited with status $? (cpu)"
head -c "$(wc -c <"$T/a_cpu.txt")" < <(sed -n '1s/^\[0\] //p' "$T/batch_cpu.txt") | cmp -s - "$T/a_cpu.txt" &&
    pass "generate: prompt 0 of a batch equals the single-prompt run" ||
    fail "generate: batch prompt 0 '$(head -1 "$T/batch_cpu.txt")' differs from '$(cat "$T/a_cpu.txt")'"

# --jsonl: one JSON object per prompt per line, parseable although continuations hold
# newlines. JSON_LINE is the whole line's grammar (strings as RFC 8259 has them);
# iconv checks that the bytes are valid UTF-8. Prompt 1 needs escapes (quotes, a tab,
# a backslash); prompt 3 holds invalid UTF-8: a stray \xff and a character cut short
# (\xe2\x82), each one U+FFFD in the JSON.
STR='"([^"\\[:cntrl:]]|\\["\\/bfnrt]|\\u[0-9a-fA-F]{4})*"'
NUM='[0-9]+\.[0-9]+'
JSON_LINE="^\{\"index\": [0-9]+, \"prompt\": $STR, \"completion\": $STR, \"prompt_tokens\": [0-9]+, \"completion_tokens\": [0-9]+, \"stop\": \"(max_new_tokens|end_of_text|context_full)\", \"elapsed_s\": $NUM, \"time_to_first_token_s\": $NUM\}\$"
printf 'int main\nsay "hi"\tto a\\b\n\nint \xff\xe2\x82 main\n' >"$T/jsonl_prompts.txt"
"${GEN[@]}" --prompts-file "$T/jsonl_prompts.txt" --seed 5 --jsonl >"$T/batch.jsonl" || fail "generate --jsonl exited with status $?"
if [ "$(wc -l <"$T/batch.jsonl")" -eq 4 ] && [ "$(LC_ALL=C grep -Ecv "$JSON_LINE" "$T/batch.jsonl")" -eq 0 ] &&
    iconv -f UTF-8 -t UTF-8 "$T/batch.jsonl" >/dev/null 2>&1; then
    pass "generate --jsonl: 4 prompts give 4 lines, each one JSON object of valid UTF-8"
else
    fail "generate --jsonl output: $(cat -v "$T/batch.jsonl")"
fi
field() { sed -n "$(($1 + 1))s/.*\"$2\": \([^,}]*\).*/\1/p" "$T/batch.jsonl"; }  # field LINE KEY (no commas in it)
bytes=$(while IFS= read -r line; do printf '%s ' "$(printf '%s' "$line" | wc -c)"; done <"$T/jsonl_prompts.txt")
if [ "$(field 0 index) $(field 1 index) $(field 2 index) $(field 3 index)" = "0 1 2 3" ] &&
    [ "$(field 0 prompt)" = '"int main"' ] && [ "$(field 1 prompt)" = '"say \"hi\"\tto a\\b"' ] && [ "$(field 2 prompt)" = '""' ] &&
    [ "$(field 3 prompt)" = "$(printf '"int \xef\xbf\xbd\xef\xbf\xbd main"')" ] &&
    [ "$(for i in 0 1 2 3; do printf '%s ' "$(field $i prompt_tokens)"; done)" = "$bytes" ] &&
    [ "$(field 0 completion_tokens) $(field 2 completion_tokens)" = "12 12" ] && [ "$(field 0 stop)" = '"max_new_tokens"' ]; then
    pass "generate --jsonl: index, escaped prompt (invalid UTF-8 replaced), token counts and stop per prompt"
else
    fail "generate --jsonl fields (prompt bytes $bytes): $(cat -v "$T/batch.jsonl")"
fi
# with --tokens the prompt and completion are id arrays: the same ids as the plain run
"${GEN[@]}" --tokens "105 110 116 32" --seed 3 --jsonl >"$T/t.jsonl" || fail "generate --tokens --jsonl exited with status $?"
ids=$(sed -n 's/.*"prompt": \[\([0-9, ]*\)\], "completion": \[\([0-9, ]*\)\].*/\1, \2/p' "$T/t.jsonl" | tr -d ,)
[ -n "$ids" ] && [ "$ids" = "$(cat "$T/t.txt")" ] && pass "generate --tokens --jsonl: the ids of the plain run ($ids)" ||
    fail "generate --tokens --jsonl: '$(cat "$T/t.jsonl")' vs '$(cat "$T/t.txt")'"

printf 'ok\n%s\n' "$LONG" >"$T/long_prompts.txt"
expect_error "generate: a prompts-file line longer than the context" "line 2: prompt is 100 tokens but the model's context is $CONTEXT" \
    "${GEN[@]}" --prompts-file "$T/long_prompts.txt"

# ---------------------------------------------------------------------------
# integration checks
VALIDATE=$PWD/validate
# "X Y" from the summary line "passed X of Y checks ..." of the table in $1
summary() { sed -n 's/^passed \([0-9]*\) of \([0-9]*\) checks.*/\1 \2/p' "$1"; }
# the values of column $2 of the memory check's table in $1, one a line
memory_column() {
    awk -v col="$2" '$1 == "seq_len" { for (i = 1; i <= NF; i++) if ($i == col) c = i; next }
                     c && $1 !~ /^[0-9]+$/ { exit } c { print $c }' "$1"
}
# the number "key": value of the JSON in $1
json_number() { grep -o "\"$2\": [-0-9.e+]*" "$1" | head -n 1 | sed 's/.*: //'; }

expect_ok "validate: integration checks pass on the checkpoint" ./validate --model "$RUN"
read -r x y < <(summary "$T/out") || true
if [ -n "${y:-}" ] && [ "$y" -ge 4 ] && [ "$x" = "$y" ] && [ "$(grep -c ' PASS$' "$T/out")" -eq "$y" ] &&
    grep -q "^no issues found$" "$T/out"; then
    pass "validate: the table says passed $x of $y checks, no issues"
else
    fail "validate: table output: $(cat "$T/out")"
fi
[ "$(grep -c '^validate: [1-5]/5 ' "$T/err")" -eq 5 ] && pass "validate: each of the 5 checks says on stderr when it starts" ||
    fail "validate: progress lines on stderr: $(cat "$T/err")"

expect_ok "validate: integration checks pass on --preset tiny" ./validate --preset tiny --batches 4
# tiny: context 64 (under 512, so its 1/8, 1/4, 1/2 and whole), kv_lora_rank 12, rope 4, 3 layers, 2 heads, nope 8, v 6
lengths=$(memory_column "$T/out" seq_len | tr '\n' ' ')
growth=$(memory_column "$T/out" cpu_growth | tail -n +2)
if [ "$lengths" = "8 16 32 64 " ] && [ "$(echo "$growth" | wc -l)" -eq 3 ] &&
    echo "$growth" | awk '!($1 > 0 && $1 < 1.5) { bad = 1 } END { exit bad }' &&
    memory_column "$T/out" cpu_bytes | awk 'NR > 1 && $1 <= prev { bad = 1 } { prev = $1 } END { exit bad }'; then
    pass "validate: the CPU decoder's memory grows with the length, each ratio < 1.5: $(echo $growth)"
else
    fail "validate: memory table: lengths '$lengths', growth '$(echo $growth)': $(cat "$T/out")"
fi

expect_ok "validate --json runs" ./validate --preset tiny --batches 2 --json
names=$(grep -o '"name": "[a-z_]*", "passed": [a-z]*' "$T/out" | sed 's/"name": "\([a-z_]*\)".*/\1/' | tr '\n' ' ')
if [ "$(wc -l <"$T/out")" -eq 1 ] && [ "$names" = "forward gradient_flow expert_utilisation memory gpu_vs_cpu " ] &&
    grep -Eq '"summary": \{"passed": ([45]), "of": \1, "all_passed": true' "$T/out" &&
    [ "$(grep -c '^validate: [1-5]/5 ' "$T/err")" -eq 5 ]; then
    pass "validate --json prints one object with a record per check and the summary (progress on stderr)"
else
    fail "validate --json output: names '$names': $(cat "$T/out")"
fi
tensors=$(grep -o '"tensor": "[^"]*", "shape": \[[0-9, ]*\], "grad_norm": [0-9.e+-]*, "nan": false, "inf": false' "$T/out" || true)
# sed -n 1p, not head -n 1: head exits at the first line, and an echo still writing then dies of SIGPIPE, which
# pipefail makes the check's failure (seen once in CI)
if [ "$(echo "$tensors" | wc -l)" -eq 10 ] && echo "$tensors" | sed -n 1p | grep -q '"model.embed_tokens.weight", "shape": \[61, 32\]' &&
    echo "$tensors" | sed 's/.*"grad_norm": \([^,]*\),.*/\1/' | awk '!($1 > 0) { bad = 1 } END { exit bad }'; then
    pass "validate --json: gradient flow lists 10 tensors with shape, a non-zero norm and NaN/inf flags"
else
    fail "validate --json gradient table: $tensors"
fi
[ "$(json_number "$T/out" mla_cache_bytes_per_token)" = $((2 * (12 + 4) * 3)) ] &&
    [ "$(json_number "$T/out" mha_cache_bytes_per_token)" = $((2 * (2 * (8 + 4) + 2 * 6) * 3)) ] &&
    [ "$(json_number "$T/out" cpu_cache_bytes_per_token)" = $((4 * (12 + 4) * 3)) ] &&
    pass "validate --json: the latent cache's bytes per token (measured and formula) and the MHA cache's" ||
    fail "validate --json memory numbers: $(grep -o '"name": "memory".*' "$T/out")"

# 2 tokens, top-3 of 8 experts: at least 2 experts get none, an unbalanced load (max/min inf)
if ./validate --preset tiny --batches 1 --batch-size 1 --seq-len 2 >"$T/out" 2>"$T/err"; then
    fail "validate: an unbalanced expert load exits 0"
else
    read -r x y < <(summary "$T/out") || true
    if [ -n "${y:-}" ] && [ "$x" -eq $((y - $(grep -c ' FAIL$' "$T/out"))) ] && [ "$x" -lt "$y" ] &&
        grep -q '^3\. expert utilisation .*FAIL$' "$T/out" && grep -q '^issues found:$' "$T/out" &&
        grep -q '^  expert utilisation: unbalanced expert load in layer [0-9]*: max/min ratio inf >= 5 (loads 0.00% .. [0-9.]*% over 2 tokens, [2-8] idle)$' "$T/out"; then
        pass "validate: an unbalanced expert load is an issue with its numbers (passed $x of $y, exit 1)"
    else
        fail "validate: unbalanced expert load output: $(cat "$T/out")"
    fi
fi
./validate --preset tiny --batches 1 --batch-size 1 --seq-len 2 --json >"$T/out" 2>/dev/null && fail "validate --json: unbalanced load exits 0"
grep -q '"name": "expert_utilisation", "passed": false' "$T/out" && grep -q '"all_passed": false, .*"issues": \[.*"expert utilisation: unbalanced' "$T/out" &&
    pass "validate --json: the unbalanced load fails its check and is listed in the summary's issues" ||
    fail "validate --json unbalanced load: $(cat "$T/out")"

expect_ok "validate --checks on the checkpoint with --data" ./validate --model "$RUN" --data "$T/data/val.bin" --checks --json
grep -q '"name": "gradient_flow", "passed": true' "$T/out" && pass "validate --checks: gradient flow passes on real data" ||
    fail "validate --checks output: $(cat "$T/out")"
LOSS_DATA=$(json_number "$T/out" loss)
# a training run's checks, without --data, use data/default/val.bin (from the working directory, as
# ./train does) when that dataset's tokenizer is the model's, and say so; else random tokens
mkdir -p "$T/cwd_same/data" "$T/cwd_other/data"
ln -s "$T/data" "$T/cwd_same/data/default"
./data/prepare --input "$T/text.txt" --out "$T/cwd_other/data/default" --vocab 300 >/dev/null
(cd "$T/cwd_same" && "$VALIDATE" --model "$RUN" --json) >"$T/out" 2>"$T/err" || fail "validate in cwd_same exited with status $?"
grep -q '"data": "data/default/val.bin (the default dataset, whose tokenizer is the model' "$T/out" &&
    [ "$(json_number "$T/out" loss)" = "$LOSS_DATA" ] && grep -q '"all_passed": true' "$T/out" &&
    pass "validate: a run's checks use data/default/val.bin when its tokenizer is the model's (loss $LOSS_DATA as with --data) and pass" ||
    fail "validate: run data ($LOSS_DATA with --data): $(cat "$T/out")"
(cd "$T/cwd_other" && "$VALIDATE" --model "$RUN" --batches 2) >"$T/out" 2>"$T/err" || fail "validate in cwd_other exited with status $?"
grep -q "from random tokens (seed 1337): the run does not record its data, and data/default/val.bin is missing or has another tokenizer" "$T/out" &&
    pass "validate: a dataset of another tokenizer is not used, and the output says so" || fail "validate: other tokenizer: $(cat "$T/out")"

expect_ok "validate --device cpu" ./validate --preset tiny --batches 1 --device cpu
grep -q "^5. GPU vs CPU .*SKIPPED" "$T/out" && grep -q "GPU decoder: skipped (--device cpu)" "$T/out" &&
    grep -q "(skipped: GPU vs CPU: --device cpu)" "$T/out" &&
    pass "validate --device cpu reports the GPU checks as skipped" || fail "validate --device cpu output: $(cat "$T/out")"
if nvidia-smi -L >/dev/null 2>&1; then
    expect_ok "validate: the GPU checks pass on the checkpoint" ./validate --model "$RUN" --device gpu --json
    grep -q '"name": "memory", "passed": true' "$T/out" && grep -q '"gpu_growth": ' "$T/out" &&
        grep -q '"name": "gpu_vs_cpu", "passed": true' "$T/out" && grep -q '"summary": {"passed": 5, "of": 5' "$T/out" &&
        pass "validate --json: the GPU decoder's memory and GPU vs CPU pass" || fail "validate --device gpu output: $(cat "$T/out")"
else
    expect_ok "validate without a GPU" ./validate --preset tiny --batches 1 --json
    grep -q '"name": "gpu_vs_cpu", "passed": null, "skipped": "no CUDA device"' "$T/out" &&
        pass "validate without a GPU reports the GPU checks as skipped" || fail "validate without a GPU: $(cat "$T/out")"
    expect_error "validate: --device gpu without a GPU" "no CUDA device" ./validate --model "$RUN" --device gpu
fi

# ---------------------------------------------------------------------------
# loss mode: the window defaults to the run's training seq_len (16 here), else the context
expect_ok "validate: loss mode" ./validate --model "$RUN" --data "$T/data/val.bin"
LOSS1=$(cat "$T/out")
if [[ $LOSS1 =~ ^loss\ ([0-9.]+)\ over\ ([0-9]+)\ predictions\ \(seq_len\ 16,\ the\ training\ length\;\ (cpu|gpu)\)$ ]]; then
    digits=$(echo "${BASH_REMATCH[1]}" | tr -d '.' | sed 's/^0*//')
    [ "${#digits}" -ge 7 ] && pass "validate: loss printed with ${#digits} significant digits ($LOSS1)" ||
        fail "validate: loss has only ${#digits} significant digits: $LOSS1"
else
    fail "validate: loss line has the wrong form: $LOSS1"
fi
./validate --model "$RUN" --data "$T/data/val.bin" >"$T/loss2.txt" || fail "validate exited with status $? (loss twice)"
[ "$LOSS1" = "$(cat "$T/loss2.txt")" ] && pass "validate: the loss is the same when run twice" ||
    fail "validate: losses differ: $LOSS1 vs $(cat "$T/loss2.txt")"
./validate --model "$RUN" --data "$T/data/val.bin" --json >"$T/loss.json" || fail "validate exited with status $? (loss json)"
grep -Eq '^\{"loss": [0-9.e+-]+, "predictions": [0-9]+, "seq_len": 16, "seq_len_from": "the training length", "device": "(cpu|gpu)"\}$' "$T/loss.json" &&
    pass "validate --json loss mode: $(cat "$T/loss.json")" || fail "validate --json loss mode: $(cat "$T/loss.json")"
./validate --model "$RUN" --data "$T/data/val.bin" --seq-len 8 --batch-size 3 >"$T/loss8.txt" || fail "validate exited with status $? (seq-len 8)"
grep -q "(seq_len 8, --seq-len; " "$T/loss8.txt" && [ "$(cat "$T/loss8.txt")" != "$LOSS1" ] &&
    pass "validate: --seq-len sets the window ($(cat "$T/loss8.txt"))" || fail "validate --seq-len 8: $(cat "$T/loss8.txt")"
cp -r "$CKPT" "$T/weights_only"
rm "$T/weights_only/trainer_state.json" "$T/weights_only/optimizer.safetensors"
./validate --model "$T/weights_only" --data "$T/data/val.bin" >"$T/loss_ctx.txt" || fail "validate exited with status $? (weights only)"
grep -q "(seq_len $CONTEXT, the context; " "$T/loss_ctx.txt" &&
    pass "validate: without a training state the window is the context ($(cat "$T/loss_ctx.txt"))" ||
    fail "validate: weights-only loss: $(cat "$T/loss_ctx.txt")"

# an llm.c token file (magic 20240520, version 1, uint16) whose third token, 300, is >= vocab 256
le32() { printf "\\x$(printf %02x $(($1 & 255)))\\x$(printf %02x $(($1 >> 8 & 255)))\\x$(printf %02x $(($1 >> 16 & 255)))\\x$(printf %02x $(($1 >> 24 & 255)))"; }
{
    le32 20240520
    le32 1
    le32 4
    head -c $((253 * 4)) /dev/zero
    printf '\x41\x00\x42\x00\x2c\x01\x43\x00'
} >"$T/bad_vocab.bin"
expect_error "validate: loss on a token file with a token >= vocab" "token 300 at position 2 is >= vocab_size 256" \
    ./validate --model "$RUN" --data "$T/bad_vocab.bin"
head -c 2000 "$T/data/val.bin" >"$T/truncated.bin"
expect_error "validate: truncated token file" "truncated: header says" ./validate --model "$RUN" --data "$T/truncated.bin"
{
    le32 12345
    le32 1
    le32 0
    head -c $((253 * 4)) /dev/zero
} >"$T/bad_magic.bin"
expect_error "validate: token file with a wrong magic" "bad magic" ./validate --model "$RUN" --data "$T/bad_magic.bin"
expect_error "validate: missing token file" "cannot open" ./validate --model "$RUN" --data "$T/nothing.bin"

# a batch whose latent caches cannot fit in memory is refused by its size before anything is allocated
# (issue 10: 20,000 prompts x 2,000 new tokens ended in bad_alloc): mini caches 1.5 KiB a token, so 200,000
# prompts of 1,024 tokens need 293 GiB
./train --preset mini --steps 1 --seq-len 16 --batch-size 1 --device cpu --out "$T/mini" --data "$T/data" >/dev/null 2>&1
awk 'BEGIN { for (i = 0; i < 200000; i++) print "a" }' >"$T/many_prompts.txt"
expect_error "generate: a batch too large for memory" "GiB of latent cache" ./generate --model "$T/mini" --prompts-file "$T/many_prompts.txt" \
    --max-new-tokens 2000 --device cpu

# ---------------------------------------------------------------------------
# FP8: training with the emulated FP8 GEMMs (the CPU), kept on --resume, saved in
# DeepSeek-V3's FP8 checkpoint format, which generate and validate load
FP8=$T/fp8run
expect_ok "train --fp8 on the CPU, saved as FP8" ./train --preset tiny --steps 2 --seq-len 16 --batch-size 2 --fp8 --save-dtype fp8 \
    --device cpu --out "$FP8" --data "$T/data"
grep -q '"fp8": true' "$FP8/checkpoint/trainer_state.json" && pass "trainer_state.json records fp8" ||
    fail "trainer_state.json records fp8: $(grep fp8 "$FP8/checkpoint/trainer_state.json")"
grep -q '"quant_method": "fp8"' "$FP8/checkpoint/config.json" && pass "config.json has DeepSeek's quantization_config" ||
    fail "config.json has no quantization_config"
expect_ok "train --resume of an FP8 run" ./train --resume --steps 3 --device cpu --save-dtype fp8 --out "$FP8" --data "$T/data"
grep -q '"fp8": true' "$FP8/checkpoint/trainer_state.json" && pass "the resumed run is still FP8" || fail "the resumed run lost --fp8"
expect_ok "generate from an FP8 checkpoint" ./generate --model "$FP8" --prompt hi --max-new-tokens 8 --quiet --device cpu
expect_ok "validate an FP8 checkpoint" ./validate --model "$FP8" --data "$T/data/val.bin" --device cpu
expect_ok "validate --fp8: the loss with the FP8 GEMMs" ./validate --model "$FP8" --data "$T/data/val.bin" --device cpu --fp8
expect_ok "validate --fp8: the checks, FP8 among them, pass" ./validate --preset tiny --fp8 --device cpu --json
grep -q '"name": "fp8", "passed": true' "$T/out" && pass "validate --fp8 reports the FP8 check" ||
    fail "validate --fp8 reports the FP8 check: $(head -c 300 "$T/out")"

# ---------------------------------------------------------------------------
# self-speculative decoding with the MTP module (CPU): greedy gives plain greedy's tokens, alone and in a batch
MTP=$T/mtprun
expect_ok "train --mtp on the CPU" ./train --preset tiny --mtp --steps 3 --seq-len 16 --batch-size 2 --device cpu --out "$MTP" --data "$T/data"
./generate --model "$MTP" --tokens "1 2 3" --max-new-tokens 24 --temperature 0 --device cpu --no-speculative >"$T/plain" 2>/dev/null
if ./generate --model "$MTP" --tokens "1 2 3" --max-new-tokens 24 --temperature 0 --device cpu >"$T/spec" 2>"$T/spec_err" &&
    cmp -s "$T/plain" "$T/spec" && grep -q 'speculative: [0-9.]*% of [0-9]* drafts accepted' "$T/spec_err"; then
    pass "generate: speculative greedy (the default with an MTP module) equals plain greedy ($(grep -o 'speculative: .*' "$T/spec_err"))"
else
    fail "generate: speculative greedy equals plain greedy: $(cat "$T/plain") vs $(cat "$T/spec") $(tail -n 2 "$T/spec_err")"
fi
printf 'the\nto be or\n\nq\n' >"$T/mtp_prompts.txt"
./generate --model "$MTP" --prompts-file "$T/mtp_prompts.txt" --max-new-tokens 20 --temperature 0 --device cpu --no-speculative \
    >"$T/plain" 2>/dev/null
./generate --model "$MTP" --prompts-file "$T/mtp_prompts.txt" --max-new-tokens 20 --temperature 0 --device cpu --speculative \
    >"$T/spec" 2>/dev/null
cmp -s "$T/plain" "$T/spec" && pass "generate: speculative greedy equals plain greedy in a batch" ||
    fail "generate: speculative greedy equals plain greedy in a batch: $(head -c 300 "$T/spec")"
expect_ok "generate: speculative sampling" ./generate --model "$MTP" --prompt hi --max-new-tokens 16 --device cpu --speculative
expect_error "generate --speculative without an MTP module" "no MTP module" ./generate --model "$T/run" --prompt hi --device cpu --speculative

finish
