"""distnn's estimators beside sklearn.neural_network's, on scikit-learn's data and defaults:

    python examples/sklearn_compare.py                  # prints a markdown table
    mpiexec -n 2 python examples/sklearn_compare.py     # distnn alone, on 2 ranks

Each data set is split 75/25 (random_state=0) and standardized on the training part; both
estimators get their defaults (100 ReLU units, Adam at 0.001, batches of 200, up to 200 epochs,
tol 1e-4) with random_state=0. scikit-learn's alpha=1e-4 has no distnn twin (l2 is 0 here).
Under mpiexec scikit-learn is not run: its fit on one rank would race the others' MPI polling
for the cores.
"""
import time
import warnings

from mpi4py import MPI  # distributed: rank 0 alone prints
from sklearn import neural_network
from sklearn.datasets import load_breast_cancer, load_diabetes, load_digits
from sklearn.exceptions import ConvergenceWarning
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import StandardScaler

import distnn

SETS = [("digits", load_digits, "classifier", "accuracy"),
        ("breast cancer", load_breast_cancer, "classifier", "accuracy"),
        ("diabetes", load_diabetes, "regressor", "R²")]
ROOT = MPI.COMM_WORLD.rank == 0
SERIAL = MPI.COMM_WORLD.size == 1


def measure(estimator, X_train, y_train, X_test, y_test):
    """(held-out score, fit seconds, epochs)."""
    started = time.perf_counter()
    estimator.fit(X_train, y_train)
    return estimator.score(X_test, y_test), time.perf_counter() - started, estimator.n_iter_


def main():
    warnings.simplefilter("ignore", ConvergenceWarning)
    rows = []
    for name, load, kind, metric in SETS:
        X, y = load(return_X_y=True)
        X_train, X_test, y_train, y_test = train_test_split(X, y, test_size=0.25, random_state=0)
        scaler = StandardScaler().fit(X_train)
        X_train, X_test = scaler.transform(X_train), scaler.transform(X_test)
        ours = getattr(distnn, f"MLP{kind.title()}")(random_state=0)
        row = [name, f"{len(X)} × {X.shape[1]}", metric,
               measure(ours, X_train, y_train, X_test, y_test)]
        if SERIAL:
            theirs = getattr(neural_network, f"MLP{kind.title()}")(random_state=0)
            row.append(measure(theirs, X_train, y_train, X_test, y_test))
        rows.append(row)
    if ROOT:
        ranks = MPI.COMM_WORLD.size
        print(f"| data | shape | metric | distnn ({ranks} rank{'s' * (ranks > 1)}) |"
              + (" sklearn.neural_network | epochs (distnn / sklearn) |" if SERIAL else " epochs |"))
        print("|---|---|---|---|" + ("---|---|" if SERIAL else "---|"))
        for name, shape, metric, (s1, t1, n1), *theirs in rows:
            line = f"| {name} | {shape} | {metric} | {s1:.3f} in {t1:.2f} s |"
            for s2, t2, n2 in theirs:
                line += f" {s2:.3f} in {t2:.2f} s |"
            print(line + (f" {n1} / {theirs[0][2]} |" if theirs else f" {n1} |"))


if __name__ == "__main__":
    main()
