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

    def inputs(self, X) -> np.ndarray:
        """Rows as the network sees them in training: network dtype, then standardized."""
        X = np.asarray(X, dtype=self.net.dtype)  # the trainer casts before it standardizes
        d = self.net.sizes[0]
        if X.ndim != 2 or X.shape[1] != d:
            raise DataError(f"X has shape {X.shape}; the model takes (N, {d}): {d} features "
                            f"({_names(self.meta.get('features'))})")
        return X if self.scaler is None else self.scaler.transform(X)

    def mean(self, X) -> np.ndarray:
        """Mean response (N, n_out): values, probabilities or rates."""
        return self._blocks(X, self.net.predict)

    def predict(self, X) -> np.ndarray:
        """Classifiers: the class labels (N,), or (N, K) 0/1 for several Bernoulli outputs;
        regressors: the mean response, (N,) for one output."""
        if self.is_classifier:
            return self.predict_labels(X)
        mean = self.mean(X)
        return mean[:, 0] if mean.shape[1] == 1 else mean

    def predict_proba(self, X) -> np.ndarray:
        """Classifiers: (N, n_classes) probabilities; one Bernoulli output gives [1 - p, p]."""
        if not self.is_classifier:
            raise ValueError(f"predict_proba: a {self.net.family} model predicts values, not "
                             f"classes; use predict")
        p = self.mean(X)
        return np.hstack([1 - p, p]) if p.shape[1] == 1 and not self.family.labels else p

    def score(self, X, y, sample_weight=None) -> float:
        """Accuracy (classifiers; every output right, for several Bernoulli outputs) or R²
        averaged over the outputs (regressors), weighted by `sample_weight`: scikit-learn's."""
        w = None if sample_weight is None else np.asarray(sample_weight, np.float64)
        if self.is_classifier:
            y = np.asarray(y)
            right = self.predict(X) == (y[:, 0] if y.ndim == 2 and y.shape[1] == 1 and
                                        self.net.sizes[-1] == 1 else y)
            right = right.reshape(len(right), -1).all(axis=1)
            return float(np.average(right, weights=w))
        Y = self.net.check_targets(y).astype(np.float64)
        return families.r2(Y, self.mean(X).astype(np.float64), w)

    def logits(self, X) -> np.ndarray:
        """Output pre-activations (N, n_out)."""
        return self._blocks(X, self.net.logits)

    def predict_labels(self, X) -> np.ndarray:
        """Classifiers: original class labels (N,) for multinomial, 0/1 (N,) or (N, K) for bernoulli
        (one Bernoulli output with two `classes`: those labels)."""
        if not self.is_classifier:
            raise ValueError(f"predict_labels: a {self.net.family} model predicts values, not "
                             f"labels; use predict")
        codes = self.family.decide(self.logits(X))
        return codes if self.classes is None else self.classes[codes]

    def targets(self, y) -> np.ndarray:
        """y encoded as the network expects: labels -> codes of `classes` (multinomial, or a
        bernoulli model trained on two labels: 0/1)."""
        if self.classes is None:
            return self.net.check_targets(y)
        y = np.asarray(y)
        if y.ndim == 2 and y.shape[1] == 1:
            y = y[:, 0]
        if y.ndim != 1:
            raise DataError(f"class labels must be one column, got shape {y.shape}")
        values, inverse = np.unique(y, return_inverse=True)
        codes = np.array([self._code(v, y) for v in values], np.int64)[inverse.reshape(-1)]
        return codes if self.family.labels else self.net.check_targets(codes.astype(np.float64))

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

    def scores(self, X, y) -> dict:
        """Metrics on (X, y): mean loss (NLL, no penalty) and accuracy, r2 or Poisson deviances."""
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

    def _blocks(self, X, forward) -> np.ndarray:
        if len(X) == 0:
            return np.empty((0, self.net.sizes[-1]), self.net.dtype)
        return np.concatenate([forward(self.inputs(X[lo:lo + BLOCK]))
                               for lo in range(0, len(X), BLOCK)])


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
