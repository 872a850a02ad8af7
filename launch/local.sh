#!/usr/bin/env bash
# Run distnn on this machine: mpiexec starts NP ranks, each limited to T BLAS/OpenMP threads.
#
# usage: launch/local.sh [-n NP] [--threads T] [--dry-run] [--] distnn-args...
#
#   -n NP          ranks to start (default 2)
#   --threads T    BLAS/OpenMP threads per rank (default: cores / NP, at least 1)
#   --dry-run      print the command, shell-quoted on one line, and start nothing
#   -h, --help     print this help
#
# Everything from the first other word (or after --) goes to distnn as it is:
#   launch/local.sh -n 2 train examples/digits.toml --set optim.lr=0.01
#
# Environment: PYTHON (default python3) runs `-m distnn`; MPIEXEC names the launcher, which is
# otherwise the mpiexec next to that python (a venv with the mpich extra), else the one on PATH.
set -euo pipefail

# shellcheck source=launch/common.sh
source "$(dirname "$0")/common.sh"

np=2 threads='' dry_run=0
while (( $# )); do
  case $1 in
    -n) np=$(count -n "${2-}"); shift 2 ;;
    --threads) threads=$(count --threads "${2-}"); shift 2 ;;
    --dry-run) dry_run=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; break ;;
    -*) die "unknown option '$1' (see --help)" ;;
    *) break ;;
  esac
done
(( $# )) || die "no distnn arguments, e.g. 'train CONFIG.toml' (see --help)"
if [[ -z $threads ]]; then
  threads=$(( $(cores) / np ))
  (( threads >= 1 )) || threads=1
fi

python=${PYTHON:-python3}
mpiexec=$(find_mpiexec "$python")
# `env` sets the limits on each rank itself, whatever the launcher passes on.
cmd=("$mpiexec" -n "$np"
     env OMP_NUM_THREADS="$threads" OPENBLAS_NUM_THREADS="$threads" MKL_NUM_THREADS="$threads"
     "$python" -m distnn "$@")
if (( dry_run )); then show "${cmd[@]}"; exit 0; fi
exec "${cmd[@]}"
