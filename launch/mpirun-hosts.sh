#!/usr/bin/env bash
# Run distnn across machines with plain mpiexec and a hostfile, no scheduler: builds MPICH (hydra)
# or Open MPI flags, told apart by `mpiexec --version`; each rank gets T BLAS/OpenMP threads.
#
# usage: launch/mpirun-hosts.sh -f HOSTFILE -n NP [--ppn N] [--threads T] [--dry-run] [--] distnn-args...
#
#   -f HOSTFILE    machines, one per line (see launch/hostfile.example)
#   -n NP          ranks in all
#   --ppn N        ranks per machine (default: the MPI's own placement)
#   --threads T    threads per rank (default: this machine's cores / ranks per machine, at least 1,
#                  where ranks per machine is N, else NP / machines rounded up; give T when the
#                  machines differ from the one you launch from)
#   --dry-run      print the command, shell-quoted on one line, and start nothing
#   -h, --help     print this help
#
# Everything from the first other word (or after --) goes to distnn as it is:
#   launch/mpirun-hosts.sh -f hosts -n 8 --ppn 4 train examples/digits.toml
#
# Environment: MPI_FLAVOR=mpich|openmpi skips the detection. MPIEXEC names the launcher (else the
# mpiexec next to PYTHON, else PATH). PYTHON defaults to the full path of python3 here, because
# remote shells do not activate your venv: every machine needs distnn at that same path.
set -euo pipefail

# shellcheck source=launch/common.sh
source "$(dirname "$0")/common.sh"

flavor() {
  case ${MPI_FLAVOR:-} in
    mpich|openmpi) echo "$MPI_FLAVOR"; return ;;
    ?*) die "MPI_FLAVOR must be mpich or openmpi, got '$MPI_FLAVOR'" ;;
  esac
  case $("$1" --version 2>&1 || true) in
    *"Open MPI"*|*OpenRTE*) echo openmpi ;;
    # Intel MPI's mpiexec is hydra too, with the same flags.
    *HYDRA*|*MPICH*|*"Intel(R) MPI"*) echo mpich ;;
    *) die "cannot tell MPICH from Open MPI by '$1 --version'; set MPI_FLAVOR=mpich or openmpi" ;;
  esac
}

hostfile='' np='' ppn='' threads='' dry_run=0
while (( $# )); do
  case $1 in
    -f) [[ -n ${2-} ]] || die "-f needs a HOSTFILE"; hostfile=$2; shift 2 ;;
    -n) np=$(count -n "${2-}"); shift 2 ;;
    --ppn) ppn=$(count --ppn "${2-}"); shift 2 ;;
    --threads) threads=$(count --threads "${2-}"); shift 2 ;;
    --dry-run) dry_run=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; break ;;
    -*) die "unknown option '$1' (see --help)" ;;
    *) break ;;
  esac
done
[[ -n $hostfile ]] || die "-f HOSTFILE is required (see --help)"
[[ -r $hostfile ]] || die "cannot read hostfile '$hostfile'"
[[ -n $np ]] || die "-n NP is required (see --help)"
(( $# )) || die "no distnn arguments, e.g. 'train CONFIG.toml' (see --help)"
hosts=$(grep -cvE '^[[:space:]]*(#|$)' "$hostfile" || true)
(( hosts > 0 )) || die "hostfile '$hostfile' lists no machines"
if [[ -z $threads ]]; then
  threads=$(( $(cores) / ${ppn:-$(( (np + hosts - 1) / hosts ))} ))
  (( threads >= 1 )) || threads=1
fi

python=${PYTHON:-$(command -v python3 || echo python3)}
mpiexec=$(find_mpiexec "$python")
flavor=$(flavor "$mpiexec")
vars=(OMP_NUM_THREADS OPENBLAS_NUM_THREADS MKL_NUM_THREADS)
case $flavor in
  mpich)
    cmd=("$mpiexec" -f "$hostfile" -n "$np")
    if [[ -n $ppn ]]; then cmd+=(-ppn "$ppn"); fi
    for v in "${vars[@]}"; do cmd+=(-genv "$v" "$threads"); done ;;
  openmpi)
    cmd=("$mpiexec" --hostfile "$hostfile" -n "$np")
    if [[ -n $ppn ]]; then cmd+=(--map-by "ppr:$ppn:node"); fi
    for v in "${vars[@]}"; do cmd+=(-x "$v=$threads"); done ;;
esac
cmd+=("$python" -m distnn "$@")
if (( dry_run )); then show "${cmd[@]}"; exit 0; fi
exec "${cmd[@]}"
