"""One-step-ahead forecasting of a real series with a recurrent network, against a linear
autoregressive baseline on the same lags and the same split.

    python examples/elnino_forecast.py            # from the repository root; trains on 2 ranks

The series: Nino 1+2 sea surface temperature, monthly, 1950-2010 (examples/elnino.csv: NOAA,
public domain). Each sample is the LAGS months before a month (one value per step, in order)
and its target that month's temperature; months before SPLIT of the series train, the rest are
held out (a chronological split: no window of the test months is seen in training). Values are
standardized by the training months' mean and std, and errors are reported in degrees Celsius.

It writes runs/elnino-data/{train,test}.npz, runs `distnn train examples/elnino.toml -n 2`, and
prints the held-out RMSE of the network, of AR(LAGS) fitted by least squares (numpy lstsq, with
an intercept) on the same training windows, and of persistence (next month = this month).
"""
import os
import subprocess
import sys

import numpy as np

import distnn

HERE = os.path.dirname(os.path.abspath(__file__))
DATA = "runs/elnino-data"
LAGS = 24      # months of history per sample: two seasonal cycles
SPLIT = 0.8    # the first 80 % of the months train, the last 20 % test


def series():
    """(732,) monthly temperatures, January 1950 first."""
    table = np.loadtxt(os.path.join(HERE, "elnino.csv"), delimiter=",", skiprows=6)
    return table[:, 1:].reshape(-1)  # drop the year column, months in order


def windows(z):
    """(X (n, LAGS, 1), y (n,), index of each target month) for every month with LAGS before it."""
    idx = np.arange(LAGS, len(z))
    X = np.stack([z[i - LAGS:i] for i in idx])[:, :, None]
    return X, z[idx], idx


def main():
    s = series()
    cut = int(SPLIT * len(s))
    mu, sd = s[:cut].mean(), s[:cut].std()  # from the training months only
    X, y, idx = windows((s - mu) / sd)
    train, test = idx < cut, idx >= cut
    os.makedirs(DATA, exist_ok=True)
    np.savez(f"{DATA}/train.npz", X=X[train], y=y[train])
    np.savez(f"{DATA}/test.npz", X=X[test], y=y[test])

    done = subprocess.run([sys.executable, "-m", "distnn", "train", os.path.join(HERE, "elnino.toml"),
                           "-n", "2", "--overwrite"])
    if done.returncode:
        sys.exit(done.returncode)
    model = distnn.load_model("runs/elnino/model.npz")
    net = model.mean(X[test])[:, 0]

    A = np.hstack([X[:, :, 0], np.ones((len(X), 1))])  # AR(LAGS) with an intercept
    coef = np.linalg.lstsq(A[train], y[train], rcond=None)[0]
    ar = A[test] @ coef

    def rmse(pred):
        return float(np.sqrt(np.mean((pred - y[test]) ** 2)) * sd)

    print(f"held-out months {int(test.sum())} ({1950 + cut // 12}-2010), RMSE in degrees C:")
    print(f"  recurrent network  {rmse(net):.3f}")
    print(f"  AR({LAGS}) lstsq       {rmse(ar):.3f}")
    print(f"  persistence        {rmse(X[test][:, -1, 0]):.3f}")


if __name__ == "__main__":
    main()
