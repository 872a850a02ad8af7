"""scikit-learn estimators on distnn's Trainer: `MLPClassifier` and `MLPRegressor`.

    from distnn import MLPClassifier
    clf = MLPClassifier(hidden_layer_sizes=(64,), random_state=0).fit(X, y)
    clf.predict(X); clf.score(X, y); distnn.save_model(clf, "model.npz")

The same script runs under `mpiexec -n P python script.py`: every rank passes the whole data (or
a memory map), `fit` trains over MPI.COMM_WORLD (or `comm=`), each rank computing only its shard
of every batch, and every rank ends with the same fitted estimator, to the bit. A plain process
is a 1-rank run. Predictions run on each rank on what it is given. mpi4py (which starts MPI) is
imported by the first `fit`, not by importing this module. Only rank 0 prints (verbose) and
warns (ConvergenceWarning).

scikit-learn's names mean what they mean there, except that `alpha` is not offered (distnn's
`l2` is a penalty on the mean loss; scikit-learn's alpha is divided by each batch's size) and
`learning_rate`/`power_t`/`max_fun` and the lbfgs solver are not offered.

`privacy=distnn.DP(...)` trains by DP-SGD (privacy.py; batch_size is then the expected batch of
Poisson sampling): the fitted parameters are (epsilon_, privacy.delta)-DP for the training rows.
Not private: the class labels, the validation rows that early_stopping holds out and every score
or loss; so a private fit does not stop on its training loss (it runs max_iter epochs), the
regressor's output biases start at 0 rather than at the targets' mean, and sample weights are
refused. Warm starts and partial_fit continue the steps and the accounting.
"""
import numbers
import warnings

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin, RegressorMixin, is_classifier
from sklearn.exceptions import ConvergenceWarning
from sklearn.utils.multiclass import check_classification_targets, type_of_target, unique_labels
from sklearn.utils.validation import (_check_sample_weight, check_is_fitted, check_random_state,
                                      column_or_1d, validate_data)

from . import data, exactsum, families, optim
from .model import Model
from .network import Network

__all__ = ["MLPClassifier", "MLPRegressor"]

# scikit-learn's activation names, and distnn's own: the network's table
ACTIVATIONS = {"logistic": "sigmoid"}
OUT_ACTIVATION = {"multinomial": "softmax", "bernoulli": "logistic", "gaussian": "identity",
                  "poisson": "exp"}


class _MLP(BaseEstimator):
    """What both estimators share: parameters, the fit loop around Trainer, pickling."""

    _families = ()

    def __init__(self, hidden_layer_sizes=(100,), activation="relu", *, solver="adam",
                 batch_size="auto", learning_rate_init=0.001, max_iter=200, shuffle=True,
                 random_state=None, tol=1e-4, verbose=False, warm_start=False, momentum=0.9,
                 nesterovs_momentum=True, early_stopping=False, validation_fraction=0.1,
                 beta_1=0.9, beta_2=0.999, epsilon=1e-8, n_iter_no_change=10, l1=0.0, l2=0.0,
                 family="auto", dtype="float64", deterministic=False, chunk_size=64,
                 clip_norm=0.0, privacy=None, comm=None):
        self.hidden_layer_sizes = hidden_layer_sizes
        self.activation = activation
        self.solver = solver
        self.batch_size = batch_size
        self.learning_rate_init = learning_rate_init
        self.max_iter = max_iter
        self.shuffle = shuffle
        self.random_state = random_state
        self.tol = tol
        self.verbose = verbose
        self.warm_start = warm_start
        self.momentum = momentum
        self.nesterovs_momentum = nesterovs_momentum
        self.early_stopping = early_stopping
        self.validation_fraction = validation_fraction
        self.beta_1 = beta_1
        self.beta_2 = beta_2
        self.epsilon = epsilon
        self.n_iter_no_change = n_iter_no_change
        self.l1 = l1
        self.l2 = l2
        self.family = family
        self.dtype = dtype
        self.deterministic = deterministic
        self.chunk_size = chunk_size
        self.clip_norm = clip_norm
        self.privacy = privacy  # a distnn.DP (or a dict of its fields): DP-SGD, see privacy.py
        self.comm = comm

    # ---- the public surface ------------------------------------------------------------------
    def fit(self, X, y, sample_weight=None):
        """Train for up to max_iter epochs (from the current weights with warm_start)."""
        return self._fit(X, y, sample_weight, incremental=False)

    @property
    def coefs_(self):
        """Weights per layer as (n_in, n_out) views of the network's parameters."""
        check_is_fitted(self)
        return [w.T for w in self._net.weights]

    @property
    def intercepts_(self):
        """Biases per layer, (n_out,) views of the network's parameters."""
        check_is_fitted(self)
        return list(self._net.biases)

    def to_model(self):
        """The fitted network as a distnn Model, what `distnn.save_model` writes (the file
        `distnn train` writes, so `distnn predict / evaluate / info` read it)."""
        check_is_fitted(self)
        meta = {"estimator": type(self).__name__, "target": None}
        if hasattr(self, "feature_names_in_"):
            meta["features"] = [str(f) for f in self.feature_names_in_]
        return Model(self._net, None, getattr(self, "classes_", None), meta)

    def __sklearn_is_fitted__(self):
        return hasattr(self, "_net")

    def __getstate__(self):
        # A Network's layer views would unpickle as copies detached from its parameters: keep
        # its description and parameters instead. A communicator does not travel.
        state = dict(super().__getstate__())  # a copy: the live estimator keeps its network
        net = state.pop("_net", None)
        if net is not None:
            state["_net_state"] = (net.spec(), net.params.copy())
        state["comm"] = None
        return state

    def __setstate__(self, state):
        net_state = state.pop("_net_state", None)
        super().__setstate__(state)
        if net_state is not None:
            self._net = Network(**net_state[0])
            self._net.params[...] = net_state[1]

    # ---- fitting -----------------------------------------------------------------------------
    def _fit(self, X, y, sample_weight, incremental, classes=None):
        self._check_params(incremental)
        first = not hasattr(self, "_net") or not (self.warm_start or incremental)
        X, y = validate_data(self, X, y, reset=first, multi_output=True,
                             dtype=[np.float64, np.float32], y_numeric=self._y_numeric)
        if sample_weight is not None:
            sample_weight = _check_sample_weight(sample_weight, X, dtype=np.float64,
                                                 ensure_non_negative=True)
        Y, n_out = self._targets(y, first, classes)
        from .comm import connect

        comm = connect(self.comm, timeout=600.0)
        try:
            if first:
                self._run_seed = self._agree_seed(comm)
                self._start(X.shape[1], n_out)
                if self.privacy is None:  # the targets' mean is not private: DP starts at 0
                    self._start_bias(Y, sample_weight)
            if first or not incremental:
                self._reset_progress(incremental)
            self._train(comm, X, Y, sample_weight, incremental)
        finally:
            if comm is not self.comm:
                comm.close()
        return self

    def _check_params(self, incremental):
        sizes = self.hidden_layer_sizes
        sizes = list(sizes) if hasattr(sizes, "__iter__") else [sizes]
        if not all(isinstance(s, numbers.Integral) and s > 0 for s in sizes):
            raise ValueError(f"hidden_layer_sizes must be positive integers, got "
                             f"{self.hidden_layer_sizes!r}")
        if self.solver not in ("sgd", "adam"):
            raise ValueError(f"solver must be 'sgd' or 'adam', got {self.solver!r}")
        if self.family not in self._families:
            raise ValueError(f"family must be one of {list(self._families)}, got {self.family!r}")
        if not (isinstance(self.max_iter, numbers.Integral) and self.max_iter >= 1):
            raise ValueError(f"max_iter must be an integer >= 1, got {self.max_iter!r}")
        if not (self.batch_size == "auto" or isinstance(self.batch_size, numbers.Integral)
                and self.batch_size >= 1):
            raise ValueError(f"batch_size must be 'auto' or an integer >= 1, got "
                             f"{self.batch_size!r}")
        if self.early_stopping and incremental:
            raise ValueError("partial_fit does not support early_stopping=True")
        if self.early_stopping and not 0 < self.validation_fraction < 1:
            raise ValueError(f"validation_fraction must be in (0, 1), got "
                             f"{self.validation_fraction!r}")
        if not self.n_iter_no_change >= 1:
            raise ValueError(f"n_iter_no_change must be >= 1, got {self.n_iter_no_change!r}")
        self._sizes = sizes

    def _agree_seed(self, comm):
        """The run's seed, the same on every rank: an int random_state is the seed (as
        train.seed in a config); otherwise rank 0 draws one."""
        if isinstance(self.random_state, numbers.Integral):
            return int(self.random_state)
        seed = np.array([check_random_state(self.random_state).randint(2**31 - 1)], np.int64)
        comm.bcast(seed, what="random_state")
        return int(seed[0])

    def _start(self, n_in, n_out):
        """A fresh network for the first fit."""
        activation = ACTIVATIONS.get(self.activation, self.activation)
        self._net = Network([n_in, *self._sizes, n_out], activation=activation,
                            family=self._family_, l1=self.l1, l2=self.l2,
                            dtype=np.dtype(self.dtype).name, seed=self._run_seed)
        self.n_outputs_ = n_out
        self.n_layers_ = len(self._sizes) + 2
        self.out_activation_ = OUT_ACTIVATION[self._family_]
        self.loss_curve_ = []
        self.t_ = 0
        self._dp, self._dp_steps, self._dp_spent = None, 0, []  # see _train
        self._optimizer = None

    def _start_bias(self, Y, w):
        """Where the output layer's biases start (the classifier leaves them at 0)."""

    def _reset_progress(self, incremental):
        self.n_iter_ = 0
        self._no_improvement_count = 0
        if self.early_stopping:
            self.validation_scores_, self.best_validation_score_ = [], -np.inf
            self.best_loss_ = None
        else:
            self.validation_scores_ = self.best_validation_score_ = None
            self.best_loss_ = np.inf
        if not incremental:
            self._optimizer = None  # fit starts a fresh optimizer, as scikit-learn's

    def _make_optimizer(self):
        if self.solver == "sgd":
            return optim.SGD(lr=self.learning_rate_init, momentum=self.momentum,
                             nesterov=self.nesterovs_momentum and self.momentum > 0)
        return optim.Adam(lr=self.learning_rate_init, betas=(self.beta_1, self.beta_2),
                          eps=self.epsilon)

    def _train(self, comm, X, Y, w, incremental):
        """max_iter epochs (one for partial_fit) on every rank, stopping as scikit-learn does."""
        from .trainer import Trainer

        net = self._net
        net.l1, net.l2 = float(self.l1), float(self.l2)  # set_params between warm starts
        val = None
        if self.early_stopping:
            train, held = data.train_val_split(len(X), self.validation_fraction, self._run_seed)
            if len(held) < 2:
                raise ValueError("The validation set is too small. Increase "
                                 "'validation_fraction' or the size of your dataset.")
            val = (X[held], Y[held], None if w is None else w[held])
            self._best_params = net.params.copy()  # kept if no epoch scores better than -inf
            X, Y, w = X[train], Y[train], None if w is None else w[train]
        n = len(X)
        batch = min(200, n) if self.batch_size == "auto" else min(self.batch_size, n)
        if self._optimizer is None:
            self._optimizer = self._make_optimizer()
        epochs = 1 if incremental else self.max_iter
        trainer = Trainer(net, self._optimizer, batch_size=batch, epochs=self.n_iter_ + epochs,
                          seed=self._run_seed, comm=comm, clip_norm=self.clip_norm,
                          deterministic=self.deterministic, chunk_size=self.chunk_size,
                          shuffle=self.shuffle, privacy=self._dp or self.privacy,
                          callback=lambda r: self._end_epoch(r, n, val, comm))
        trainer.epoch = self.n_iter_  # each partial_fit its own epoch's order
        # a private model's later fits (warm start, partial_fit) continue its steps (fresh
        # batches and noise), its σ and its accounting
        if self.privacy is not None:
            trainer.step, trainer.privacy_spent = self._dp_steps, self._dp_spent
        with trainer, np.errstate(all="ignore"):
            trainer.fit(X, Y, sample_weight=w, scan=False)  # validate_data checked X
        self._dp_steps, self._dp = trainer.step, trainer.privacy
        if self._dp is not None:
            self.epsilon_ = trainer.privacy_record()["epsilon"]  # spent at privacy.delta
        if self.early_stopping:
            net.params[...] = self._best_params
        stopped = self._no_improvement_count > self.n_iter_no_change
        if not incremental and not stopped and comm.is_root and self.privacy is None:
            warnings.warn(f"Stochastic Optimizer: Maximum iterations ({self.max_iter}) reached "
                          f"and the optimization hasn't converged yet.", ConvergenceWarning,
                          stacklevel=4)

    def _end_epoch(self, record, n, val, comm):
        """The trainer's callback, on every rank with the same record: whether to stop."""
        self.n_iter_ += 1
        self.t_ += n
        self.loss_ = record["loss"]
        self.loss_curve_.append(self.loss_)
        if self.verbose and comm.is_root:
            print(f"Iteration {self.n_iter_}, loss = {self.loss_:.8f}", flush=True)
        if val is not None:
            score = self._validation_score(comm, *val)
            self.validation_scores_.append(score)
            if self.verbose and comm.is_root:
                print(f"Validation score: {score:f}", flush=True)
            worse = score < self.best_validation_score_ + self.tol
            if score > self.best_validation_score_:
                self.best_validation_score_ = score
                self._best_params = self._net.params.copy()
        elif self.privacy is not None:  # the training loss is not private: no stop on it
            worse = False
        else:
            worse = self.loss_ > self.best_loss_ - self.tol
            self.best_loss_ = min(self.best_loss_, self.loss_)
        self._no_improvement_count = self._no_improvement_count + 1 if worse else 0
        stop = self._no_improvement_count > self.n_iter_no_change
        if stop and self.verbose and comm.is_root:
            what = "Validation score" if val is not None else "Training loss"
            print(f"{what} did not improve more than tol={self.tol:f} for "
                  f"{self.n_iter_no_change} consecutive epochs. Stopping.", flush=True)
        return stop

    def _validation_score(self, comm, X, Y, w):
        """score() on the held-out rows, each rank scoring its shard; their sums added exactly
        in deterministic mode (the same bits for any rank count)."""
        c = self.chunk_size
        n_chunks = -(-len(X) // c)
        first, last = data.chunk_range(n_chunks, comm.size, comm.rank)
        sums = np.zeros((last - first, 2 if is_classifier(self) else Y.shape[1]))
        for i, j in enumerate(range(first, last)):  # a rank may hold no chunk: zeros
            part = slice(j * c, (j + 1) * c)
            sums[i] = self._score_sums(X[part], Y[part], None if w is None else w[part])
        if self.deterministic:
            try:
                total = comm.exact_sum(sums, n_chunks, what="validation score")
            except exactsum.NonFiniteError:
                return -np.inf
        else:
            total = sums.sum(axis=0)
            comm.allreduce(total, what="validation score")
        return self._score_of_sums(total, Y, w)

    # ---- predictions -------------------------------------------------------------------------
    def _mean(self, X):
        check_is_fitted(self)
        X = validate_data(self, X, reset=False, dtype=[np.float64, np.float32])
        return self._net.predict(X)

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.target_tags.multi_output = True
        tags.target_tags.single_output = True
        return tags


class MLPClassifier(ClassifierMixin, _MLP):
    """A dense network classifier trained data-parallel; scikit-learn's MLPClassifier's names.

    family: "auto" (one logistic output for two classes or a multilabel indicator matrix, a
    softmax over the classes otherwise: scikit-learn's choice), "multinomial" or "bernoulli"."""

    _families = ("auto", "multinomial", "bernoulli")
    _y_numeric = False

    def partial_fit(self, X, y, sample_weight=None, classes=None):
        """One epoch over X, y; the first call needs `classes`, every label there may be."""
        if not hasattr(self, "_net") and classes is None:
            raise ValueError("classes must be passed on the first call to partial_fit.")
        return self._fit(X, y, sample_weight, incremental=True, classes=classes)

    def predict(self, X):
        """Class labels (N,), or the (N, K) 0/1 indicator matrix of a multilabel fit."""
        p = self._mean(X)
        if self._multilabel:
            return (p > 0.5).astype(int)
        codes = (p[:, 0] > 0.5).astype(int) if p.shape[1] == 1 else p.argmax(axis=1)
        return self.classes_[codes]

    def predict_proba(self, X):
        """(N, n_classes) probabilities, columns in the order of classes_."""
        p = self._mean(X)
        return np.hstack([1 - p, p]) if p.shape[1] == 1 and not self._multilabel else p

    def predict_log_proba(self, X):
        """log of predict_proba."""
        with np.errstate(divide="ignore"):
            return np.log(self.predict_proba(X))

    def _targets(self, y, first, classes):
        """(Y for the network, n_out) and, on a first fit, classes_ and the family."""
        multilabel = y.ndim == 2 and y.shape[1] > 1
        if multilabel and type_of_target(y) != "multilabel-indicator":
            raise ValueError("a classifier takes class labels (N,) or a multilabel indicator "
                             f"matrix of 0/1, got y of shape {y.shape}")
        if not multilabel:
            y = column_or_1d(y, warn=True)
            check_classification_targets(y)
        if first:
            self._multilabel = multilabel
            self.classes_ = (np.arange(y.shape[1]) if multilabel else
                             unique_labels(y if classes is None else classes))
            if len(self.classes_) < 2:
                raise ValueError(f"{type(self).__name__} needs samples of at least 2 classes; "
                                 f"y has 1 class: {self.classes_.tolist()}")
            k = len(self.classes_)
            family = self.family
            if family == "auto":
                family = "bernoulli" if multilabel or k == 2 else "multinomial"
            if family == "bernoulli" and not multilabel and k > 2:
                raise ValueError(f"family='bernoulli' takes 2 classes or multilabel targets; "
                                 f"y has {k} classes")
            if family == "multinomial" and multilabel:
                raise ValueError("family='multinomial' takes one label per sample, not a "
                                 "multilabel indicator matrix")
            self._family_ = family
        elif multilabel != self._multilabel:
            raise ValueError("y has another form (labels or multilabel indicators) than in the "
                             "first fit")
        if self._multilabel:
            return y.astype(np.float64), y.shape[1]
        unseen = np.setdiff1d(unique_labels(y), self.classes_)
        if len(unseen):
            raise ValueError(f"y has labels {unseen.tolist()[:6]} that are not in classes "
                             f"{self.classes_.tolist()[:6]}")
        codes = np.searchsorted(self.classes_, y)
        if self._family_ == "bernoulli":
            return codes.astype(np.float64), 1
        return codes, len(self.classes_)

    def _score_sums(self, X, Y, w):
        p = self._net.predict(X)
        if self._multilabel:
            right = ((p > 0.5) == (Y > 0.5)).all(axis=1)
        elif p.shape[1] == 1:
            right = (p[:, 0] > 0.5) == (Y > 0.5)
        else:
            right = p.argmax(axis=1) == Y
        w = np.ones(len(X)) if w is None else w
        return [float(np.dot(w, right)), float(w.sum())]

    def _score_of_sums(self, total, Y, w):
        return float(total[0] / total[1])

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.classifier_tags.multi_label = tags.target_tags.multi_output = (
            self.family != "multinomial")  # multilabel targets take Bernoulli outputs
        return tags


class MLPRegressor(RegressorMixin, _MLP):
    """A dense network regressor trained data-parallel; scikit-learn's MLPRegressor's names.

    family: "gaussian" (identity output, squared error: scikit-learn's) or "poisson" (exp
    output, Poisson deviance; non-negative targets)."""

    _families = ("gaussian", "poisson")
    _y_numeric = True

    def __init__(self, hidden_layer_sizes=(100,), activation="relu", *, solver="adam",
                 batch_size="auto", learning_rate_init=0.001, max_iter=200, shuffle=True,
                 random_state=None, tol=1e-4, verbose=False, warm_start=False, momentum=0.9,
                 nesterovs_momentum=True, early_stopping=False, validation_fraction=0.1,
                 beta_1=0.9, beta_2=0.999, epsilon=1e-8, n_iter_no_change=10, l1=0.0, l2=0.0,
                 family="gaussian", dtype="float64", deterministic=False, chunk_size=64,
                 clip_norm=0.0, privacy=None, comm=None):
        super().__init__(
            hidden_layer_sizes, activation, solver=solver, batch_size=batch_size,
            learning_rate_init=learning_rate_init, max_iter=max_iter, shuffle=shuffle,
            random_state=random_state, tol=tol, verbose=verbose, warm_start=warm_start,
            momentum=momentum, nesterovs_momentum=nesterovs_momentum,
            early_stopping=early_stopping, validation_fraction=validation_fraction,
            beta_1=beta_1, beta_2=beta_2, epsilon=epsilon, n_iter_no_change=n_iter_no_change,
            l1=l1, l2=l2, family=family, dtype=dtype, deterministic=deterministic,
            chunk_size=chunk_size, clip_norm=clip_norm, privacy=privacy, comm=comm)

    def partial_fit(self, X, y, sample_weight=None):
        """One epoch over X, y."""
        return self._fit(X, y, sample_weight, incremental=True)

    def predict(self, X):
        """The mean response: (N,) for one output, else (N, n_outputs)."""
        p = self._mean(X)
        return p[:, 0] if self.n_outputs_ == 1 else p

    def _targets(self, y, first, classes):
        if y.ndim == 2 and y.shape[1] == 1:
            y = column_or_1d(y, warn=True)
        if first:
            self._family_ = self.family
        n_out = 1 if y.ndim == 1 else y.shape[1]
        if not first and n_out != self.n_outputs_:
            raise ValueError(f"y has {n_out} outputs; the first fit had {self.n_outputs_}")
        if self.family == "poisson" and (y < 0).any():
            raise ValueError("family='poisson' needs non-negative targets y (counts or rates)")
        return y.astype(np.float64).reshape(len(y), n_out), n_out

    def _start_bias(self, Y, w):
        """The output biases start at the intercept-only model, the targets' (weighted) mean
        through the link, as a GLM fit starts: an exp output far from the targets' scale
        otherwise spends many epochs just reaching it (R² -0.1 after 200 Adam epochs on
        scikit-learn's check data shifted to 1..7.5, 0.5 or more with this start)."""
        mean = np.average(Y, axis=0, weights=w)
        if self._family_ == "poisson":
            mean = np.log(np.maximum(mean, np.finfo(np.float64).tiny))
        self._net.biases[-1][...] = mean

    def _score_sums(self, X, Y, w):
        mean = self._net.predict(X).astype(np.float64)
        w = np.ones(len(X)) if w is None else w
        return (w[:, None] * (Y - mean) ** 2).sum(axis=0)  # SS_res per output

    def _score_of_sums(self, ss_res, Y, w):
        """R² averaged over the outputs; SS_tot from the held-out targets every rank holds."""
        return families.r2_of(ss_res, Y, np.ones(len(Y)) if w is None else w)

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.target_tags.positive_only = self.family == "poisson"
        return tags
