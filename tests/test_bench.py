"""`distnn bench --quick`, the smoke test CI runs: well-formed output, never a timing assertion.

One quick run (about 10 s on 2 cores) is shared by the tests below; the rest check the benchmark's
arithmetic (FLOP counts, bucket counts, baselines) against closed forms.
"""

import json
import math

import numpy as np
import pytest

from distnn import Network, bench, bench_report, bench_workers, launcher

pytestmark = pytest.mark.skipif(bench.launched_size() > 1,
                                reason="spawns its own mpiexec jobs; run it outside mpiexec")


def mpiexec_or_skip():
    try:
        return bench.need_mpiexec()
    except bench.BenchError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    mpiexec_or_skip()
    out = tmp_path_factory.mktemp("bench-out")
    code = bench.main(["--quick", "--no-torch", "--out", str(out)])

    def refuse(name):
        raise ValueError(f"bench.json holds {name}: not standard JSON")

    text = (out / "bench.json").read_text()
    return code, out, json.loads(text, parse_constant=refuse)


def positive(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def test_quick_run_succeeds_and_writes_json_and_plot(quick):
    code, out, res = quick
    assert code == 0
    assert res["schema"] == 1 and res["mode"] == "quick"
    pytest.importorskip("matplotlib")
    assert (out / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_machine_is_described(quick):
    m = quick[2]["machine"]
    assert m["cores"] >= 1 and m["cpu"] and m["numpy"] == np.__version__ and m["mpi"]
    assert any(lib.get("user_api") == "blas" for lib in m["blas"])  # threadpoolctl's view of the BLAS
    assert positive(m["memcpy_GBps"])


def test_roofline_and_step_figures_are_finite_and_positive(quick):
    res = quick[2]
    assert {r["net"] for r in res["roofline"]} == {"large", "small"}
    for r in res["roofline"]:
        for key in ("gflop_per_step", "gemm_s", "gemm_gflops", "grad_s", "grad_fraction", "step_s",
                    "step_fraction"):
            assert positive(r[key]), (key, r[key])
        assert r["gflop_per_step"] * 1e9 == bench_workers.step_flops(r["sizes"], r["batch"])
        assert all(positive(layer["gflops"]) for layer in r["layers"])
    assert {r["optimizer"] for r in res["steps"]} == set(bench_workers.OPTIMIZERS)
    for r in res["steps"]:
        assert positive(r["samples_per_s"]) and positive(r["step_s"]) and math.isfinite(r["overhead"])


def test_scaling_rows_cover_one_and_two_ranks_with_a_phase_split(quick):
    sc = quick[2]["scaling"]
    assert {r["ranks"] for r in sc["strong"]} == {1, 2}
    assert {r["ranks"] for r in sc["weak"]} == {1, 2}
    for r in sc["strong"] + sc["weak"]:
        assert positive(r["step_s"]) and positive(r["samples_per_s"]) and positive(r["efficiency"])
        assert len(r["per_rank"]) == r["ranks"]
        for p in r["per_rank"]:
            assert positive(p["step_s"]) and positive(p["compute_s"]) and positive(p["update_s"])
            assert p["allreduce_s"] >= 0
    one = next(r for r in sc["strong"] if r["ranks"] == 1 and r["threads"] == 1)
    assert one["speedup"] == 1.0  # the baseline is itself
    for r in sc["deterministic"]:
        assert positive(r["default_step_s"]) and positive(r["deterministic_step_s"])


def test_communication_and_memory_figures(quick):
    res = quick[2]
    comm = res["comm"]
    assert comm["ranks"] == 2 and len(comm["sweep"]) >= 2
    for r in comm["sweep"]:
        assert all(positive(r[k]) for k in ("bytes", "bucketed_s", "bucketed_busbw_GBps", "one_call_s",
                                             "one_call_busbw_GBps"))
    for r in res["memory"]:
        assert positive(r["file_mb"]) and len(r["per_rank_mb"]) == r["ranks"] == 2
        assert all(positive(p["peak_rss"]) for p in r["per_rank_mb"])


def test_targets_are_reported_with_a_verdict(quick):
    found = quick[2]["targets"]
    assert found
    for t in found:
        assert isinstance(t["pass"], bool) and math.isfinite(t["value"]) and t["where"]


@pytest.mark.parametrize("sizes", [bench_workers.LARGE, bench_workers.SMALL, [3, 2]])
def test_step_flops_are_the_flops_of_the_step_s_matrix_products(sizes):
    # forward 2·weights + backward 4·weights, less the input layer's dX, per sample
    net = Network(sizes, dtype="float32")
    ops = bench_workers.gemm_ops(net, 5)
    assert sum(op[-1] for op in ops) == bench_workers.step_flops(sizes, 5)
    assert len(ops) == 3 * len(net.weights) - 1
    for kind, l, a, b, out, _ in ops:
        assert (a @ b).shape == out.shape


def test_allreduce_calls_per_step_are_buckets_of_the_gradient_buffer():
    calls = {(r["net"], r["dtype"]): r for r in bench_report.calls_per_step(4 << 20)}
    n_large = 784 * 1024 + 1024 + 1024 * 1024 + 1024 + 1024 * 10 + 10 + 3  # + 3 riding statistics
    assert calls["large", "float32"]["calls"] == math.ceil(4 * n_large / (4 << 20)) == 2
    assert calls["large", "float64"]["calls"] == 4
    assert calls["small", "float64"]["calls"] == 1


def test_bench_starts_the_mpiexec_train_would_start(monkeypatch):
    monkeypatch.setenv("MPIEXEC", "'/opt/my mpi/mpiexec' --bind-to none")
    assert bench.need_mpiexec() == launcher.find_mpiexec() == ["/opt/my mpi/mpiexec", "--bind-to", "none"]


def test_workers_drop_the_blas_overrides_unless_kept(monkeypatch):
    monkeypatch.setenv("OPENBLAS_CORETYPE", "Haswell")
    assert "OPENBLAS_CORETYPE" not in bench.worker_env(False, 1)
    kept = bench.worker_env(True, 2)
    assert kept["OPENBLAS_CORETYPE"] == "Haswell" and kept["OPENBLAS_NUM_THREADS"] == "2"


def test_torch_step_runs_when_torch_is_installed():
    torch = pytest.importorskip("torch")
    net = Network(bench_workers.SMALL, dtype="float32")
    X, _, labels = bench_workers.synthetic_batch(net, 8, seed=0)
    config = {"sizes": bench_workers.SMALL, "dtype": "float32", "threads": 1}
    assert positive(bench_workers.torch_step_s(torch, config, X, labels, 0.01))


def test_best_of_keeps_each_figures_fastest_run():
    runs = [{"step_s": {"adam": 2.0}, "grad_s": 1.0, "gflops": 5.0, "batch": 64, "rows": [{"x_s": 3.0}]},
            {"step_s": {"adam": 1.0}, "grad_s": 4.0, "gflops": 9.0, "batch": 64, "rows": [{"x_s": 2.0}]}]
    assert bench.best_of(runs) == {"step_s": {"adam": 1.0}, "grad_s": 1.0, "gflops": 9.0, "batch": 64,
                                   "rows": [{"x_s": 2.0}]}


def test_the_plot_labels_its_axes_and_draws_no_lines_between_set_ups():
    figure = pytest.importorskip("matplotlib.figure")
    strong = [{"net": net, "dtype": "float32", "ranks": r, "threads": t, "batch": 512,
               "speedup": r * t * 0.9, "compute_s": 0.01, "allreduce_s": 0.001, "update_s": 0.001}
              for net in ("large", "small") for r, t in ((1, 1), (1, 2), (2, 1))]
    layouts, names = [(1, 1), (1, 2), (2, 1)], ["1r x 1t", "1r x 2t", "2r x 1t"]
    speedup, split, bandwidth = figure.Figure().subplots(1, 3)
    bench_report.plot_speedup(speedup, strong, layouts, names, cores=2)
    bench_report.plot_step_split(split, strong, layouts, names)
    bench_report.plot_bandwidth(bandwidth, {"ranks": 2, "sweep": [
        {"bytes": b, "bucketed_busbw_GBps": 1.0, "one_call_busbw_GBps": 0.5} for b in (1e3, 1e6)]})
    for ax in (speedup, split, bandwidth):
        assert ax.get_xlabel() and ax.get_ylabel(), ax.get_title()
    # the set-ups are categories: markers (and bars), never a line from one set-up to the next
    assert speedup.lines and all(line.get_linestyle() == "None" for line in speedup.lines)
    assert not split.lines and split.patches


def test_startup_is_measured_cold_and_warm(quick):
    s = quick[2]["startup"]
    for kind in ("cold", "warm"):
        assert all(positive(s[kind][k]) for k in ("import_s", "first_step_s", "process_s"))
    assert s["cold_s"] == s["cold"]["import_s"] + s["cold"]["first_step_s"]
    assert positive(s["warm_s"])
    assert any(t["target"].startswith("start-up") for t in quick[2]["targets"])


def test_ddp_rows_compare_with_the_trainer_at_the_same_ranks_net_dtype_and_batch():
    trainer = [{"net": "small", "dtype": "float32", "batch": 512, "ranks": 2, "default_step_s": 0.5},
               {"net": "small", "dtype": "float32", "batch": 512, "ranks": 2, "default_step_s": 0.4},
               {"net": "small", "dtype": "float32", "batch": 512, "ranks": 1, "default_step_s": 0.1}]
    ddp = [{"net": "small", "dtype": "float32", "batch": 512, "ranks": 2, "ddp_step_s": 1.0},
           {"net": "large", "dtype": "float32", "batch": 512, "ranks": 2, "ddp_step_s": 1.0}]
    (row,) = bench_report.ddp_rows(ddp, trainer)
    assert row["distnn_step_s"] == 0.4 and row["vs_ddp"] == 2.5


def test_the_dp_step_is_timed_against_a_plain_one_with_its_extra_memory(quick):
    """bench_dp: both nets, every time positive, the ratio the quotient of its times, and the
    memory held O(batch), far below batch x parameters."""
    from distnn import bench_dp

    rows = quick[2]["dp"]["configs"]
    assert {r["net"] for r in rows} == {"large", "small"}
    for r in rows:
        assert all(positive(r[k]) for k in ("plain_s", "dp_s", "draw_s", "grad_s", "clipped_grad_s",
                                             "noise_s"))
        assert r["ratio"] == pytest.approx(r["dp_s"] / r["plain_s"])
        held = r["batch"] * (8 + 4)  # float64 norms and float32 clip factors, nothing per parameter
        assert r["held_bytes"] == held < r["batch"] * r["params"] * 4 / 10
        assert r["extra_bytes"] < r["batch"] * r["params"] * 4 / 10
    assert bench_dp.plan(True)["configs"] and bench_dp.plan(False)["configs"]


def test_the_recurrent_step_is_measured_against_its_roofline(quick):
    rows = quick[2]["recurrent"]
    assert rows and all(r["dtype"] == "float32" and r["threads"] == 1 for r in rows)
    for r in rows:
        for key in ("step_s", "grad_s", "gemm_s", "samples_steps_per_s", "gemm_gflops",
                    "step_fraction"):
            assert positive(r[key]), (key, r[key])
        assert r["samples_steps_per_s"] == r["batch"] * r["steps"] / r["step_s"]
        assert "torch_step_s" not in r  # --no-torch
    (target,) = bench_report.recurrent_targets({"recurrent": [dict(rows[0], vs_torch=0.9)]})
    assert target["target"].startswith("recurrent step vs PyTorch") and not target["pass"]
    assert target["where"].startswith("rnn 8+16-32-4+16 T6")


@pytest.mark.parametrize("hidden", [[], [16], [16, 8]])
def test_the_recurrent_roofline_holds_the_products_recurrent_runs(hidden):
    # per step: forward 2·weights, backward 2·weights less the first layer's input columns
    # (only its state columns carry a proxy error, and none to r(0)); the weight gradients once
    # over all T·N rows: 2·weights each
    c = {"n_in": 3, "hidden": hidden, "state": 5, "n_out": 4, "steps": 6, "batch": 7,
         "dtype": "float64"}
    from distnn import bench_recurrent
    sizes = bench_recurrent.inner_sizes(c)
    weights = [o * i for o, i in zip(sizes[1:], sizes[:-1])]
    n, t = c["batch"], c["steps"]
    dstate = 2 * n * sizes[1] * c["state"] * (t - 1)
    expected = t * 2 * n * sum(weights) + t * 2 * n * sum(weights[1:]) + dstate + 2 * n * t * sum(weights)
    ops = bench_recurrent.gemm_ops(c)
    assert sum(op[-1] for op in ops) == expected
    for kind, a, b, out, flops in ops:
        assert (a @ b).shape == out.shape and flops == 2 * a.shape[0] * a.shape[1] * b.shape[1]


def test_the_torch_recurrent_step_runs_when_torch_is_installed():
    torch = pytest.importorskip("torch")
    from distnn import bench_recurrent
    c = {"n_in": 3, "hidden": [8], "state": 5, "n_out": 4, "steps": 4, "batch": 6,
         "dtype": "float32", "threads": 1}
    X = np.random.default_rng(0).standard_normal((6, 4, 3)).astype(np.float32)
    assert positive(bench_recurrent.torch_step_s(torch, c, X, np.arange(6) % 4, 0.01))
