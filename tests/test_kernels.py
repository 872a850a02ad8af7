"""Each compiled kernel against the numpy expression it replaces (the numpy twin), in float32 and
float64: bit for bit where the operations run in the same order, else to round-off (exp, log1p,
tanh come from another math library; sums run in another order). Then the compile cache: ranks
starting together on an empty cache, and an install location nobody may write to."""

import os
import re
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from distnn import kernels
from distnn.activations import ACTIVATIONS, LEAKY_SLOPE
from distnn.exactsum import _LOWEST

DTYPES = [np.float32, np.float64]
RTOL = {np.float32: 4e-6, np.float64: 1e-14}  # a few ulps: another libm, or another sum order


def rng_arrays(dtype, *shapes, scale=3.0, seed=0):
    rng = np.random.default_rng(seed)
    return [(rng.standard_normal(s) * scale).astype(dtype) for s in shapes]


def sequential_colsum(p):
    """Σ_n p[n] in the order of n, in p's dtype: what the kernels compute."""
    out = np.zeros(p.shape[1], p.dtype)
    for row in p:
        out += row
    return out


# ---- activations: forward with the bias, backward with the next bias gradient -----------------

def np_sigmoid(z):
    e = np.exp(-np.abs(z))
    e = e / (1 + e)
    return np.where(z >= 0, 1 - e, e)


FORWARD = {  # A(v), v = z + b, as activations.py computed it in numpy
    "identity": lambda v: v,
    "relu": lambda v: np.maximum(v, np.zeros_like(v)),
    "leaky_relu": lambda v: np.where(v < 0, v * LEAKY_SLOPE, v),
    "tanh": np.tanh,
    "sigmoid": np_sigmoid,
    "softplus": lambda v: np.log1p(np.exp(-np.abs(v))) + np.maximum(v, np.zeros_like(v)),
}
DERIVATIVE = {  # A'(z) through o = A(z)
    "identity": lambda o: np.ones_like(o),
    "relu": lambda o: (o > 0).astype(o.dtype),
    "leaky_relu": lambda o: np.where(o > 0, o.dtype.type(1), o.dtype.type(LEAKY_SLOPE)),
    "tanh": lambda o: 1 - o * o,
    "sigmoid": lambda o: (1 - o) * o,
    "softplus": lambda o: -np.expm1(-o),
}
EXACT_FORWARD = {"identity", "relu", "leaky_relu"}  # + and a comparison: numpy's bits
EXACT_BACKWARD = {"identity", "relu", "leaky_relu", "tanh", "sigmoid"}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", list(ACTIVATIONS))
def test_forward_kernel_is_the_activation_of_z_plus_b(name, dtype):
    z, b = rng_arrays(dtype, (37, 19), (19,))
    expected = FORWARD[name](z + b)
    ACTIVATIONS[name].forward(z, b)
    assert z.dtype == dtype
    if name in EXACT_FORWARD:
        np.testing.assert_array_equal(z, expected)
    else:
        np.testing.assert_allclose(z, expected, rtol=RTOL[dtype], atol=0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", list(ACTIVATIONS))
def test_backward_kernel_multiplies_by_the_derivative_and_sums_the_bias_gradient(name, dtype):
    z, b, p = rng_arrays(dtype, (41, 23), (23,), (41, 23))
    ACTIVATIONS[name].forward(z, b)  # o = A(z + b): a real forward output
    expected = p * DERIVATIVE[name](z)
    gb = np.full(23, np.nan, dtype)  # overwritten, not added to
    ACTIVATIONS[name].backward(p, z, gb)
    if name in EXACT_BACKWARD:
        np.testing.assert_array_equal(p, expected)
    else:
        np.testing.assert_allclose(p, expected, rtol=RTOL[dtype], atol=0)
    np.testing.assert_array_equal(gb, sequential_colsum(p))  # in the order of the samples
    np.testing.assert_allclose(gb, p.sum(axis=0), rtol=RTOL[dtype] * 10,
                               atol=RTOL[dtype] * np.abs(p).sum(axis=0).max())


@pytest.mark.parametrize("dtype", DTYPES)
def test_activation_kernels_keep_nan_for_divergence_checks(dtype):
    for name in ACTIVATIONS:
        z = np.array([[np.nan, 1.0]], dtype)
        ACTIVATIONS[name].forward(z, np.zeros(2, dtype))
        assert np.isnan(z[0, 0]), name
        p = np.array([[np.nan, 1.0]], dtype)
        ACTIVATIONS[name].backward(p, np.ones((1, 2), dtype), np.empty(2, dtype))
        assert np.isnan(p[0, 0]), name


# ---- the output pass -----------------------------------------------------------------------------

def np_output(family, z, y, divisor):
    """(P_L, loss, correct) the numpy way, from the (N, K) logits: families.py before the kernels."""
    if family == "multinomial":
        shifted = z - z.max(axis=1, keepdims=True)
        e = np.exp(shifted)
        s = e.sum(axis=1, keepdims=True)
        p = e / s
        loss = float(np.log(s).sum(dtype=np.float64)
                     - shifted[np.arange(len(y)), y].sum(dtype=np.float64))
        p[np.arange(len(y)), y] -= 1
        return p / z.dtype.type(divisor), loss, int(np.count_nonzero(z.argmax(axis=1) == y))
    if family == "bernoulli":
        softplus = FORWARD["softplus"](z)
        loss = float(np.sum(softplus - y * z, dtype=np.float64))
        return ((np_sigmoid(z) - y) / z.dtype.type(divisor), loss,
                int(np.count_nonzero((z > 0) == (y > 0.5))))
    if family == "gaussian":
        r = z - y
        return r / z.dtype.type(divisor), 0.5 * float(np.einsum("ij,ij->", r, r, dtype=np.float64)), 0
    rate = np.exp(z)  # poisson
    return (rate - y) / z.dtype.type(divisor), float(np.sum(rate - y * z, dtype=np.float64)), 0


OUTPUT = {"multinomial": kernels.softmax_output, "bernoulli": kernels.sigmoid_output,
          "gaussian": kernels.identity_output, "poisson": kernels.exp_output}


def targets(family, n, k, dtype, rng):
    if family == "multinomial":
        return rng.integers(0, k, n).astype(np.intp)
    if family == "bernoulli":
        return rng.integers(0, 2, (n, k)).astype(dtype)
    if family == "poisson":
        return rng.poisson(2.0, (n, k)).astype(dtype)
    return rng.standard_normal((n, k)).astype(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("family", list(OUTPUT))
def test_output_kernel_is_the_numpy_output_pass(family, dtype):
    rng = np.random.default_rng(3)
    n, k, divisor = 53, 7, 200
    zt = (rng.standard_normal((k, n)) * 2).astype(dtype)  # class-major, as the network holds it
    y = targets(family, n, k, dtype, rng)
    pt, gb = np.empty_like(zt), np.empty(k, dtype)
    loss, correct = OUTPUT[family](zt, y, pt, dtype(divisor), gb)
    p, np_loss, np_correct = np_output(family, zt.T.copy(), y, divisor)
    if family == "gaussian":  # subtraction and division only
        np.testing.assert_array_equal(pt.T, p)
    else:
        np.testing.assert_allclose(pt.T, p, rtol=RTOL[dtype] * 4, atol=RTOL[dtype] / divisor)
    assert loss == pytest.approx(np_loss, rel=RTOL[dtype] * 4)
    assert correct == np_correct
    np.testing.assert_array_equal(gb, sequential_colsum(pt.T))


@pytest.mark.parametrize("dtype,big", [(np.float32, 1e4), (np.float64, 1e300)])
def test_output_kernels_do_not_overflow_at_extreme_logits(dtype, big):
    zt = np.array([[big], [-big], [0.0]], dtype)
    pt, gb = np.empty_like(zt), np.empty(3, dtype)
    loss, correct = kernels.softmax_output(zt, np.array([1]), pt, dtype(1), gb)
    np.testing.assert_array_equal(pt[:, 0], [1.0, -1.0, 0.0])
    assert loss == pytest.approx(2 * big, rel=1e-6) and correct == 0
    zt = np.array([[big], [-big]], dtype)
    pt, gb = np.empty_like(zt), np.empty(2, dtype)
    loss, correct = kernels.sigmoid_output(zt, np.array([[0.0, 1.0]], dtype), pt, dtype(1), gb)
    np.testing.assert_array_equal(pt[:, 0], [1.0, -1.0])
    assert loss == pytest.approx(2 * big, rel=1e-6) and correct == 0


@pytest.mark.parametrize("dtype", DTYPES)
def test_mean_kernels_and_the_output_bias_add(dtype):
    zt, b = rng_arrays(dtype, (5, 31), (5,))
    expected = zt + b[:, None]
    kernels.add_rows(zt, b)
    np.testing.assert_array_equal(zt, expected)
    out = np.empty_like(zt)
    kernels.softmax_mean(zt, out)
    e = np.exp(zt - zt.max(axis=0))
    np.testing.assert_allclose(out, e / e.sum(axis=0), rtol=RTOL[dtype] * 4)
    kernels.sigmoid_mean(zt, out)
    np.testing.assert_allclose(out, np_sigmoid(zt), rtol=RTOL[dtype])
    kernels.exp_mean(zt, out)
    np.testing.assert_allclose(out, np.exp(zt), rtol=RTOL[dtype])


# ---- optimizer updates: numpy's passes, in numpy's order, fused ----------------------------------

def np_sgd(p, g, v, lr, mu, wd, nesterov):
    dt = p.dtype.type
    if wd:
        g += p * dt(wd)
    if mu:
        v *= dt(mu)
        v += g
        g = g + v * dt(mu) if nesterov else v
    p -= g * dt(lr)


def np_adam(p, g, m, v, lr, t, b1, b2, eps, wd, decoupled):
    dt = p.dtype.type
    if wd and decoupled:
        p *= dt(1 - lr * wd)
    elif wd:
        g += p * dt(wd)
    s = (g * g) * dt(1 - b2)
    v *= dt(b2)
    v += s
    m *= dt(b1)
    m += g * dt(1 - b1)
    s = np.sqrt(v) / dt(np.sqrt(1 - b2**t)) + dt(eps)
    p -= (m / s) * dt(lr / (1 - b1**t))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mu,wd,nesterov", [(0, 0, False), (0, 0.1, False), (0.9, 0, False),
                                             (0.9, 0.1, True)])
def test_sgd_kernel_gives_the_bits_of_numpy(mu, wd, nesterov, dtype):
    p, g, v = rng_arrays(dtype, (1001,), (1001,), (1001,))
    q, w = p.copy(), v.copy()
    np_sgd(p, g.copy(), v, 0.05, mu, wd, nesterov)
    kernels.sgd_update(q, g, w, dtype(0.05), dtype(mu), dtype(wd), nesterov)
    assert q.tobytes() == p.tobytes() and (not mu or w.tobytes() == v.tobytes())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("wd,decoupled", [(0, False), (0.1, False), (0.1, True)])
def test_adam_kernel_gives_the_bits_of_numpy(wd, decoupled, dtype):
    p, g, m, v = rng_arrays(dtype, (1001,), (1001,), (1001,), (1001,))
    v = np.abs(v)
    q, m2, v2 = p.copy(), m.copy(), v.copy()
    lr, t, b1, b2, eps = 0.01, 7, 0.8, 0.99, 1e-8
    np_adam(p, g.copy(), m, v, lr, t, b1, b2, eps, wd, decoupled)
    dt = dtype
    kernels.adam_update(q, g, m2, v2, dt(lr / (1 - b1**t)), dt(b1), dt(b2), dt(1 - b1), dt(1 - b2),
                        dt(np.sqrt(1 - b2**t)), dt(eps), dt(0 if decoupled else wd),
                        dt(1 - lr * wd if decoupled else 1))
    assert q.tobytes() == p.tobytes() and m2.tobytes() == m.tobytes() and v2.tobytes() == v.tobytes()


# ---- norms and checks ----------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
def test_sum_of_squares_and_finiteness(dtype):
    (x,) = rng_arrays(dtype, (1003,))
    x64 = x.astype(np.float64)
    assert kernels.sum_squares(x, 1.0) == pytest.approx(float(x64 @ x64), rel=1e-14)
    assert kernels.sum_squares(x, 0.5) == pytest.approx(float(x64 @ x64) / 4, rel=1e-14)
    assert kernels.all_finite(x)
    for bad in (np.nan, np.inf, -np.inf):
        for at in (0, 500, 1002):
            y = x.copy()
            y[at] = bad
            assert not kernels.all_finite(y)
    if dtype == np.float32:  # squares that overflow float32 add up in float64
        assert np.isfinite(kernels.sum_squares(np.full(4, 1e30, dtype), 1.0))


# ---- deterministic mode: signal bounds, grid, exact sum ------------------------------------------

def colmax(a, out):
    ints = np.dtype(f"i{a.dtype.itemsize}")
    kernels.colmax_abs(a.view(ints), out.view(ints), ints.type(np.iinfo(ints).max))


@pytest.mark.parametrize("dtype", DTYPES)
def test_column_and_row_maxima_of_absolute_values(dtype):
    a, start = rng_arrays(dtype, (29, 17), (17,))
    start = np.abs(start)
    out = start.copy()
    colmax(a, out)
    np.testing.assert_array_equal(out, np.maximum(start, np.abs(a).max(axis=0)))
    out = start[:5].copy()
    kernels.rowmax_abs(a[:5].copy(), out)
    np.testing.assert_array_equal(out, np.maximum(start[:5], np.abs(a[:5]).max(axis=1)))
    a[3, 4], a[5, 6] = np.nan, -np.inf  # NaN propagates to its column (row) as numpy's maximum does
    out = np.zeros(17, dtype)
    colmax(a, out)
    np.testing.assert_array_equal(np.isnan(out), np.arange(17) == 4)
    assert out[6] == np.inf
    out = np.zeros(29, dtype)
    kernels.rowmax_abs(a, out)
    np.testing.assert_array_equal(np.isnan(out), np.arange(29) == 3)


def test_grid_magic_is_the_outer_sum_of_the_exponent_bits_raised_to_the_lowest():
    rng = np.random.default_rng(4)
    rows = ((rng.integers(-1100, 900, 6) + 1075) << 52) + (1 << 51)
    cols = rng.integers(-60, 60, 9) << 52
    magic = np.empty(6 * 9)
    kernels.grid_magic(rows, cols, _LOWEST, magic)
    expected = np.maximum(rows[:, None] + cols[None, :], _LOWEST).reshape(-1)
    np.testing.assert_array_equal(magic.view(np.int64), expected)


@pytest.mark.parametrize("dtype", DTYPES)
def test_grid_add_is_numpys_three_passes_per_chunk(dtype):
    rng = np.random.default_rng(5)
    rows = (rng.standard_normal((4, 300)) * 10).astype(dtype)
    magic = 1.5 * 2.0**52 * 2.0 ** rng.integers(-30, -10, 260).astype(np.float64)
    expected = np.zeros(260)
    for r in rows[:3]:  # numpy: x -> float64, + M, - M, then add
        expected += (r[20:280].astype(np.float64) + magic) - magic
    total = np.full(260, np.nan)
    kernels.grid_add(rows, 3, 20, magic, total, True)
    assert total.tobytes() == expected.tobytes()
    kernels.grid_add(rows[3:], 1, 20, magic, total, False)
    expected += (rows[3, 20:280].astype(np.float64) + magic) - magic
    assert total.tobytes() == expected.tobytes()


def test_each_kernel_compiled_once_per_dtype():
    """Arrays C-contiguous and scalars in the arrays' dtype: no kernel gets a third version (which
    would mean a slower layout or float64 arithmetic on float32 data) after a step in each dtype."""
    from distnn import Network, optim
    for dtype in DTYPES:
        for family in OUTPUT:
            for activation in ACTIVATIONS:
                net = Network([3, 4, 2], activation=activation, family=family, dtype=dtype)
                X = np.random.default_rng(0).standard_normal((5, 3))
                y = targets(family, 5, 2, dtype, np.random.default_rng(1))
                g = net.gradient(X, y)
                net.eval_sums(net.check_inputs(X), net.check_targets(y))
                net.predict(X)
                for opt in (optim.SGD(momentum=0.9), optim.Adam(), optim.AdamW()):
                    opt.step(net.params, g.copy())
                optim.global_norm(g)
    from numba.core.types import Array

    def writable(t):  # a read-only input (a memory map, say) compiles the same machine code again
        return t.copy(readonly=False) if isinstance(t, Array) else t

    def contiguous(sig):  # a Recurrent's column slices compile an 'A' layout of their own
        return all(t.layout == "C" for t in sig if isinstance(t, Array))

    for name in dir(kernels):
        signatures = getattr(getattr(kernels, name), "signatures", None)
        if signatures is not None:
            kinds = {tuple(writable(t) for t in sig) for sig in signatures if contiguous(sig)}
            assert len(kinds) <= 2, f"kernels.{name}: {signatures}"


# ---- the compile cache -----------------------------------------------------------------------------

ONE_STEP = textwrap.dedent("""
    import numpy as np
    from distnn import Network, Trainer, SGD
    net = Network([8, 16, 3], dtype="float32", seed=0)
    X = np.random.default_rng(0).standard_normal((64, 8)).astype(np.float32)
    y = np.arange(64) % 3
    Trainer(net, SGD(lr=0.1, momentum=0.9), batch_size=32, epochs=1, seed=0).fit(X, y)
    import sys
    sys.stdout.write(f"digest {net.params.sum()}\\n")  # one write: the ranks' lines stay whole
    sys.stdout.flush()
""")


def child_env(**extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith("NUMBA_")}
    return env | extra


def test_ranks_starting_together_on_an_empty_cache_both_succeed_and_the_next_run_loads_it(tmp_path):
    from distnn.launcher import find_mpiexec
    mpiexec = find_mpiexec()
    if mpiexec is None:
        pytest.skip("needs mpiexec")
    cache = tmp_path / "numba-cache"
    script = tmp_path / "one_step.py"
    script.write_text(ONE_STEP)
    env = child_env(NUMBA_CACHE_DIR=str(cache), NUMBA_DEBUG_CACHE="1")
    runs = [subprocess.run([*mpiexec, "-n", "2", sys.executable, str(script)], env=env,
                           capture_output=True, text=True, timeout=240) for _ in range(2)]
    for run in runs:
        assert run.returncode == 0, run.stderr[-3000:]
        assert run.stdout.count("digest") == 2
    assert "data saved" in runs[0].stdout  # the first run compiled and wrote the cache
    assert "data saved" not in runs[1].stdout and "data loaded" in runs[1].stdout
    # the ranks' stdout is merged, and numba's debug lines may share a line with a digest
    digests = {d for run in runs for d in re.findall(r"digest (\S+)", run.stdout)}
    assert len(digests) == 1  # every rank, both runs: the same parameters


def test_a_read_only_install_location_uses_the_user_cache_directory(tmp_path):
    site = tmp_path / "site"
    shutil.copytree(os.path.dirname(kernels.__file__), site / "distnn",
                    ignore=shutil.ignore_patterns("__pycache__"))
    home = tmp_path / "home"
    home.mkdir()
    env = child_env(PYTHONPATH=str(site), HOME=str(home), XDG_CACHE_HOME=str(home / ".cache"),
                    PYTHONDONTWRITEBYTECODE="1")
    command = [sys.executable, "-c", ONE_STEP]
    if os.geteuid() == 0:  # root writes through permissions: mount the copy read-only instead
        if shutil.which("unshare") is None:
            pytest.skip("running as root without unshare: cannot make a read-only location")
        probe = subprocess.run(["unshare", "-m", "true"], capture_output=True)
        if probe.returncode != 0:
            pytest.skip("running as root and cannot unshare a mount namespace")
        command = ["unshare", "-m", "sh", "-c", 'mount --bind "$0" "$0" && '
                   'mount -o remount,bind,ro "$0" "$0" && exec "$@"', str(site), *command]
    else:
        for root, dirs, files in os.walk(site):
            for name in dirs + files:
                os.chmod(os.path.join(root, name), 0o555)
        os.chmod(site, 0o555)
    try:
        run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240,
                             cwd=tmp_path)
        assert run.returncode == 0, run.stderr[-3000:]
        assert "digest" in run.stdout
        assert not (site / "distnn" / "__pycache__").exists()
        cached = [f for _, _, files in os.walk(home / ".cache") for f in files if f.endswith(".nbi")]
        assert cached, "numba wrote no index into the user cache directory"
    finally:
        for root, dirs, _ in os.walk(site):
            os.chmod(root, 0o755)
