"""`distnn train` with [privacy]: ε in metrics.jsonl, done.json and `distnn info`; the budget's
one-line stop on resume; the accountant's absence said in one line. Subprocesses, as test_cli.py."""
import json

from test_cli import distnn, one_error_line, pytestmark, records, work  # noqa: F401  (fixture)

PRIVATE = ["--set", "train.batch_size=16", "--set", "data.standardize=false"]


def private(work, *extra):
    text = (work / "cfg.toml").read_text() + "\n[privacy]\n" + "\n".join(extra) + "\n"
    (work / "private.toml").write_text(text)
    return "private.toml"


def test_a_private_run_reports_epsilon_per_epoch_in_done_json_and_in_info(work):
    cfg = private(work, "noise_multiplier = 1.1", "max_grad_norm = 0.5")
    run = distnn(work, "train", cfg, "--out", "p", *PRIVATE)
    assert run.returncode == 0, run.stderr
    assert run.stderr == ""  # no standardization to warn of
    eps = [r["epsilon"] for r in records(work / "p")]
    assert len(eps) == 3 and eps == sorted(eps) and eps[0] > 0
    done = json.loads((work / "p" / "done.json").read_text())
    assert done["privacy"]["epsilon"] == eps[-1]
    assert done["privacy"]["noise_multiplier"] == 1.1 and done["privacy"]["steps"] == done["steps"]
    info = distnn(work, "info", "p")
    assert f"privacy  (ε {eps[-1]:.4g}, δ 1e-05)-DP by DP-SGD: σ 1.1, clip 0.5" in info.stdout


def test_more_epochs_than_the_budget_allows_stop_before_a_step_in_one_line(work):
    cfg = private(work, "target_epsilon = 2.0")
    assert distnn(work, "train", cfg, "--out", "p", *PRIVATE).returncode == 0
    before = sorted((work / "p" / "checkpoints").iterdir())
    metrics = records(work / "p")
    line = one_error_line(distnn(work, "train", cfg, "--out", "p", "--resume", *PRIVATE,
                                 "--set", "train.epochs=5"))
    assert "privacy budget" in line and "over target_epsilon = 2" in line
    assert sorted((work / "p" / "checkpoints").iterdir()) == before
    assert records(work / "p") == metrics  # no epoch added


def test_a_standardized_private_run_warns_that_the_standardization_is_not_private(work):
    cfg = private(work, "noise_multiplier = 1.0")
    run = distnn(work, "train", cfg, "--out", "p", "--set", "train.batch_size=16")
    assert run.returncode == 0 and "data.standardize with [privacy]" in run.stderr


def test_without_the_accountant_library_a_private_run_says_how_to_install_it(work):
    fake = work / "fake"
    (fake / "dp_accounting").mkdir(parents=True)
    (fake / "dp_accounting" / "__init__.py").write_text("raise ImportError('not installed')\n")
    from test_cli import REPO

    cfg = private(work, "noise_multiplier = 1.0")
    line = one_error_line(distnn(work, "train", cfg, "--out", "p", *PRIVATE,
                                 PYTHONPATH=f"{fake}:{REPO}"))
    assert "dp-accounting" in line and "pip install" in line


def test_a_private_recurrent_run_trains_and_reports_epsilon(work):
    """[privacy] with model.kind = "recurrent": a sample is a sequence (each flower's 4 features
    read as 2 steps of 2 here), and the run reports ε as a dense one does."""
    cfg = private(work, "noise_multiplier = 1.0", "max_grad_norm = 1.0")
    run = distnn(work, "train", cfg, "--out", "r", *PRIVATE, "--set", "model.kind=recurrent",
                 "--set", "model.state=8", "--set", "data.steps=2")
    assert run.returncode == 0, run.stderr
    eps = [r["epsilon"] for r in records(work / "r")]
    assert eps and eps == sorted(eps) and eps[0] > 0
    assert "recurrent" in distnn(work, "info", "r").stdout
