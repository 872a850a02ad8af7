# Helpers shared by local.sh and mpirun-hosts.sh (sourced, not run). The sbatch scripts stay
# self-contained: Slurm runs a copy of them from its spool directory, away from this file.

usage() { awk 'NR > 1 && !/^#( |$)/ { exit } NR > 1 { sub(/^# ?/, ""); print }' "$0"; }
die() { echo "${0##*/}: $*" >&2; exit 2; }
show() { local q; q=$(printf '%q ' "$@"); echo "${q% }"; }
count() { [[ $2 =~ ^[1-9][0-9]*$ ]] || die "$1 needs a positive whole number, got '$2'"; echo "$2"; }
# GNU nproc honours OMP_NUM_THREADS; the default wants the machine's cores, not a leftover limit.
cores() { env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc 2>/dev/null || getconf _NPROCESSORS_ONLN; }

find_mpiexec() {
  local py
  if [[ -n ${MPIEXEC:-} ]]; then echo "$MPIEXEC"; return; fi
  py=$(command -v "$1") || die "cannot find python '$1' (set PYTHON)"
  if [[ -x $(dirname "$py")/mpiexec ]]; then echo "$(dirname "$py")/mpiexec"; return; fi
  command -v mpiexec || die "no mpiexec next to $py or on PATH (install distnn[mpich], or set MPIEXEC)"
}
