#!/usr/bin/env bash
# test/sanitize_gpu.sh — test_gpu under compute-sanitizer's four tools (issue 10): memcheck with leak
# checking, racecheck, initcheck and synccheck. A sanitized kernel runs 10-100x slower, so each test case
# runs in its own process, JOBS at a time, each given at most LIMIT seconds. initcheck runs with
# DSV3_INITCHECK set (cuda_common.cuh matmul_zero_output: it cannot see cuBLASLt write a GEMM's output).
# Prints per tool the errors found and the cases that passed (a case cut off by LIMIT did not); exits 1
# on any error or any case that did not pass.
#
#   bash test/sanitize_gpu.sh [tools] [limit_s] [jobs]    (default "memcheck racecheck initcheck synccheck" 900 16)
set -euo pipefail
cd "$(dirname "$0")/.."
tools=${1:-memcheck racecheck initcheck synccheck} limit=${2:-900} jobs=${3:-16}
logs=test/sanitize
mkdir -p "$logs"
cases=$(./test/test_gpu --list-test-cases | grep -o 'passing the current filters: [0-9]*' | grep -o '[0-9]*$')

# one case under one tool: its log is $logs/TOOL.CASE.log
sanitize_case() {
    local tool=$1 i=$2 options=()
    case $tool in
        memcheck) options=(--leak-check full) ;;
    esac
    if [ "$tool" = initcheck ]; then export DSV3_INITCHECK=1; fi
    timeout "$limit" compute-sanitizer --tool "$tool" "${options[@]}" --print-limit 100 ./test/test_gpu --first="$i" --last="$i" \
        > "$logs/$tool.$i.log" 2>&1 || true
}
export -f sanitize_case
export logs limit

for tool in $tools; do
    for i in $(seq "$cases"); do echo "$tool $i"; done
done | xargs -P "$jobs" -n 2 bash -c 'sanitize_case "$0" "$1"'

status=0
for tool in $tools; do
    errors=0 passed=0 unfinished=()
    for i in $(seq "$cases"); do
        log=$logs/$tool.$i.log
        if grep -q '\[doctest\] Status: SUCCESS' "$log"; then passed=$((passed + 1)); else unfinished+=("$i"); fi
        n=$(grep -o 'ERROR SUMMARY: [0-9]* error\|([0-9]* errors' "$log" | grep -o '[0-9]*' | head -1 || true)
        errors=$((errors + ${n:-0}))
    done
    echo "$tool: $errors errors; $passed of $cases cases passed${unfinished:+ (not: ${unfinished[*]})}"
    if [ "$errors" -gt 0 ] || [ "${#unfinished[@]}" -gt 0 ]; then status=1; fi
    if [ "$errors" -gt 0 ]; then
        echo "  kernels in the reports:"
        grep -h -o '=========     at [^(]*' "$logs/$tool".*.log | sed 's/=========     at //' | sort | uniq -c | sort -rn | head -10
    fi
done
exit $status
