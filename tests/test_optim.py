"""Optimizers against straightforward reference implementations; schedules against closed forms."""

import functools
import json
import math
import tracemalloc

import numpy as np
import pytest

from distnn import optim
from distnn.optim import (OPTIMIZERS, SCHEDULES, Adam, AdamW, OptimizerError, clip_by_global_norm,
                          lr_at, make_optimizer)

N = 13
STEPS = 25
LRS = [0.05 * (1 + math.cos(k)) / 2 + 0.01 for k in range(STEPS)]  # a scheduled lr, never constant

CASES = {
    "sgd": ("sgd", dict(lr=0.05)),
    "sgd-weight-decay": ("sgd", dict(lr=0.05, weight_decay=0.1)),
    "sgd-momentum": ("sgd", dict(lr=0.05, momentum=0.9)),
    "sgd-nesterov": ("sgd", dict(lr=0.05, momentum=0.9, nesterov=True)),
    "sgd-nesterov-weight-decay": ("sgd", dict(lr=0.05, momentum=0.5, nesterov=True, weight_decay=0.1)),
    "adam": ("adam", dict(lr=0.01)),
    "adam-weight-decay": ("adam", dict(lr=0.01, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1)),
    "adamw-default-decay": ("adamw", dict(lr=0.01)),
    "adamw": ("adamw", dict(lr=0.01, betas=(0.8, 0.99), weight_decay=0.1)),
}


def start(dtype=np.float64):
    """Fixed starting parameters."""
    return np.random.default_rng(0).normal(size=N).astype(dtype)


def gradient(p):
    """A fresh gradient that depends on where p is, so trajectories diverge if any step is wrong."""
    a = np.linspace(0.5, 2.0, p.size).astype(p.dtype)
    return a * p - 1 + np.sin(3 * p) / 10


def ref_sgd(p, lrs, momentum=0.0, nesterov=False, weight_decay=0.0):
    """SGD as the PyTorch docs write it: the buffer starts as the first gradient."""
    buf = None
    for lr in lrs:
        g = gradient(p) + weight_decay * p
        if momentum:
            buf = g if buf is None else momentum * buf + g
            g = g + momentum * buf if nesterov else buf
        p = p - lr * g
    return p


def ref_adam(p, lrs, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, decoupled=False):
    """Adam as Kingma & Ba write it, with bias-corrected moments; AdamW decays p before the update."""
    b1, b2 = betas
    m = v = 0.0
    for t, lr in enumerate(lrs, start=1):
        g = gradient(p)
        if decoupled:
            p = p * (1 - lr * weight_decay)
        else:
            g = g + weight_decay * p
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g**2
        p = p - lr * (m / (1 - b1**t)) / (np.sqrt(v / (1 - b2**t)) + eps)
    return p


REFERENCES = {"sgd": ref_sgd, "adam": ref_adam,
              "adamw": functools.partial(ref_adam, decoupled=True, weight_decay=0.01)}


def reference(name, hyper, p0, lrs):
    """End point of the reference trajectory from p0, one step per lr (which replaces hyper's lr)."""
    return REFERENCES[name](p0, lrs, **{k: v for k, v in hyper.items() if k != "lr"})


def run(opt, p, lrs):
    """Step `opt` on p in place once per lr, each time with a fresh gradient."""
    for lr in lrs:
        opt.step(p, gradient(p), lr=lr)
    return p


@pytest.mark.parametrize("case", CASES)
def test_matches_reference_in_float64(case):
    name, hyper = CASES[case]
    p0 = start()
    p = run(make_optimizer(name, **hyper), p0.copy(), LRS)
    expected = reference(name, hyper, p0, LRS)
    assert not np.allclose(p, p0, atol=1e-2)  # the steps did move the parameters
    np.testing.assert_allclose(p, expected, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("case", ["sgd-nesterov-weight-decay", "adam-weight-decay", "adamw"])
def test_without_lr_argument_uses_the_configured_lr(case):
    name, hyper = CASES[case]
    p0 = start()
    opt = make_optimizer(name, **hyper)
    p = p0.copy()
    for _ in range(5):
        opt.step(p, gradient(p))
    np.testing.assert_allclose(p, reference(name, hyper, p0, [hyper["lr"]] * 5), rtol=1e-12)


@pytest.mark.parametrize("case", CASES)
def test_matches_torch(case):
    torch = pytest.importorskip("torch")
    name, hyper = CASES[case]
    cls = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[name]
    p0 = start()
    tp = torch.tensor(p0, requires_grad=True)
    topt = cls([tp], **hyper)
    for lr in LRS:
        topt.param_groups[0]["lr"] = lr
        tp.grad = torch.from_numpy(gradient(tp.detach().numpy()))
        topt.step()
    p = run(make_optimizer(name, **hyper), p0.copy(), LRS)
    np.testing.assert_allclose(p, tp.detach().numpy(), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("case", CASES)
def test_float32_stays_float32(case):
    name, hyper = CASES[case]
    opt = make_optimizer(name, **hyper)
    p = run(opt, start(np.float32), LRS)
    assert p.dtype == np.float32
    assert all(a.dtype == np.float32 for k, a in opt.state_dict().items() if k != "t")
    np.testing.assert_allclose(p, reference(name, hyper, start(), LRS), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("case", CASES)
def test_state_dict_round_trip_continues_bit_identically(case, dtype):
    name, hyper = CASES[case]
    straight = run(make_optimizer(name, **hyper), start(dtype), LRS)

    first = make_optimizer(name, **hyper)
    p = run(first, start(dtype), LRS[:7])
    saved, p_saved = first.state_dict(), p.copy()
    run(first, p, LRS[7:])  # stepping on must not reach into the saved copies
    assert all(isinstance(a, np.ndarray) and "/" not in k for k, a in saved.items())
    assert saved["t"].shape == () and saved["t"] == 7

    resumed = make_optimizer(**first.config())
    resumed.load_state_dict(saved)
    assert np.array_equal(run(resumed, p_saved, LRS[7:]), straight)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("case", CASES)
def test_threaded_steps_give_the_bits_of_one_pass_over_the_whole_vector(case, dtype):
    # three slices of a vector just over 3 * _MIN_SLICE; every operation is element-wise
    name, hyper = CASES[case]
    p0 = np.random.default_rng(1).normal(size=3 * 2**18 + 77).astype(dtype)
    results = []
    for threads in (1, 2, 3):
        opt = make_optimizer(name, **hyper)
        opt.threads = threads
        results.append((run(opt, p0.copy(), LRS[:5]), opt.state_dict()))
    (p, s), others = results[0], results[1:]
    for p_other, s_other in others:
        assert p_other.tobytes() == p.tobytes()
        assert all(s_other[k].tobytes() == s[k].tobytes() for k in s)


@pytest.mark.parametrize("case", CASES)
def test_shares_updated_apart_give_the_bits_of_one_update(case):
    """A sharded update: each 'rank' updates its part of its own copy, then the parts are joined."""
    name, hyper = CASES[case]
    p0 = np.random.default_rng(2).normal(size=2 * 2**15 + 91)
    whole = run(make_optimizer(name, **hyper), p0.copy(), LRS[:6])
    cut = len(p0) // 3
    parts = [slice(0, cut), slice(cut, len(p0))]
    copies = [(make_optimizer(name, **hyper), p0.copy()) for _ in parts]
    for lr in LRS[:6]:
        g = gradient(copies[0][1])  # every copy holds the same parameters here
        for (opt, p), part in zip(copies, parts):
            opt.step(p, g.copy(), lr=lr, part=part)
        for (_, p), part in zip(copies, parts):  # every copy takes every part from its owner
            for (_, q), other in zip(copies, parts):
                p[other] = q[other]
    assert all(p.tobytes() == whole.tobytes() for _, p in copies)


def test_threads_cut_only_vectors_worth_the_handover():
    from distnn.optim import _slices
    assert _slices(1000, 8) == [slice(0, 1000)]  # a small net: one slice, no thread
    parts = _slices(2**20 + 5, 3)
    assert len(parts) == 3 and parts[0].start == 0 and parts[-1].stop == 2**20 + 5
    assert all(a.stop == b.start and a.stop % 64 == 0 for a, b in zip(parts, parts[1:]))


def test_parallel_slices_see_the_callers_errstate_and_all_finish_before_an_error_returns():
    import time

    from distnn.threads import run_parallel

    done = []

    def slice_work(i):
        if i == 0:
            raise ValueError("first slice")
        time.sleep(0.05)
        np.float64(1e308) * np.float64(10.0)  # overflows: raises only under the caller's errstate
        done.append(i)

    with np.errstate(over="raise"), pytest.raises(ValueError, match="first slice"):
        run_parallel(slice_work, [0, 1])
    assert done == []  # slice 1 ran to its overflow (raised there), not on past the error
    with np.errstate(over="ignore"):
        run_parallel(slice_work, [1, 2])
    assert sorted(done) == [1, 2]


def test_a_forked_child_can_run_parallel_slices():
    import multiprocessing

    from distnn.threads import run_parallel

    run_parallel(lambda i: None, [0, 1, 2])  # the parent's pool exists before the fork
    child = multiprocessing.get_context("fork").Process(
        target=run_parallel, args=(lambda i: None, [0, 1, 2]))
    child.start()
    child.join(20)
    alive = child.is_alive()
    if alive:
        child.kill()
    assert not alive and child.exitcode == 0


def test_step_allocates_nothing_proportional_to_the_parameters():
    n = 200_000  # 1.6 MB per float64 vector: any temporary would show in the peak
    for name in OPTIMIZERS:
        opt = make_optimizer(name, **({"momentum": 0.9, "nesterov": True} if name == "sgd" else {}))
        p, grads = np.ones(n), [np.full(n, 0.5), np.full(n, 0.25)]
        opt.step(p, grads[0])  # the first step may allocate the state
        tracemalloc.start()
        opt.step(p, grads[1], lr=0.1)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert peak < n, f"{name}: a step allocated {peak} bytes"


def test_init_is_idempotent_and_refuses_other_parameters():
    opt = Adam()
    p = start()
    opt.init(p)
    opt.step(p, gradient(p))
    before = opt.state_dict()
    opt.init(p)
    assert all(np.array_equal(before[k], a) for k, a in opt.state_dict().items())
    with pytest.raises(OptimizerError, match="13 float64"):
        opt.init(np.zeros(5))
    with pytest.raises(OptimizerError, match="float32"):
        opt.step(p.astype(np.float32), gradient(p).astype(np.float32))
    with pytest.raises(OptimizerError, match="gradient"):
        opt.step(p, gradient(p).astype(np.float32))


@pytest.mark.parametrize("bad, match", [
    ({"t": np.array(1)}, "missing keys \\['m', 'v'\\]"),
    ({"t": np.array(1), "m": np.zeros(N), "v": np.zeros(N), "w": np.zeros(N)}, "unexpected keys \\['w'\\]"),
    ({"t": np.array(-1), "m": np.zeros(N), "v": np.zeros(N)}, "'t'"),
    ({"t": np.array(1.0), "m": np.zeros(N), "v": np.zeros(N)}, "'t'"),
    ({"t": np.array(1), "m": np.zeros(N), "v": np.zeros(N + 1)}, "'v'"),
    ({"t": np.array(1), "m": np.zeros(N), "v": np.zeros(N, np.float32)}, "'v'"),
])
def test_load_state_dict_refuses_mismatched_state(bad, match):
    with pytest.raises(OptimizerError, match=match):
        Adam().load_state_dict(bad)


def test_load_state_dict_refuses_state_for_other_parameters():
    opt = Adam()
    opt.init(np.zeros(N, np.float32))
    with pytest.raises(OptimizerError, match="'m'.*float32"):
        opt.load_state_dict({"t": np.array(3), "m": np.zeros(N), "v": np.zeros(N)})


def test_config_is_json_and_rebuilds_the_optimizer():
    for opt in [make_optimizer("sgd", lr=0.1, momentum=0.9, nesterov=True), Adam(betas=(0.8, 0.9)),
                AdamW()]:
        config = json.loads(json.dumps(opt.config()))
        assert make_optimizer(**config).config() == opt.config()
    assert AdamW().config()["weight_decay"] == 0.01 and Adam().config()["weight_decay"] == 0.0


def test_bad_names_and_hyper_parameters_are_refused():
    with pytest.raises(ValueError, match="'rmsprop'.*adam.*adamw.*sgd"):
        make_optimizer("rmsprop")
    with pytest.raises(ValueError, match="'momentun'.*momentum"):
        make_optimizer("sgd", momentun=0.9)
    with pytest.raises(ValueError, match="'momentum'.*betas"):
        make_optimizer("adam", momentum=0.9)
    with pytest.raises(ValueError, match="lr"):
        make_optimizer("sgd", lr=-1)
    with pytest.raises(ValueError, match="nesterov"):
        make_optimizer("sgd", nesterov=True)
    with pytest.raises(ValueError, match="betas"):
        make_optimizer("adam", betas=(1.0, 0.9))


@pytest.mark.parametrize("schedule, hyper, expected", [
    ("constant", {}, {0: 0.8, 7: 0.8, 10_000: 0.8}),
    ("step", dict(step_size=10, gamma=0.5), {0: 0.8, 9: 0.8, 10: 0.4, 29: 0.2, 30: 0.1}),
    ("cosine", dict(total_steps=100, min_lr=0.1),
     {0: 0.8, 25: 0.1 + 0.7 * (1 + math.sqrt(0.5)) / 2, 50: 0.45, 100: 0.1, 150: 0.1}),
    ("linear", dict(total_steps=10, min_lr=0.2), {0: 0.8, 5: 0.5, 10: 0.2, 20: 0.2}),
])
def test_schedule_closed_forms(schedule, hyper, expected):
    assert set(SCHEDULES) == {"constant", "step", "cosine", "linear"}
    for step, lr in expected.items():
        assert lr_at(step, 0.8, schedule, **hyper) == pytest.approx(lr, rel=1e-12), step


def test_warmup_ramps_linearly_then_the_schedule_runs_over_the_remaining_steps():
    assert [lr_at(s, 0.8, warmup_steps=4) for s in range(6)] == pytest.approx(
        [0.2, 0.4, 0.6, 0.8, 0.8, 0.8])
    # torch: SequentialLR([LinearLR(1/4, 1, 3), CosineAnnealingLR(T_max=16, eta_min=0.1)], [4])
    cosine = dict(total_steps=20, min_lr=0.1)
    for s in range(4, 25):
        assert lr_at(s, 0.8, "cosine", warmup_steps=4, **cosine) == pytest.approx(
            lr_at(s - 4, 0.8, "cosine", total_steps=16, min_lr=0.1), rel=1e-12)
    assert lr_at(4, 0.8, "cosine", warmup_steps=4, **cosine) == 0.8  # the full rate, then decay
    assert lr_at(20, 0.8, "cosine", warmup_steps=4, **cosine) == pytest.approx(0.1)
    steps = [lr_at(s, 0.8, "step", warmup_steps=4, step_size=5, gamma=0.5) for s in range(4, 15)]
    assert steps == pytest.approx([0.8] * 5 + [0.4] * 5 + [0.2])  # decays counted after warmup


@pytest.mark.parametrize("schedule, hyper, match", [
    ("exponential", {}, "'exponential'.*constant"),
    ("step", {}, "step_size"),
    ("cosine", {}, "total_steps"),
    ("linear", dict(total_steps=0), "total_steps"),
])
def test_bad_schedules_are_refused(schedule, hyper, match):
    with pytest.raises(ValueError, match=match):
        lr_at(3, 0.1, schedule, **hyper)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_clip_scales_a_long_gradient_to_max_norm(dtype):
    g = (np.random.default_rng(1).normal(size=1000) * 10).astype(dtype)
    original = g.copy()
    norm = clip_by_global_norm(g, 2.5)
    rtol = 1e-6 if dtype == np.float32 else 1e-12
    assert norm == pytest.approx(np.linalg.norm(original.astype(np.float64)), rel=rtol)
    assert g.dtype == dtype
    assert np.linalg.norm(g.astype(np.float64)) == pytest.approx(2.5, rel=rtol)
    np.testing.assert_allclose(g, original * (2.5 / norm), rtol=rtol)


def test_clip_scales_a_float32_gradient_whose_squares_overflow():
    """The squared norm of a finite float32 vector passes float32's range from 1.8e19 on."""
    g = np.full(10, 3e19, np.float32)
    norm = clip_by_global_norm(g, 1.0)
    assert norm == pytest.approx(3e19 * math.sqrt(10), rel=1e-6)
    assert np.linalg.norm(g.astype(np.float64)) == pytest.approx(1.0, rel=1e-6)


def test_clip_leaves_a_short_or_non_finite_gradient_alone():
    g = np.array([0.3, -0.4])
    assert clip_by_global_norm(g, 1.0) == pytest.approx(0.5)
    assert np.array_equal(g, [0.3, -0.4])
    g = np.array([np.inf, 1.0])
    assert clip_by_global_norm(g, 1.0) == math.inf
    assert np.array_equal(g, [np.inf, 1.0])
    with pytest.raises(ValueError, match="max_norm"):
        clip_by_global_norm(g, 0.0)
