#!/usr/bin/env bash
# test/sanitize_gpu.sh — test_gpu under compute-sanitizer's four tools (issue 10): memcheck with leak
# checking, racecheck, initcheck and synccheck. A sanitized kernel runs 10-100x slower, so each test case
# runs in its own process, JOBS at a time, each given at most LIMIT seconds. initcheck runs with
# DSV3_INITCHECK set (cuda_common.cuh matmul_zero_output: it cannot see cuBLASLt write a GEMM's output).
# Prints per tool the errors found, the cases that passed (a case cut off by LIMIT did not) and the
# slowest cases; exits 1 on any error or any case that did not pass. CASES="3 29" runs only those cases;
# MATCH="speculative decoding,|flash attention" those whose names match that extended regular expression.
#
# Two kinds of test case are left out or set apart. The suite "statistical" (20000 speculative samples for a
# chi-square) is skipped: its kernels run under the sanitizers in a small-batch case of their own. racecheck
# reports a hazard inside cuBLASLt's block-scaled FP8 GEMM (kernels named nvjet_*, NVIDIA's, not ours: the same
# with --racecheck-memcpy-async no, and the GEMM's results equal the emulation's); such reports are counted
# and printed apart and do not fail the run.
#
#   bash test/sanitize_gpu.sh [tools] [limit_s] [jobs]    (default "memcheck racecheck initcheck synccheck" 900 16)
set -euo pipefail
cd "$(dirname "$0")/.."
tools=${1:-memcheck racecheck initcheck synccheck} limit=${2:-900} jobs=${3:-16}
logs=test/sanitize
mkdir -p "$logs"
# The cases that must have the device to themselves (doctest suite "alone") run after the others, one at a
# time. Case i is the i-th of test_gpu --test-suite-exclude=alone,statistical, then, past those, of
# --test-suite=alone.
shared=--test-suite-exclude=alone,statistical alone=--test-suite=alone
count_of() { ./test/test_gpu --list-test-cases "$1" | grep -o 'passing the current filters: [0-9]*' | grep -o '[0-9]*$'; }
shared_count=$(count_of $shared) alone_count=$(count_of $alone)
cases=${CASES:-$(seq $((shared_count + alone_count)))}
if [ -n "${MATCH:-}" ]; then
    cases=$(for filter in $shared $alone; do
        ./test/test_gpu --list-test-cases "$filter" | grep -v '^\[doctest\]\|^====='
    done | grep -n -E "$MATCH" | cut -d: -f1 | paste -sd' ' || true)
    [ -n "$cases" ] || { echo "MATCH=$MATCH: no test case of test_gpu has such a name" >&2; exit 2; }
    echo "cases matching $MATCH: $cases"
fi

# one case under one tool: its log is $logs/TOOL.CASE.log
sanitize_case() {
    local tool=$1 i=$2 options=() filter=$shared n=$2
    case $tool in
        memcheck) options=(--leak-check full) ;;
    esac
    if [ "$i" -gt "$shared_count" ]; then filter=$alone n=$((i - shared_count)); fi
    if [ "$tool" = initcheck ]; then export DSV3_INITCHECK=1; fi
    SECONDS=0
    timeout "$limit" compute-sanitizer --tool "$tool" "${options[@]}" --print-limit 100 ./test/test_gpu "$filter" --first="$n" \
        --last="$n" > "$logs/$tool.$i.log" 2>&1 || true
    echo "$SECONDS" > "$logs/$tool.$i.seconds"
}
export -f sanitize_case
export logs limit shared_count shared alone

for tool in $tools; do
    for i in $cases; do if [ "$i" -le "$shared_count" ]; then echo "$tool $i"; fi; done
done | xargs -r -P "$jobs" -n 2 bash -c 'sanitize_case "$0" "$1"'
for tool in $tools; do
    for i in $cases; do if [ "$i" -gt "$shared_count" ]; then sanitize_case "$tool" "$i"; fi; done
done

status=0
for tool in $tools; do
    errors=0 vendor=0 passed=0 unfinished=() total=0
    for i in $cases; do
        total=$((total + 1))
        log=$logs/$tool.$i.log
        if grep -q '\[doctest\] Status: SUCCESS' "$log"; then passed=$((passed + 1)); else unfinished+=("$i"); fi
        n=$(grep -o 'ERROR SUMMARY: [0-9]* error\|([0-9]* errors' "$log" | grep -o '[0-9]*' | head -1 || true)
        errors=$((errors + ${n:-0}))
        vendor=$((vendor + $(grep -c 'Race reported between [A-Za-z]* access at nvjet_' "$log" || true)))
    done
    errors=$((errors - vendor))
    slowest=$(for i in $cases; do echo "$(cat "$logs/$tool.$i.seconds") s case $i"; done | sort -rn | head -3 | paste -sd, -)
    apart=""
    if [ "$vendor" -gt 0 ]; then apart=" (and $vendor in cuBLASLt's nvjet_* kernels)"; fi
    echo "$tool: $errors errors$apart; $passed of $total cases passed${unfinished:+ (not: ${unfinished[*]})}; slowest: $slowest"
    if [ "$errors" -gt 0 ] || [ "${#unfinished[@]}" -gt 0 ]; then status=1; fi
    if [ "$errors" -gt 0 ] || [ "$vendor" -gt 0 ]; then
        echo "  kernels in the reports:"
        # memcheck, initcheck and synccheck name the kernel after "at", racecheck after "access at" (then +offset)
        grep -h -o '=========     at [^(]*\|access at [^+ ]*' "$logs/$tool".*.log | sed 's/=========     at //; s/access at //' | sort |
            uniq -c | sort -rn | head -10 || true
    fi
done
exit $status
