"""The benchmark's recurrent step (issue 18): a `Recurrent` BPTT step in samples·steps per second,
against PyTorch running the same unrolled computation and against the GEMM roofline of its products.

    python -m distnn.bench --worker recurrent --spec JSON     (started by `distnn bench`)

One step is the trainer's: `Recurrent.grad_sum` over a batch of N sequences of T steps (targets
"last", multinomial) and an SGD-momentum update. PyTorch runs the same f, a `torch.nn.Linear` stack
applied per step in a Python loop on [x(t), r(t)] -> [logits, r(t+1)] (ReLU hidden, tanh state),
with BPTT through autograd, cross-entropy at the last step and torch's SGD momentum, in the same
dtype and BLAS threads. The roofline is the time of exactly the step's matrix products, nothing
else, in the layout `Recurrent` runs them: per step the forward products (N, |I_l|) x (|I_l|, |O_l|)
of every layer and the backward ones P_l W_l (for the first layer only its state columns, which
carry the proxy error to r(t)), then one weight-gradient product per layer over all T·N rows.
"""

import json

import numpy as np

from . import optim
from .bench_workers import blas_threads, import_torch, timeit


def inner_sizes(c):
    """The feed-forward net f's sizes: [n_in + S, *hidden, n_out + S]."""
    return [c["n_in"] + c["state"], *c["hidden"], c["n_out"] + c["state"]]


def gemm_ops(c, seed=0):
    """The step's matrix products as [(kind, a, b, out, flops)], with Recurrent's shapes."""
    rng = np.random.default_rng(seed)
    sizes, n, t, dt = inner_sizes(c), c["batch"], c["steps"], c["dtype"]
    shapes = list(zip(sizes[1:], sizes[:-1]))  # (|O_l|, |I_l|)
    W = [rng.standard_normal(s).astype(dt) for s in shapes]
    inp = [rng.standard_normal((t, n, i)).astype(dt) for _, i in shapes]  # I_l(t)
    out = [np.empty((t, n, o), dt) for o, _ in shapes]  # Z_l(t), then P_l(t)
    grad = [np.empty(s, dt) for s in shapes]
    w_state = np.ascontiguousarray(W[0][:, c["n_in"]:])  # (|O_0|, S)
    r_err = np.empty((n, c["state"]), dt)
    ops = []
    for s in range(t):
        ops += [("forward", inp[l][s], w.T, out[l][s], 2 * n * w.size) for l, w in enumerate(W)]
    for s in range(t - 1, -1, -1):
        ops += [("dx", out[l][s], W[l], out[l - 1][s], 2 * n * W[l].size)  # P_l W_l -> P_{l-1}
                for l in range(len(W) - 1, 0, -1)]
        if s > 0:
            ops.append(("dstate", out[0][s], w_state, r_err, 2 * n * w_state.size))
    rows = t * n
    ops += [("wgrad", out[l].reshape(rows, -1).T, inp[l].reshape(rows, -1), grad[l],
             2 * rows * W[l].size) for l in range(len(W))]
    return ops


def run_ops(ops):
    for _, a, b, out, _ in ops:
        np.matmul(a, b, out=out)


def measure(c, min_s, torch):
    """Our step, the roofline and (with torch) PyTorch's step for one configuration."""
    from .recurrent import Recurrent
    sizes = [c["n_in"], *c["hidden"], c["n_out"]]
    rnn = Recurrent(sizes, c["state"], activation="relu", state_activation="tanh",
                    family="multinomial", targets="last", dtype=c["dtype"], seed=0)
    rng = np.random.default_rng(1)
    X = rng.standard_normal((c["batch"], c["steps"], c["n_in"])).astype(c["dtype"])
    labels = rng.integers(0, c["n_out"], c["batch"])
    X, lengths = rnn.check_inputs(X)
    Y = rnn.check_targets(labels, len(X), lengths, X.shape[1])
    grad = rnn.grad_buffer()
    opt = optim.SGD(lr=0.01, momentum=0.9)
    opt.init(rnn.params)
    opt.threads = c["threads"]

    def step():
        rnn.grad_sum(X, Y, grad, divisor=len(X))
        opt.step(rnn.params, grad)

    ops = gemm_ops(c)
    result = dict(c, flops=sum(op[-1] for op in ops), gemm_s=timeit(lambda: run_ops(ops), min_s),
                  grad_s=timeit(lambda: rnn.grad_sum(X, Y, grad, divisor=len(X)), min_s),
                  step_s=timeit(step, min_s))
    if torch is not None:
        result["torch_step_s"] = torch_step_s(torch, c, X, labels, min_s)
    return result


def torch_step_s(torch, c, X, labels, min_s):
    """PyTorch's step on the same unrolled computation (see the module docstring)."""
    torch.set_num_threads(c["threads"])
    nn, sizes, k = torch.nn, inner_sizes(c), c["n_out"]
    layers = []
    for fan_in, fan_out in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(fan_in, fan_out), nn.ReLU()]
    f = nn.Sequential(*layers[:-1]).to(getattr(torch, c["dtype"]))
    opt = torch.optim.SGD(f.parameters(), lr=0.01, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()
    x, y = torch.from_numpy(np.ascontiguousarray(X)), torch.from_numpy(labels)
    r0 = torch.zeros((len(X), c["state"]), dtype=x.dtype)

    def step():
        opt.zero_grad()
        r = r0
        for t in range(x.shape[1]):
            z = f(torch.cat([x[:, t], r], dim=1))
            logits, r = z[:, :k], torch.tanh(z[:, k:])
        loss_fn(logits, y).backward()
        opt.step()

    return timeit(step, min_s)


def recurrent_worker(spec):
    """Every recurrent configuration of the plan, each under its BLAS thread limit."""
    torch = import_torch() if spec["torch"] else None
    out = {"torch": None if torch is None else torch.__version__, "configs": []}
    for c in spec["configs"]:
        with blas_threads(c["threads"]):
            out["configs"].append(measure(c, spec["seconds"], torch))
    return out


WORKERS = {"recurrent": recurrent_worker}


def worker_main(kind, spec):
    """Entry of a recurrent worker process: its JSON result on stdout."""
    print(json.dumps(WORKERS[kind](json.loads(spec)), default=float), flush=True)
    return 0


# ============================================================================ the report's side

def rows(configs):
    """bench.json's recurrent rows: samples·steps/s, ours and PyTorch's, and the roofline fraction."""
    found = []
    for c in configs:
        work = c["batch"] * c["steps"]
        row = {k: c[k] for k in ("n_in", "hidden", "state", "n_out", "steps", "batch", "dtype",
                                 "threads")} | {
            "net": "rnn", "step_s": c["step_s"], "grad_s": c["grad_s"], "gemm_s": c["gemm_s"],
            "samples_steps_per_s": work / c["step_s"], "gemm_gflops": c["flops"] / c["gemm_s"] / 1e9,
            "step_fraction": c["gemm_s"] / c["step_s"], "grad_fraction": c["gemm_s"] / c["grad_s"]}
        if "torch_step_s" in c:
            row |= {"torch_step_s": c["torch_step_s"],
                    "torch_samples_steps_per_s": work / c["torch_step_s"],
                    "vs_torch": c["torch_step_s"] / c["step_s"]}
        found.append(row)
    return found
