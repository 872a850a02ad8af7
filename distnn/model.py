"""The trained model a user keeps: network, standardization and class labels in one checkpoint file.

    distnn.save_model(obj, "model.npz")  # a Model, Network, Trainer or fitted MLPClassifier/-Regressor
    model = distnn.load_model("runs/digits/model.npz")   # what `distnn train` wrote, or the above
    model.predict(X)          # classifiers: the original class labels; regressors: the mean response
    model.predict_proba(X)    # classifiers: (N, n_classes) probabilities, as scikit-learn's
    model.score(X, y)         # accuracy or R², as scikit-learn's estimators score
    model.mean(X)             # (N, n_out) mean response: values, probabilities or rates
    model.scores(X, y)        # {"loss": ..., "accuracy" | "r2" | "deviance" and "null_deviance"}

The file is a checkpoint.save file (atomic, checksummed, no pickle) with arrays `params`,
`scaler/mean`, `scaler/scale` and meta {"kind": "model", "network": net.spec(), "classes": [...],
...}; class labels live in the meta JSON because they may be strings. Inputs go through exactly the
trainer's path: cast to the network dtype, standardize, forward, so predictions equal the trainer's.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import checkpoint, families, network
from .checkpoint import CheckpointError
from .data import DataError, Standardizer
from .network import Network
from .recurrent import Recurrent

KIND = "model"
FILE = "model.npz"  # a run directory's model (rundir.MODEL): where a run directory's path leads
BLOCK = 65536  # rows per forward pass: bounded memory for memory-mapped inputs


@dataclass
class Model:
    """A network with the standardization and class labels it was trained with."""

    net: Network
    scaler: Standardizer | None = None
    classes: np.ndarray | None = None  # multinomial: label of each output, sorted; bernoulli
                                       # trained on two labels: the labels of 0 and 1
    meta: dict = field(default_factory=dict)

    @property
    def is_classifier(self) -> bool:
        return self.net.is_classifier

    @property
    def family(self) -> families.Family:
        return families.FAMILIES[self.net.family]

    @property
    def recurrent(self) -> bool:
        """Whether the model is a Recurrent: X (N, T, d) sequences, optional `lengths` (N,)."""
        return isinstance(self.net, Recurrent)

    def inputs(self, X) -> np.ndarray:
        """Rows (or sequences) as the network sees them in training: network dtype, then
        standardized (a step's features, for sequences)."""
        X = np.asarray(X, dtype=self.net.dtype)  # the trainer casts before it standardizes
        d = self.net.sizes[0]
        ndim, shape = (3, f"(N, T, {d}): sequences of steps of") if self.recurrent else (
            2, f"(N, {d}):")
        if X.ndim != ndim or X.shape[-1] != d:
            raise DataError(f"X has shape {X.shape}; the model takes {shape} {d} features "
                            f"({_names(self.meta.get('features'))})")
        return X if self.scaler is None else self.scaler.transform(X)

    def mean(self, X, lengths=None) -> np.ndarray:
        """Mean response (N, n_out): values, probabilities or rates; a recurrent model with
        targets "every": (N, T, n_out), 0 at the steps that do not exist."""
        return self._blocks(X, self.net.predict, lengths)

    def predict(self, X, lengths=None) -> np.ndarray:
        """Classifiers: the class labels (N,), or (N, K) 0/1 for several Bernoulli outputs;
        regressors: the mean response, (N,) for one output (per step: (N, T) and (N, T, K))."""
        if self.is_classifier:
            return self.predict_labels(X, lengths)
        mean = self.mean(X, lengths)
        return mean[..., 0] if mean.shape[-1] == 1 else mean

    def predict_proba(self, X, lengths=None) -> np.ndarray:
        """Classifiers: (N, n_classes) probabilities; one Bernoulli output gives [1 - p, p]."""
        if not self.is_classifier:
            raise ValueError(f"predict_proba: a {self.net.family} model predicts values, not "
                             f"classes; use predict")
        p = self.mean(X, lengths)
        return (np.concatenate([1 - p, p], axis=-1) if p.shape[-1] == 1 and not self.family.labels
                else p)

    def score(self, X, y, sample_weight=None, lengths=None) -> float:
        """Accuracy (classifiers; every output right, for several Bernoulli outputs) or R²
        averaged over the outputs (regressors), weighted by `sample_weight`: scikit-learn's.
        Sequences: over their targets (every step that exists, for targets "every")."""
        if self.recurrent:
            return self._sequence_score(X, y, lengths)
        w = None if sample_weight is None else np.asarray(sample_weight, np.float64)
        if self.is_classifier:
            y = np.asarray(y)
            right = self.predict(X) == (y[:, 0] if y.ndim == 2 and y.shape[1] == 1 and
                                        self.net.sizes[-1] == 1 else y)
            right = right.reshape(len(right), -1).all(axis=1)
            return float(np.average(right, weights=w))
        Y = self.net.check_targets(y).astype(np.float64)
        return families.r2(Y, self.mean(X).astype(np.float64), w)

    def logits(self, X, lengths=None) -> np.ndarray:
        """Output pre-activations (N, n_out) (per step: (N, T, n_out))."""
        return self._blocks(X, self.net.logits, lengths)

    def predict_labels(self, X, lengths=None) -> np.ndarray:
        """Classifiers: original class labels (N,) for multinomial, 0/1 (N,) or (N, K) for bernoulli
        (one Bernoulli output with two `classes`: those labels); per step (N, T) or (N, T, K)."""
        if not self.is_classifier:
            raise ValueError(f"predict_labels: a {self.net.family} model predicts values, not "
                             f"labels; use predict")
        z = self.logits(X, lengths)
        codes = self.family.decide(z.reshape(-1, z.shape[-1]))  # decide takes (rows, n_out)
        codes = codes.reshape(*z.shape[:-1], *codes.shape[1:])
        return codes if self.classes is None else self.classes[codes]

    def targets(self, y, lengths=None, steps=None):
        """y encoded as the network expects: labels -> codes of `classes` (multinomial, or a
        bernoulli model trained on two labels: 0/1). A recurrent model's: its Targets (encoded
        targets with the lengths), of sequences of `steps`."""
        if self.recurrent:
            return self._sequence_targets(y, lengths, steps)
        if self.classes is None:
            return self.net.check_targets(y)
        codes = self._codes(y)
        return codes if self.family.labels else self.net.check_targets(codes.astype(np.float64))

    def _codes(self, y) -> np.ndarray:
        """Class labels (N,) or (N, 1) -> their outputs' indices (N,) int64."""
        y = np.asarray(y)
        if y.ndim == 2 and y.shape[1] == 1:
            y = y[:, 0]
        if y.ndim != 1:
            raise DataError(f"class labels must be one column, got shape {y.shape}")
        values, inverse = np.unique(y, return_inverse=True)
        return np.array([self._code(v, y) for v in values], np.int64)[inverse.reshape(-1)]

    def _code(self, label, y) -> int:
        """The output of `label`: numbers match numbers by value (1 == 1.0), text matches text."""
        numeric = np.asarray(label).dtype.kind in "biuf" and self.classes.dtype.kind in "biuf"
        found = (np.flatnonzero(self.classes == label) if numeric
                 else np.flatnonzero(self.classes.astype(str) == str(label)))
        if len(found) == 0:
            row = int(np.flatnonzero(y == label)[0]) if label == label else int(
                np.flatnonzero(y != y)[0])  # NaN equals nothing, itself included
            raise DataError(f"label {label.item()!r} at row {row} is not one of the model's "
                            f"classes {self.classes.tolist()}")
        return int(found[0])

    def scores(self, X, y, lengths=None) -> dict:
        """Metrics on (X, y): mean loss (NLL, no penalty) and accuracy, r2 or Poisson deviances;
        of sequences, over their targets (the mean over Σ lengths of them for targets "every")."""
        if self.recurrent:
            return self._sequence_scores(X, y, lengths)
        Y = self.targets(y)
        n = len(Y)
        if len(X) != n:
            raise DataError(f"X has {len(X)} rows but y has {n}")
        if n == 0:
            raise DataError("cannot score an empty data set")
        loss, correct = 0.0, 0
        for lo in range(0, n, BLOCK):
            block_loss, block_correct = self.net.eval_sums(self.net.check_inputs(
                self.inputs(X[lo:lo + BLOCK])), Y[lo:lo + BLOCK])
            loss, correct = loss + block_loss, correct + (block_correct or 0)
        out = {"loss": loss / n}
        if self.is_classifier:
            out["accuracy"] = correct / Y.size  # bernoulli (N, K): every output counts
        else:
            out.update(self.family.scores(Y, self.logits(X)))
        return out

    def _blocks(self, X, forward, lengths=None) -> np.ndarray:
        if not self.recurrent:
            if len(X) == 0:
                return np.empty((0, self.net.sizes[-1]), self.net.dtype)
            return np.concatenate([forward(self.inputs(X[lo:lo + BLOCK]))
                                   for lo in range(0, len(X), BLOCK)])
        if len(X) == 0:
            return forward(self.inputs(X), lengths)
        block = self._block(X)
        return np.concatenate([forward(self.inputs(X[lo:lo + block]),
                                       None if lengths is None else np.asarray(lengths)[lo:lo + block])
                               for lo in range(0, len(X), block)])

    # ---- sequences (a Recurrent) --------------------------------------------------------------
    @staticmethod
    def _block(X) -> int:
        """Sequences per forward pass: about BLOCK steps."""
        return max(1, BLOCK // max(1, X.shape[1]))

    def _sequence_targets(self, y, lengths, steps):
        """Targets of sequences; class labels mapped to outputs where steps exist (the padded
        steps' labels, whatever they are, are not looked at)."""
        net = self.net
        if self.classes is not None:
            y = np.asarray(y)
            if net.targets == "last":
                y = self._codes(y)
            else:
                y = y[:, :, 0] if y.ndim == 3 and y.shape[2] == 1 else y
                if y.ndim != 2:
                    raise DataError(f"class labels per step must be (N, T), got shape {y.shape}")
                there = np.arange(y.shape[1]) < (np.full(len(y), y.shape[1]) if lengths is None
                                                 else np.asarray(lengths))[:, None]
                codes = np.zeros(y.shape, np.int64)
                codes[there] = self._codes(y[there])
                y = codes
            y = y if self.family.labels else y.astype(np.float64)
        return net.check_targets(y, lengths=lengths, steps=steps)

    def _existing(self, a, lengths, steps):
        """The values of `a` (N, ...) at the targets that exist: a itself for targets "last",
        a[t < length] (M, ...) for "every"."""
        if self.net.targets == "last":
            return a
        return a[np.arange(steps) < np.asarray(lengths)[:, None]]

    def _sequence_scores(self, X, y, lengths) -> dict:
        Y = self.targets(y, lengths, steps=X.shape[1])
        n = len(Y)
        if len(X) != n:
            raise DataError(f"X has {len(X)} sequences but y has {n}")
        if n == 0:
            raise DataError("cannot score an empty data set")
        loss, correct, block = 0.0, 0, self._block(X)
        for lo in range(0, n, block):
            Xb, _ = self.net.check_inputs(self.inputs(X[lo:lo + block]), Y.lengths[lo:lo + block])
            block_loss, block_correct = self.net.eval_sums(Xb, Y[lo:lo + block])
            loss, correct = loss + block_loss, correct + (block_correct or 0)
        out = {"loss": loss / Y.total}
        if self.is_classifier:
            per_target = Y.y[0].size if self.net.targets == "last" else Y.y[0, 0].size
            out["accuracy"] = correct / (Y.total * per_target)  # bernoulli: every output counts
        else:
            z = self.logits(X, Y.lengths)
            out.update(self.family.scores(
                *(self._existing(a, Y.lengths, X.shape[1]).reshape(-1, z.shape[-1])
                  for a in (Y.y, z))))
        return out

    def _sequence_score(self, X, y, lengths) -> float:
        Y = self.targets(y, lengths, steps=X.shape[1])
        if self.is_classifier:
            return self._sequence_scores(X, y, lengths)["accuracy"]
        mean = self.mean(X, Y.lengths)
        return families.r2(*(self._existing(a, Y.lengths, X.shape[1]).reshape(-1, mean.shape[-1])
                             .astype(np.float64) for a in (Y.y, mean)))


def _names(names, shown=6) -> str:
    """'a, b, c, ... (64 in all)' for messages; 'unnamed' when the model has no names."""
    if not names:
        return "unnamed"
    more = f", ... ({len(names)} in all)" if len(names) > shown else ""
    return ", ".join(map(str, names[:shown])) + more


def as_model(obj) -> Model:
    """A Model of `obj`: a Model, a Network, or anything with `to_model()` (a Trainer, a fitted
    MLPClassifier or MLPRegressor)."""
    if isinstance(obj, Model):
        return obj
    if isinstance(obj, (Network, Recurrent)):
        return Model(obj)
    if hasattr(obj, "to_model"):
        return obj.to_model()
    raise TypeError(f"save_model: expected a Model, Network, Trainer or distnn estimator, got "
                    f"{type(obj).__name__}")


def save_model(obj, path, *, scaler=None, classes=None, meta=None) -> None:
    """Write `obj` (see as_model) to `path` as the model file `distnn train` writes: atomic,
    checksummed, no pickle; `distnn predict / evaluate / info` read it, `load_model` loads it.
    `scaler`, `classes` and `meta` (JSON-able facts: target, features, config, ...) add to or
    replace the object's own."""
    model = as_model(obj)
    scaler = model.scaler if scaler is None else scaler
    classes = model.classes if classes is None else classes
    arrays = {"params": model.net.params}
    if scaler is not None:
        arrays |= {f"scaler/{k}": v for k, v in scaler.to_arrays().items()}
    info = model.meta | dict(meta or {}) | {
        "kind": KIND, "network": model.net.spec(),
        "classes": None if classes is None else np.asarray(classes).tolist()}
    checkpoint.save(path, arrays, info, what=KIND)


def model_path(path) -> Path:
    """`path`, or RUN_DIR/model.npz when `path` is a directory: a run directory stands for its
    model."""
    path = Path(path)
    if not path.is_dir():
        return path
    if not (path / FILE).exists():
        raise CheckpointError(f"{path}: a directory without a model file ({FILE}); a run "
                              f"directory has one once its run has finished")
    return path / FILE


def load_model(path) -> Model:
    """The model saved at `path` (or in the run directory `path`); a training checkpoint or a
    foreign file is a CheckpointError."""
    path = model_path(path)
    arrays, meta = checkpoint.load(path, what=KIND)
    if meta.get("kind") != KIND:
        what = "a training checkpoint" if meta.get("kind") == "training" else "not a model file"
        raise CheckpointError(f"{path}: {what}; expected a model written by `distnn train` "
                              f"(RUN_DIR/model.npz)")
    _check_meta(path, meta)
    params = arrays.get("params")
    try:
        n_params = spec_n_params(meta["network"])
    except ValueError as e:
        raise CheckpointError(f"{path}: bad network description in the model: {e}") from None
    if params is None or params.shape != (n_params,):  # checked before the network is allocated
        got = "none" if params is None else f"shape {params.shape}"
        raise CheckpointError(f"{path}: params are {got}, the network described needs "
                              f"({n_params},)")
    try:
        net = build(meta["network"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: bad network description in the model: {e}") from None
    if params.dtype != net.dtype:
        raise CheckpointError(f"{path}: params are {params.dtype}, the network is {net.dtype}")
    net.params[...] = params
    return Model(net, _scaler(path, arrays, net.sizes[0]), _classes(path, meta, net), meta)


KINDS = ("network", "recurrent")  # a spec's "kind"; a spec without one is a Network's


def build(spec):
    """The model a `spec()` describes, freshly initialized: a Network, or a Recurrent for kind
    "recurrent". The one place a model is rebuilt from a file (load_model, Trainer.resume)."""
    spec = dict(spec)
    kind = spec.pop("kind", "network")
    if kind not in KINDS:
        raise ValueError(f"unknown model kind {kind!r}; expected one of {list(KINDS)}")
    if kind == "recurrent":
        return Recurrent(**spec)
    return Network(**spec)


def spec_n_params(spec) -> int:
    """Length of the parameter vector of the model `spec` describes, without building it;
    ValueError for sizes (or a state) that are not positive integers."""
    sizes = spec.get("sizes") if isinstance(spec, dict) else None
    if not _valid_sizes(sizes):
        raise ValueError("sizes must be a list of at least 2 positive integers")
    if spec.get("kind", "network") == "recurrent":
        state = spec.get("state")
        if not _valid_sizes([1, state]):
            raise ValueError("state must be a positive integer")
        sizes = [sizes[0] + state, *sizes[1:-1], sizes[-1] + state]
    return network.n_params(sizes)


# What the commands read from a model's meta, and the type each must have (a crafted file may lie).
META_TYPES = {"network": dict, "features": list, "target": (str, type(None)), "metrics": dict,
              "source": str, "config": dict}
SCORED = ("val", "test")  # the tables of scores in meta["metrics"], {name: number}


def _check_meta(path, meta) -> None:
    for key, kind in META_TYPES.items():
        if key in meta and not isinstance(meta[key], kind):
            raise CheckpointError(f"{path}: model field '{key}' is {type(meta[key]).__name__}")
    if "network" not in meta:
        raise CheckpointError(f"{path}: the model has no network description")
    if not all(isinstance(f, str) for f in meta.get("features", [])):
        raise CheckpointError(f"{path}: model field 'features' must list names")
    for split in SCORED:
        scores = meta.get("metrics", {}).get(split, {})
        if not (isinstance(scores, dict) and all(_number(v) for v in scores.values())):
            raise CheckpointError(f"{path}: model field 'metrics' has a '{split}' that is not a "
                                  f"table of numbers")


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _valid_sizes(sizes) -> bool:
    """Whether a model file's sizes are a list of at least 2 positive integers."""
    return isinstance(sizes, list) and len(sizes) >= 2 and all(
        isinstance(k, int) and not isinstance(k, bool) and k >= 1 for k in sizes)


def _scaler(path, arrays, d) -> Standardizer | None:
    if "scaler/mean" not in arrays:
        return None
    if any(arrays.get(f"scaler/{k}", np.empty(0)).dtype.kind != "f" for k in ("mean", "scale")):
        raise CheckpointError(f"{path}: standardization arrays must be real floating point")
    scaler = Standardizer.from_arrays({k: arrays.get(f"scaler/{k}") for k in ("mean", "scale")})
    if scaler.mean.shape != (d,) or scaler.scale.shape != (d,):
        raise CheckpointError(f"{path}: standardization arrays do not match the {d} inputs")
    return scaler


def _classes(path, meta, net) -> np.ndarray | None:
    classes = meta.get("classes")
    if not families.FAMILIES[net.family].labels:
        return None if classes is None else np.asarray(classes)
    if not isinstance(classes, list) or len(classes) != net.sizes[-1]:
        raise CheckpointError(f"{path}: a {net.family} model needs {net.sizes[-1]} class labels, "
                              f"got {classes!r}")
    return np.asarray(classes)
