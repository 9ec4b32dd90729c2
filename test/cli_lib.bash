# test/cli_lib.bash — what the command-line checks (test/cli_*.sh) share, sourced after their `set -euo pipefail`:
# a temporary directory $T removed at exit, PASS / FAIL lines counted, the one-line-error check, and the last
# line that sets the exit status.
T=$(mktemp -d "/tmp/$(basename "$0" .sh).XXXXXX")
trap 'rm -rf "$T"' EXIT
passed=0
failures=0

pass() {
    printf 'PASS  %s\n' "$1"
    passed=$((passed + 1))
}

# fail NAME [WHAT WAS SEEN]
fail() {
    printf 'FAIL  %s\n' "$1"
    [ $# -gt 1 ] && printf '      %s\n' "$2"
    failures=$((failures + 1))
}

# expect_error NAME WANT CMD... : CMD (stdin empty) exits non-zero with exactly one stderr line, "error: ...",
# that contains WANT (the flag or file at fault); its output stays in $T/stdout and $T/stderr
expect_error() {
    local name=$1 want=$2 rc=0
    shift 2
    "$@" >"$T/stdout" 2>"$T/stderr" </dev/null || rc=$?
    local lines
    lines=$(wc -l <"$T/stderr")
    if [ "$rc" -ne 0 ] && [ "$lines" -eq 1 ] && grep -q '^error: ' "$T/stderr" && grep -qF -- "$want" "$T/stderr"; then
        pass "$name"
    else
        fail "$name" "exit $rc, $lines stderr line(s), wanted one 'error: ...' naming '$want': $(head -c 300 "$T/stderr")"
    fi
}

# the summary line; the script's exit status is 1 when a check failed
finish() {
    echo "$(basename "$0"): $passed passed, $failures failed"
    [ "$failures" -eq 0 ]
}
