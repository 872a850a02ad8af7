"""Job for tests/test_deterministic.py: train in deterministic mode, print SHA-256 of the parameters.

mpiexec -n P python tests/jobs/deterministic.py OUT_DIR [--save-at STEP] [--resume-from PATH]
                                                [--no-shared-memory]
Rank 0 prints one JSON object: {case name: sha256 of the final parameter bytes}.
--no-shared-memory sums as across nodes: each rank's chunks on the grid in float64, then MPI's SUM.
"""

import argparse
import hashlib
import json
import sys
from pathlib import Path

from mpi4py import MPI

from distnn import Network, optim
from distnn.comm import Comm
from distnn.trainer import Trainer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for problems.py
import problems  # noqa: E402

FAMILIES = ("gaussian", "bernoulli", "multinomial", "poisson")


def problem(family):
    return problems.problem(family, n=83, d=6, k=3, seed=7)


def cases():
    for family in FAMILIES:
        for dtype in ("float64", "float32"):
            for opt in ("momentum", "adam"):
                yield f"{family}-{dtype}-{opt}", family, dtype, opt
    yield "multinomial-float32-adam-clipped", "multinomial", "float32", "adam-clipped"


def trainer_for(family, dtype, opt, comm, directory=None, save_every=0):
    net = Network([6, 10, 3], activation="tanh", family=family, l2=1e-3, dtype=dtype, seed=3)
    optimizer = optim.SGD(lr=0.05, momentum=0.9) if opt == "momentum" else optim.Adam(lr=0.01)
    clip = 0.05 if opt == "adam-clipped" else 0.0  # the global norm, the same for every P
    # 83 samples, global batch 13 (not divisible by P = 2, 3, 4 nor by chunk_size 5); the last
    # batch of each epoch has 5 samples = one chunk, so most ranks own no chunk there.
    return Trainer(net, optimizer, batch_size=13, epochs=15, seed=11, comm=comm,
                   deterministic=True, chunk_size=5, clip_norm=clip, checkpoint_dir=directory,
                   checkpoint_every=save_every, keep_checkpoints=1000)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--save-at", type=int, default=0)
    parser.add_argument("--resume-from", type=Path)
    parser.add_argument("--no-shared-memory", action="store_true")
    args = parser.parse_args()
    comm = Comm(MPI.COMM_WORLD, timeout=120.0, shared_memory=not args.no_shared_memory)
    digests = {}
    for name, family, dtype, opt in cases():
        X, y = problem(family)
        if args.resume_from:
            path = args.resume_from / name / f"ckpt-{args.save_at:09d}.npz"
            trainer = Trainer.resume(path, comm=comm, checkpoint_dir=None)
        else:
            directory = args.out / name if args.save_at else None
            trainer = trainer_for(family, dtype, opt, comm, directory, args.save_at)
        history = trainer.fit(X, y, X[:20], y[:20])
        losses = [(r["loss"], r["val_loss"]) for r in history]
        digests[name] = hashlib.sha256(trainer.net.params.tobytes()
                                       + json.dumps(losses).encode()).hexdigest()
        digests[name + ":steps"] = trainer.step
        digests[name + ":summed in place"] = trainer.stepper.sums_in_place
        trainer.close()
    if MPI.COMM_WORLD.rank == 0:
        json.dump(digests, sys.stdout)


if __name__ == "__main__":
    main()
