#!/usr/bin/env bash
# bench/fp8.sh — FP8 against BF16 training, ours against ours, in one call on the
# device machine.
#
#   bash bench/fp8.sh speed [runs]   the GEMM-by-GEMM table (bench/fp8_gemm) for small and
#                                    medium, then ./train with and without --fp8,
#                                    alternated so that drift of the card hits both
#                                    alike: median tokens/s and device memory (default 3 runs)
#   bash bench/fp8.sh loss [steps] [data] [preset batch seq every]   small at 8 x 256 (or
#                                    the preset and batch given), both ways from the same seed:
#                                    the loss curves (metrics.csv of each, under bench/out/),
#                                    validation over the whole split every 250 steps (or
#                                    `every`; default 2000 steps on data/default; data: a
#                                    data/prepare folder)
#   bash bench/fp8.sh seeds [steps] [data] [count] [preset batch seq]   the `loss` pair for
#                                    seeds 1..count (default 2000 steps, data/default, 3 seeds,
#                                    small at 8 x 256): each side's final validation losses,
#                                    their mean and seed-to-seed spread, and each seed's
#                                    FP8 - BF16 difference with their mean and spread
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/lib.bash
mode=${1:-speed}
bench_setup train data/prepare bench/fp8_gemm
if [ "$mode" = speed ]; then
    runs=${2:-3}
    ./bench/fp8_gemm --preset small --tokens 16384
    ./bench/fp8_gemm --preset medium --tokens 8192
    flag_speed --fp8 small 16 1024 25 "$runs"
    flag_speed --fp8 medium 8 1024 15 1  # medium: one run each, its setup takes a while
elif [ "$mode" = seeds ]; then
    flag_seeds --fp8 "${2:-2000}" "${3:-data/default}" "${4:-3}" "${@:5}"
else
    flag_loss --fp8 "${2:-2000}" "${3:-data/default}" "${@:4}"
fi
