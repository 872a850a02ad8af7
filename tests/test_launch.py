"""The launch scripts in launch/: the command each one's dry run prints, its --help and its errors.

Nothing here starts distnn. The scripts print their command shell-quoted on one line, so
`shlex.split` gives back the exact argv they would run.
"""

import os
import re
import shlex
import signal
import subprocess
import time
from pathlib import Path

import pytest

LAUNCH = Path(__file__).resolve().parent.parent / "launch"
SCRIPTS = ["local.sh", "mpirun-hosts.sh", "slurm.sbatch", "bench-cluster.sbatch"]
THREAD_VARS = ["OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"]
# Arguments that only survive if the scripts quote them all the way through.
TRICKY = ["train", "my config.toml", "--set", "data.path=/tmp/a b/x.npz", "--set", "model.name='q\"r'", ""]
FAKE_MPIEXEC = "/opt/mpi/bin/mpiexec"


def run(script, *args, **env):
    """Run launch/SCRIPT under bash with ARGS, in an environment scrubbed of launcher settings."""
    base = {k: v for k, v in os.environ.items()
            if not k.startswith("SLURM_") and k not in
            {"MPIEXEC", "MPI_FLAVOR", "DRY_RUN", "PYTHON", "SRUN_MPI", "OMP_THREAD_LIMIT", *THREAD_VARS}}
    return subprocess.run(["bash", str(LAUNCH / script), *args], env={**base, **env},
                          capture_output=True, text=True, timeout=30)


def argv(result):
    """The one-line command a dry run printed, split back into its words."""
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("\n") == 1, result.stdout
    return shlex.split(result.stdout)


def thread_env(words):
    """The VAR=value words that follow `env` in a printed command."""
    start = words.index("env") + 1
    return dict(w.split("=", 1) for w in words[start:start + len(THREAD_VARS)])


def real_cores():
    """This machine's cores as the scripts count them (nproc, with no OpenMP limit in the way)."""
    env = {k: v for k, v in os.environ.items() if k not in {"OMP_NUM_THREADS", "OMP_THREAD_LIMIT"}}
    return int(subprocess.run(["nproc"], env=env, capture_output=True, text=True, check=True).stdout)


def fake_bin(tmp_path, name, text):
    """An executable NAME in tmp_path/bin whose body is TEXT; returns the bin directory."""
    tool = tmp_path / "bin" / name
    tool.parent.mkdir(parents=True, exist_ok=True)
    tool.write_text("#!/bin/bash\n" + text + "\n")
    tool.chmod(0o755)
    return tool.parent


@pytest.fixture
def eight_cores(tmp_path):
    """PATH on which `nproc` reports 8 cores."""
    return f"{fake_bin(tmp_path, 'nproc', 'echo 8')}:{os.environ['PATH']}"


@pytest.fixture
def hostfile(tmp_path):
    """A hostfile with two machines, a comment and a blank line."""
    path = tmp_path / "hosts"
    path.write_text("# two machines\nnode01\n\nnode02\n")
    return str(path)


# --- every script ------------------------------------------------------------------------------

@pytest.mark.parametrize("script", SCRIPTS)
def test_script_parses_and_is_executable(script):
    assert subprocess.run(["bash", "-n", str(LAUNCH / script)]).returncode == 0
    assert os.access(LAUNCH / script, os.X_OK)


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_prints_usage_and_exits_0(script):
    result = run(script, "--help")
    assert result.returncode == 0
    assert "usage: " in result.stdout and script in result.stdout
    assert "#SBATCH" not in result.stdout and result.stderr == ""


@pytest.mark.parametrize("script", SCRIPTS)
def test_bad_flag_is_one_line_on_stderr_and_exit_2(script):
    result = run(script, "--bogus", "train", "cfg.toml", DRY_RUN="1", MPI_FLAVOR="mpich")
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1 and "--bogus" in result.stderr


# --- local.sh ----------------------------------------------------------------------------------

def test_local_starts_np_ranks_of_python_m_distnn_with_args_verbatim():
    words = argv(run("local.sh", "--dry-run", "-n", "3", "--threads", "2", "--", *TRICKY,
                     MPIEXEC=FAKE_MPIEXEC, PYTHON="/env/bin/python3"))
    assert words == [FAKE_MPIEXEC, "-n", "3", "env", *(f"{v}=2" for v in THREAD_VARS),
                     "/env/bin/python3", "-m", "distnn", *TRICKY]


@pytest.mark.parametrize("np_, threads", [(1, 8), (2, 4), (3, 2), (8, 1), (16, 1)])
def test_local_default_threads_are_cores_over_np_at_least_1(eight_cores, np_, threads):
    words = argv(run("local.sh", "--dry-run", "-n", str(np_), "train", "c.toml",
                     MPIEXEC=FAKE_MPIEXEC, PATH=eight_cores))
    assert words[1:3] == ["-n", str(np_)]
    assert thread_env(words) == {v: str(threads) for v in THREAD_VARS}


def test_local_default_is_two_ranks():
    words = argv(run("local.sh", "--dry-run", "train", "c.toml", MPIEXEC=FAKE_MPIEXEC))
    assert words[1:3] == ["-n", "2"]


def test_local_default_threads_ignore_a_leftover_omp_limit():
    """GNU nproc answers OMP_NUM_THREADS when it is set; the default must count cores anyway."""
    words = argv(run("local.sh", "--dry-run", "-n", "1", "train", "c.toml", MPIEXEC=FAKE_MPIEXEC,
                     OMP_NUM_THREADS="1", OMP_THREAD_LIMIT="1"))
    assert thread_env(words) == {v: str(real_cores()) for v in THREAD_VARS}


def test_local_options_end_at_the_first_distnn_word():
    words = argv(run("local.sh", "--dry-run", "-n", "2", "--threads", "1", "train", "c.toml", "-n", "4",
                     "--threads", "9", MPIEXEC=FAKE_MPIEXEC, PYTHON="python3"))
    assert words[1:3] == ["-n", "2"] and thread_env(words)["MKL_NUM_THREADS"] == "1"
    assert words[-6:] == ["train", "c.toml", "-n", "4", "--threads", "9"]


def test_local_double_dash_passes_flags_to_distnn():
    words = argv(run("local.sh", "--dry-run", "--", "--help", MPIEXEC=FAKE_MPIEXEC, PYTHON="python3"))
    assert words[-3:] == ["-m", "distnn", "--help"]


def test_local_finds_mpiexec_next_to_python_before_path(tmp_path):
    venv = fake_bin(tmp_path / "venv", "python3", "exit 0")
    fake_bin(tmp_path / "venv", "mpiexec", "exit 0")
    other = fake_bin(tmp_path / "other", "mpiexec", "exit 0")
    path = f"{other}:{os.environ['PATH']}"
    words = argv(run("local.sh", "--dry-run", "train", "c.toml", PYTHON=str(venv / "python3"), PATH=path))
    assert words[0] == str(venv / "mpiexec")
    (venv / "mpiexec").unlink()
    words = argv(run("local.sh", "--dry-run", "train", "c.toml", PYTHON=str(venv / "python3"), PATH=path))
    assert words[0] == str(other / "mpiexec")


@pytest.mark.parametrize("args", [["-n", "0", "train"], ["-n", "two", "train"], ["--threads", "-1", "train"],
                                  ["-n"], []])
def test_local_rejects_bad_counts_and_missing_args_with_exit_2(args):
    result = run("local.sh", "--dry-run", *args, MPIEXEC=FAKE_MPIEXEC)
    assert result.returncode == 2 and result.stdout == "" and result.stderr.count("\n") == 1


# --- mpirun-hosts.sh ---------------------------------------------------------------------------

def test_mpich_flags_are_hostfile_ppn_and_genv(hostfile):
    words = argv(run("mpirun-hosts.sh", "--dry-run", "-f", hostfile, "-n", "4", "--ppn", "2", "--threads", "3",
                     "--", *TRICKY, MPI_FLAVOR="mpich", MPIEXEC=FAKE_MPIEXEC, PYTHON="/env/bin/python3"))
    genv = [w for v in THREAD_VARS for w in ("-genv", v, "3")]
    assert words == [FAKE_MPIEXEC, "-f", hostfile, "-n", "4", "-ppn", "2", *genv,
                     "/env/bin/python3", "-m", "distnn", *TRICKY]


def test_openmpi_flags_are_hostfile_map_by_ppr_and_x(hostfile):
    words = argv(run("mpirun-hosts.sh", "--dry-run", "-f", hostfile, "-n", "4", "--ppn", "2", "--threads", "3",
                     "--", *TRICKY, MPI_FLAVOR="openmpi", MPIEXEC=FAKE_MPIEXEC, PYTHON="/env/bin/python3"))
    x = [w for v in THREAD_VARS for w in ("-x", f"{v}=3")]
    assert words == [FAKE_MPIEXEC, "--hostfile", hostfile, "-n", "4", "--map-by", "ppr:2:node", *x,
                     "/env/bin/python3", "-m", "distnn", *TRICKY]


@pytest.mark.parametrize("version, flag", [("mpiexec (Open MPI) 5.0.3", "--hostfile"),
                                           ("mpiexec (OpenRTE) 4.1.6", "--hostfile"),
                                           ("HYDRA build details:\n    Version: 4.2.0", "-f"),
                                           ("Intel(R) MPI Library for Linux* OS, Version 2021.13", "-f")])
def test_flavor_is_detected_from_mpiexec_version(tmp_path, hostfile, version, flag):
    mpiexec = fake_bin(tmp_path, "mpiexec", f"printf '%s\\n' {shlex.quote(version)}") / "mpiexec"
    words = argv(run("mpirun-hosts.sh", "--dry-run", "-f", hostfile, "-n", "2", "train", "c.toml",
                     MPIEXEC=str(mpiexec)))
    assert words[1] == flag


def test_pythons_full_path_is_the_default_for_remote_machines(hostfile):
    words = argv(run("mpirun-hosts.sh", "--dry-run", "-f", hostfile, "-n", "2", "train", "c.toml",
                     MPI_FLAVOR="mpich", MPIEXEC=FAKE_MPIEXEC))
    python = words[words.index("-m") - 1]
    assert os.path.isabs(python) and os.path.basename(python).startswith("python")


@pytest.mark.parametrize("args, threads", [(["-n", "4"], 4),               # 2 per machine
                                           (["-n", "5"], 2),               # 3 per machine, rounded up
                                           (["-n", "4", "--ppn", "3"], 2),
                                           (["-n", "40"], 1)])
def test_hosts_default_threads_are_cores_over_ranks_per_machine(eight_cores, hostfile, args, threads):
    words = argv(run("mpirun-hosts.sh", "--dry-run", "-f", hostfile, *args, "train", "c.toml",
                     MPI_FLAVOR="openmpi", MPIEXEC=FAKE_MPIEXEC, PATH=eight_cores))
    assert [w for w in words if w.startswith("OMP_NUM_THREADS=")] == [f"OMP_NUM_THREADS={threads}"]


@pytest.mark.parametrize("args, env", [(["-n", "2"], {}),                                  # no -f
                                       (["-f", "/no/such/hosts", "-n", "2"], {}),
                                       (["-f", "HOSTS"], {}),                              # no -n
                                       (["-f", "HOSTS", "-n", "2"], {"MPI_FLAVOR": "lam"}),
                                       (["-f", "HOSTS", "-n", "2"], {"MPIEXEC": "/bin/true",
                                                                     "MPI_FLAVOR": ""})])
def test_hosts_errors_are_one_line_and_exit_2(hostfile, args, env):
    args = [hostfile if a == "HOSTS" else a for a in args]
    result = run("mpirun-hosts.sh", "--dry-run", *args, "train", "c.toml",
                 **{"MPI_FLAVOR": "mpich", "MPIEXEC": FAKE_MPIEXEC, **env})
    assert result.returncode == 2 and result.stdout == "" and result.stderr.count("\n") == 1


def test_hostfile_example_lists_bare_host_names_only():
    """MPICH rejects a '#' after a host name, and 'host:N' or 'slots=N' suit only one MPI."""
    lines = (LAUNCH / "hostfile.example").read_text().splitlines()
    hosts = [ln for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
    assert hosts and all(re.fullmatch(r"[A-Za-z0-9.-]+", h) for h in hosts)
    words = argv(run("mpirun-hosts.sh", "--dry-run", "-f", str(LAUNCH / "hostfile.example"), "-n", "2",
                     "train", "c.toml", MPI_FLAVOR="mpich", MPIEXEC=FAKE_MPIEXEC))
    assert words[1:3] == ["-f", str(LAUNCH / "hostfile.example")]


# --- slurm.sbatch and bench-cluster.sbatch -----------------------------------------------------

def sbatch_header(script):
    """The script's #SBATCH options as a dict (flags without a value map to True)."""
    options = {}
    for line in (LAUNCH / script).read_text().splitlines():
        if line.startswith("#SBATCH "):
            key, _, value = line.split(None, 1)[1].partition("=")
            options[key] = value or True
    return options


def test_slurm_runs_train_with_resume_under_srun_with_cpus_per_task_threads():
    words = argv(run("slurm.sbatch", "cfg dir/c.toml", "runs/my run", "--", *TRICKY[2:],
                     DRY_RUN="1", SLURM_CPUS_PER_TASK="6", SLURM_JOB_ID="77"))
    assert words == ["srun", "--mpi=pmi2", "--cpus-per-task=6", "--kill-on-bad-exit=1",
                     "env", *(f"{v}=6" for v in THREAD_VARS),
                     "python3", "-m", "distnn", "train", "cfg dir/c.toml", "--out", "runs/my run", "--resume",
                     *TRICKY[2:]]


def test_slurm_default_run_dir_is_named_by_job_id_so_a_requeue_finds_it():
    words = argv(run("slurm.sbatch", "c.toml", DRY_RUN="1", SLURM_JOB_ID="77", SRUN_MPI="pmix",
                     PYTHON="/env/bin/python"))
    assert words[words.index("--out") + 1] == "runs/slurm-77"
    assert "--mpi=pmix" in words and "/env/bin/python" in words


def test_slurm_header_requeues_and_warns_before_the_time_limit():
    header = sbatch_header("slurm.sbatch")
    assert header["--requeue"] is True
    assert header["--signal"] == "B:TERM@120"
    assert header["--open-mode"] == "append"       # a requeued job adds to the same log


@pytest.mark.parametrize("script", ["slurm.sbatch", "bench-cluster.sbatch"])
def test_dry_run_outside_slurm_uses_the_headers_cpus_per_task(script):
    words = argv(run(script, "c.toml", DRY_RUN="1"))
    cpus = sbatch_header(script)["--cpus-per-task"]
    assert f"--cpus-per-task={cpus}" in words
    assert thread_env(words) == {v: cpus for v in THREAD_VARS}


@pytest.mark.parametrize("args", [[], ["c.toml", "runs/x", "extra"]])
def test_slurm_needs_config_and_a_double_dash_before_distnn_args(args):
    result = run("slurm.sbatch", *args, DRY_RUN="1")
    assert result.returncode == 2 and result.stderr.count("\n") == 1


@pytest.mark.parametrize("script", ["slurm.sbatch", "bench-cluster.sbatch"])
def test_outside_slurm_without_dry_run_refuses_to_start(script):
    result = run(script, "c.toml")
    assert result.returncode == 2 and "sbatch" in result.stderr and result.stdout == ""


@pytest.mark.parametrize("end_in, requeued", [(100, True), (86400, False)])
def test_slurm_term_reaches_srun_then_requeues_only_near_the_time_limit(tmp_path, end_in, requeued):
    """--signal=B:TERM signals the batch shell alone: it must pass the signal on, and requeue the
    job only when the time limit, not a scancel, is what ends it."""
    log = tmp_path / "log"
    bindir = fake_bin(tmp_path, "srun", f"trap 'echo srun TERM >> {log}; exit 0' TERM\n"
                                        f"echo srun start >> {log}\nfor _ in $(seq 200); do sleep 0.05; done")
    fake_bin(tmp_path, "scontrol", f'echo "scontrol $*" >> {log}')
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(PATH=f"{bindir}:{os.environ['PATH']}", SLURM_JOB_ID="77",
               SLURM_JOB_END_TIME=str(int(time.time()) + end_in))
    job = subprocess.Popen(["bash", str(LAUNCH / "slurm.sbatch"), "c.toml"], env=env, text=True,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 10
        while "srun start" not in (log.read_text() if log.exists() else ""):
            assert time.monotonic() < deadline and job.poll() is None, "fake srun never started"
            time.sleep(0.02)
        job.send_signal(signal.SIGTERM)
        job.wait(timeout=10)
    finally:
        job.kill()
    lines = log.read_text().splitlines()
    assert lines[:2] == ["srun start", "srun TERM"]
    assert (lines[2:] == ["scontrol requeue 77"]) is requeued


def test_bench_runs_scaling_bench_under_srun_into_out_dir():
    words = argv(run("bench-cluster.sbatch", "bench-out/a b", "--", "--quick",
                     DRY_RUN="1", SLURM_CPUS_PER_TASK="3", SLURM_JOB_ID="9"))
    assert words == ["srun", "--mpi=pmi2", "--cpus-per-task=3", "--kill-on-bad-exit=1",
                     "env", *(f"{v}=3" for v in THREAD_VARS),
                     "python3", "-m", "distnn", "bench", "--scaling", "--out", "bench-out/a b", "--quick"]
    words = argv(run("bench-cluster.sbatch", DRY_RUN="1", SLURM_JOB_ID="9"))
    assert words[words.index("--out") + 1] == "bench-out/slurm-9"
