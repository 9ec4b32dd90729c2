#!/usr/bin/env bash
# test/cli_mpi.sh — ./train built with USE_MPI=1 against OpenMPI and started by mpirun, black-box, from the repository
# root: one rank trains as the plain build does (the same losses, bit for bit), and on a machine without a GPU two
# ranks each learn their rank and the world's size from MPI and stop with one line naming them. The build goes to a
# copy of the tree (USE_MPI changes every object). Skips, passing, where OpenMPI is not installed (.ci/run installs
# it: Debian's openmpi-bin and libopenmpi-dev); about two minutes on 2 cores, most of it the build.
set -euo pipefail
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-passive}
MPI_HOME=${MPI_HOME:-/usr/lib/x86_64-linux-gnu/openmpi}
if ! command -v mpirun >/dev/null || [ ! -f "$MPI_HOME/include/mpi.h" ]; then
    echo "SKIP  test/cli_mpi.sh: needs OpenMPI (mpirun and $MPI_HOME/include/mpi.h)"
    exit 0
fi

source "$(dirname "$0")/cli_lib.bash"
# mpirun refuses root unless told; CI runs as root
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
mpi_run() { mpirun --oversubscribe -np "$@"; }

mkdir "$T/tree"
git ls-files | tar -cf - -T - | tar -xf - -C "$T/tree"
if make -C "$T/tree" -j2 USE_MPI=1 MPI_HOME="$MPI_HOME" train >"$T/build.log" 2>&1; then
    pass "make USE_MPI=1 train builds against OpenMPI"
else
    fail "make USE_MPI=1 train builds against OpenMPI" "$(grep -m3 -i error "$T/build.log")"
    finish
    exit 1
fi

# one rank: the same run as the plain build's
for i in $(seq 1 80); do printf 'a rank of its own, line %d, and the same losses.\n' "$i"; done >"$T/text.txt"
./data/prepare --input "$T/text.txt" --out "$T/data" --vocab 280 >/dev/null
RUN=(--data "$T/data" --preset tiny --batch-size 4 --seq-len 32 --steps 6 --val-tokens 256 --sample-every 0 --device cpu --overwrite)
./train "${RUN[@]}" --out "$T/plain" >/dev/null 2>&1
if mpi_run 1 "$T/tree/train" "${RUN[@]}" --out "$T/mpi1" >"$T/mpi1.log" 2>&1 && [ "$(wc -l <"$T/plain/metrics.csv")" -gt 6 ] &&
    diff <(cut -d, -f1-5 "$T/plain/metrics.csv") <(cut -d, -f1-5 "$T/mpi1/metrics.csv") >/dev/null; then
    pass "mpirun -np 1: the plain build's losses, bit for bit"
else
    fail "mpirun -np 1: the plain build's losses, bit for bit" "$(tail -3 "$T/mpi1.log")"
fi

# two ranks without a GPU: each knows its place from MPI and says why it stops, in one line
gpus=$( (nvidia-smi -L 2>/dev/null || true) | grep -c '^GPU' || true)
if [ "${gpus:-0}" -eq 0 ]; then
    rc=0
    mpi_run 2 "$T/tree/train" "${RUN[@]}" --out "$T/mpi2" >"$T/mpi2.log" 2>&1 || rc=$?
    if [ "$rc" -ne 0 ] && grep -q '^error: rank 0 of 2: no CUDA device' "$T/mpi2.log" &&
        grep -q '^error: rank 1 of 2: no CUDA device' "$T/mpi2.log"; then
        pass "mpirun -np 2 without a GPU: ranks 0 and 1 of 2 each stop with one line"
    else
        fail "mpirun -np 2 without a GPU: ranks 0 and 1 of 2 each stop with one line" "exit $rc: $(grep -m3 'error' "$T/mpi2.log")"
    fi
fi

finish
