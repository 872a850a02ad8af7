#!/usr/bin/env bash
# The whole test suite, as CI runs it: serial tests, then the MPI tests under mpiexec -n 2 and -n 3.
# Usage: bash tests/run.sh [pytest args...]   (run inside the environment distnn is installed in)
#
# Under mpiexec every rank runs pytest; rank 0 prints, the others write tests/mpi-rank-N.log.
# MPI tests combine their verdicts across ranks, so a failure fails on all ranks and mpiexec
# exits non-zero; `timeout` bounds each job so a hang fails instead of stalling CI.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python}
mpiexec=${MPIEXEC:-$(dirname "$(command -v "$python")")/mpiexec}
[ -x "$mpiexec" ] || mpiexec=$(command -v mpiexec) || { echo "tests/run.sh: no mpiexec found" >&2; exit 2; }

"$python" -m pytest -q "$@"
for n in 2 3; do
  echo "== MPI tests on $n ranks"
  timeout 900 "$mpiexec" -n "$n" bash -c '
    rank=${PMI_RANK:-${OMPI_COMM_WORLD_RANK:-0}}
    if [ "$rank" = 0 ]; then exec "$0" -m pytest -q --only-mpi -p no:cacheprovider "${@}"
    else exec "$0" -m pytest -q --only-mpi -p no:cacheprovider "${@}" > "tests/mpi-rank-$rank.log" 2>&1
    fi' "$python" "$@"
done
