"""distnn's MLPClassifier as a scikit-learn estimator, the same script on 1 or P ranks:

    python examples/sklearn_quickstart.py [model.npz]
    mpiexec -n 2 python examples/sklearn_quickstart.py [model.npz]   # each rank: half of each batch

Prints the held-out accuracy once and writes the model file that `distnn predict MODEL DATA`,
`distnn info MODEL` and `distnn.load_model` read (held-out accuracy 0.936 on 1 and on 2 ranks).
"""
import sys

from mpi4py import MPI  # distributed: only to let rank 0 alone print and write
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import distnn

X, y = load_digits(return_X_y=True)
X_train, X_test, y_train, y_test = train_test_split(X, y, test_size=0.25, random_state=0)
# Every rank passes the whole data; fit splits each batch across the ranks of MPI.COMM_WORLD
# and every rank ends with the same fitted model.
clf = distnn.MLPClassifier(hidden_layer_sizes=(64,), max_iter=50, random_state=0)
clf.fit(X_train, y_train)
accuracy = clf.score(X_test, y_test)
if MPI.COMM_WORLD.rank == 0:  # distributed: rank 0 reports and writes
    print(f"held-out accuracy {accuracy:.3f} after {clf.n_iter_} epochs "
          f"on {MPI.COMM_WORLD.size} rank(s)")
    distnn.save_model(clf, sys.argv[1] if len(sys.argv) > 1 else "model.npz")
