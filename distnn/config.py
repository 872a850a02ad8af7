"""Run configuration: one typed dataclass tree with commented defaults, read from TOML.

    cfg = load_config("examples/digits.toml", overrides=["model.l2=1e-4", "train.epochs=5"])

Every error is a ConfigError whose message starts with the key ("model.activation: expected one
of [...], got 'rleu'"), or with the file for a missing file or a TOML syntax error.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import tomllib
import typing
from dataclasses import dataclass, field

from . import activations, families, network, optim

# The names the network, families and optimizers accept: the keys of their tables.
ACTIVATIONS = activations.NAMES
FAMILIES = families.NAMES
DTYPES = tuple(network.DTYPES)
OPTIMIZERS = tuple(optim.OPTIMIZERS)
SCHEDULES = tuple(optim.SCHEDULES)
KINDS = ("dense", "recurrent")  # model.kind: a Network, or a Recurrent (the same net through time)
TARGETS = ("last", "every")     # recurrent: one target per sequence (at its last step), or per step
MAX_THREADS = 4096  # BLAS threads per rank (the BLAS libraries take a C int)
# Tables and lists one inside another, below the file's top level: a config needs two (a
# [section] holding a list). tomllib recurses once per level and runs out of stack some hundreds
# down; a bound far below that keeps the error ours, and the values messages quote short.
MAX_DEPTH = 4
INT_RANGE = (-2**63, 2**63 - 1)  # TOML's integers are 64-bit (tomllib takes any), like numpy's
# An allreduce bucket is one MPI call, whose element count is a C int (< 2**31): 4096 MiB of float32
# is 2**30 elements. Beyond a few MiB a bucket is no faster (comm/collectives.py).
MAX_BUCKET_MB = 4096
MAX_WATCHDOG_S = 7 * 86400  # a collective a week late is a hang; larger values overflow OS timers


class ConfigError(ValueError):
    """Bad configuration; the message names the key (or file) and what was expected."""


@dataclass
class ModelConfig:
    hidden: list[int] = field(default_factory=lambda: [128, 64])  # hidden sizes; in/out from data
    activation: str = "relu"        # one of ACTIVATIONS
    family: str = "multinomial"     # one of FAMILIES (sets the output link and loss)
    l1: float = 0.0                 # L1 penalty on weights
    l2: float = 0.0                 # L2 penalty on weights
    dtype: str = "float64"          # float32 | float64
    kind: str = "dense"             # dense | recurrent: z(n+1) = [y, r](n+1) = f([x, r](n))
    state: int = 0                  # recurrent: state units r (>= 1 there; 0 for dense)
    state_activation: str = "tanh"  # recurrent: one of ACTIVATIONS, on the next state
    targets: str = "last"           # recurrent: one of TARGETS


@dataclass
class DataConfig:
    source: str = ""                # required: file path, "sklearn:NAME" or "synthetic:KIND?..."
    target: str = ""                # csv target column / npz key / sibling .npy path
    features: list[str] = field(default_factory=list)  # optional column subset (csv)
    val_fraction: float = 0.2       # held out from the source for validation, 0 <= f < 1
    standardize: bool = True        # fit (x - mean) / std on the training split
    test_source: str = ""           # optional separate held-out set, same format as source
    steps: int = 0                  # recurrent: read each row of (N, d) as `steps` steps of
                                    # d/steps features, in order; 0 = as stored ((N, T, d) data)


@dataclass
class OptimConfig:
    name: str = "sgd"               # one of OPTIMIZERS
    lr: float = 0.1                 # peak learning rate
    momentum: float = 0.9           # sgd
    nesterov: bool = False          # sgd; needs momentum > 0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # adam / adamw
    eps: float = 1e-8               # adam / adamw
    weight_decay: float = 0.0       # adamw decoupled decay
    schedule: str = "constant"      # one of SCHEDULES
    step_size: int = 0              # "step": steps between decays (>= 1 there)
    gamma: float = 0.1              # "step": decay factor, 0 < gamma <= 1
    warmup_steps: int = 0           # linear warmup from lr/warmup_steps to lr; the schedule runs after it
    min_lr: float = 0.0             # floor of cosine / linear decay
    clip_norm: float = 0.0          # clip the global gradient norm; 0 = no clipping


@dataclass
class TrainConfig:
    batch_size: int = 256           # global batch, split across ranks
    epochs: int = 20
    seed: int = 0                   # split, init and per-epoch order all derive from it
    patience: int = 0               # early stopping on validation loss; 0 = off
    checkpoint_every: int = 0       # steps between checkpoints; 0 = end of each epoch only
    keep_checkpoints: int = 3       # newest checkpoints kept on disk
    deterministic: bool = False     # bit-identical results for any rank count
    chunk_size: int = 64            # deterministic mode: samples per chunk (its cost falls as it grows)
    watchdog: float = 600.0         # seconds a collective may take (<= a week), then abort; 0 = no limit
    bucket_mb: float = 4.0          # allreduce bucket size, MiB (<= MAX_BUCKET_MB)
    threads: int = 0                # BLAS threads per rank; 0 = cores / local ranks (deterministic: 1)
    check_every: int = 100          # steps between cross-rank parameter checksums; 0 = start only
    bptt: int = 0                   # recurrent: truncated BPTT, steps per window; 0 = whole sequence


@dataclass
class PrivacyConfig:
    """DP-SGD (privacy.py): on when noise_multiplier or target_epsilon is set. train.batch_size is
    then the expected batch size of Poisson sampling."""
    noise_multiplier: float = 0.0   # σ, noise std over max_grad_norm; 0 = calibrate from target_epsilon
    max_grad_norm: float = 1.0      # C: each sample's gradient is clipped to this L2 norm
    delta: float = 1e-5             # δ of (ε, δ); keep it well below 1 / training rows
    target_epsilon: float = 0.0     # ε to calibrate σ for over train.epochs, and a budget; 0 = none
    noise_seed: int = -1            # -1: a secret key per run; else reproducible, private while secret

    def dp(self):
        """The trainer's distnn.DP, or None when privacy is off."""
        if not (self.noise_multiplier or self.target_epsilon):
            return None
        from .privacy import DP

        return DP(self.noise_multiplier or None, self.max_grad_norm, self.delta,
                  self.target_epsilon or None, None if self.noise_seed < 0 else self.noise_seed)


@dataclass
class Config:
    out_dir: str = "runs/run"       # run directory; load_config defaults it to runs/<config stem>
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)


SECTIONS = {"model": ModelConfig, "data": DataConfig, "optim": OptimConfig, "train": TrainConfig,
            "privacy": PrivacyConfig}
TOP_LEVEL = ("out_dir",)


# --------------------------------------------------------------------------- value checks
# Each check returns None when the value is fine, else what was expected.

def _one_of(names):
    return lambda v: None if v in names else f"expected one of {list(names)}, got {v!r}"


def _at_least(lo):
    ok = lambda v: math.isfinite(v) and v >= lo  # noqa: E731
    return lambda v: None if ok(v) else f"expected a finite value >= {lo}, got {v!r}"


def _above(lo):
    ok = lambda v: math.isfinite(v) and v > lo  # noqa: E731
    return lambda v: None if ok(v) else f"expected a finite value > {lo}, got {v!r}"


def _between(lo, hi):
    ok = lambda v: math.isfinite(v) and lo <= v <= hi  # noqa: E731
    return lambda v: None if ok(v) else f"expected a value in [{lo}, {hi}], got {v!r}"


def _unit(v):
    return None if 0 <= v < 1 else f"expected 0 <= value < 1, got {v!r}"


def _zero_or(lo, hi):
    # privacy's σ and ε: 0 (unset) or a value in [lo, hi] (privacy.SIGMA, MAX_EPSILON)
    ok = lambda v: v == 0 or lo <= v <= hi  # noqa: E731
    return lambda v: None if ok(v) else f"expected 0 (unset) or a value in [{lo:g}, {hi:g}], got {v!r}"


def _open_unit(v):
    return None if 0 < v < 1 else f"expected a value in (0, 1), got {v!r}"


def _nonempty(v):
    return None if v.strip() else "expected a non-empty string"


def _sizes(v):
    return None if all(h >= 1 for h in v) else f"expected sizes >= 1, got {v!r}"


def _bucket_mb(v):
    # the bucket must hold at least one float64: 8 bytes are 7.6e-6 MiB
    ok = math.isfinite(v) and 1e-5 <= v <= MAX_BUCKET_MB
    return None if ok else (f"expected a value in [1e-05, {MAX_BUCKET_MB}] (MiB: one float64 at "
                            f"least, one MPI call's count at most), got {v!r}")


def _decay(v):
    # a factor above 1 grows the rate without bound (gamma ** k overflows a float)
    return None if 0 < v <= 1 else f"expected a decay factor in (0, 1], got {v!r}"


def _betas(v):
    ok = len(v) == 2 and all(0 <= b < 1 for b in v)
    return None if ok else f"expected two numbers in [0, 1), got {v!r}"


CHECKS = {
    "out_dir": _nonempty,
    "model.hidden": _sizes, "model.activation": _one_of(ACTIVATIONS),
    "model.family": _one_of(FAMILIES), "model.l1": _at_least(0), "model.l2": _at_least(0),
    "model.dtype": _one_of(DTYPES),
    "data.source": _nonempty, "data.val_fraction": _unit,
    "optim.name": _one_of(OPTIMIZERS), "optim.lr": _above(0), "optim.momentum": _unit,
    "optim.betas": _betas, "optim.eps": _above(0), "optim.weight_decay": _at_least(0),
    "optim.schedule": _one_of(SCHEDULES), "optim.step_size": _at_least(0),
    "optim.gamma": _decay, "optim.warmup_steps": _at_least(0), "optim.min_lr": _at_least(0),
    "optim.clip_norm": _at_least(0),
    "train.batch_size": _at_least(1), "train.epochs": _at_least(1), "train.seed": _at_least(0),
    "train.patience": _at_least(0), "train.checkpoint_every": _at_least(0),
    "train.keep_checkpoints": _at_least(1), "train.chunk_size": _between(1, 2**20),
    "train.watchdog": _between(0, MAX_WATCHDOG_S), "train.bucket_mb": _bucket_mb,
    "train.threads": _between(0, MAX_THREADS),
    "train.check_every": _at_least(0),
    "privacy.noise_multiplier": _zero_or(0.01, 1e6), "privacy.max_grad_norm": _above(0),
    "privacy.delta": _open_unit, "privacy.target_epsilon": _zero_or(1e-300, 100),
    "privacy.noise_seed": _at_least(-1),
    "model.kind": _one_of(KINDS), "model.state": _at_least(0),
    "model.state_activation": _one_of(ACTIVATIONS), "model.targets": _one_of(TARGETS),
    "data.steps": _at_least(0), "train.bptt": _at_least(0),
}


def _cross_checks(cfg: Config) -> None:
    """Rules that involve two keys; the message names the key to change."""
    o = cfg.optim
    if o.schedule == "step" and o.step_size < 1:
        raise ConfigError(f"optim.step_size: expected >= 1 with optim.schedule = 'step', "
                          f"got {o.step_size}")
    if o.nesterov and o.momentum == 0:
        raise ConfigError("optim.nesterov: needs optim.momentum > 0")
    if o.min_lr > o.lr:
        raise ConfigError(f"optim.min_lr: expected <= optim.lr ({o.lr}), got {o.min_lr}")
    if cfg.privacy.dp() is not None and o.clip_norm > 0:
        raise ConfigError("optim.clip_norm: expected 0 with [privacy] (DP-SGD clips each "
                          "sample's gradient to privacy.max_grad_norm instead)")
    _recurrent_checks(cfg)


# the keys only a recurrent model reads, and their dense values
RECURRENT_ONLY = {"model.state": 0, "model.state_activation": "tanh", "model.targets": "last",
                  "data.steps": 0, "train.bptt": 0}


def _recurrent_checks(cfg: Config) -> None:
    """model.kind = "recurrent" needs a state; a dense model refuses the recurrent-only keys (a
    set key that nothing reads would be a silent mistake)."""
    if cfg.model.kind == "recurrent":
        if cfg.model.state < 1:
            raise ConfigError(f"model.state: expected >= 1 with model.kind = 'recurrent', got "
                              f"{cfg.model.state}")
        return
    for key, dense in RECURRENT_ONLY.items():
        section, _, name = key.partition(".")
        value = getattr(getattr(cfg, section), name)
        if value != dense:
            raise ConfigError(f"{key}: only a recurrent model reads it (got {value!r}); set "
                              f"model.kind = \"recurrent\" or remove it")


# ---------------------------------------------------------------------------- type checks

def _typed(key: str, value, typ):
    """value as `typ` (int accepted for float, bool never for a number), else ConfigError."""
    if typing.get_origin(typ) is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (item,) = typing.get_args(typ)
        return [_typed(f"{key}[{i}]", v, item) for i, v in enumerate(value)]
    is_int = isinstance(value, int) and not isinstance(value, bool)
    if is_int and not INT_RANGE[0] <= value <= INT_RANGE[1]:
        raise ConfigError(f"{key}: expected a 64-bit integer (TOML's range), got one of "
                          f"{value.bit_length()} bits")
    if typ is float and is_int:
        return float(value)
    if isinstance(value, typ) and not (typ is int and isinstance(value, bool)):
        return value
    names = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}
    raise ConfigError(f"{key}: expected {names[typ]}, got {value!r}")


def _build(cls, d: dict, prefix: str):
    """An instance of dataclass `cls` from table `d`, every value type- and range-checked."""
    hints = typing.get_type_hints(cls)
    values = {}
    for name, value in d.items():
        key = f"{prefix}{name}"
        value = _typed(key, value, hints[name])
        problem = CHECKS.get(key, lambda v: None)(value)
        if problem:
            raise ConfigError(f"{key}: {problem}")
        values[name] = value
    return cls(**values)


def _check_keys(d: dict) -> None:
    """Unknown sections and keys are errors that suggest the closest valid name."""
    for name, value in d.items():
        if name in SECTIONS:
            if not isinstance(value, dict):
                raise ConfigError(f"{name}: expected a table [{name}], got {value!r}")
            for key in value:
                _require_known(f"{name}.{key}")
        elif isinstance(value, dict):
            close = difflib.get_close_matches(name, list(SECTIONS), n=1)
            hint = f"; did you mean [{close[0]}]?" if close else f" (sections: {list(SECTIONS)})"
            raise ConfigError(f"[{_shown(name)}]: unknown section{hint}")
        else:
            _require_known(name)


_TOO_DEEP = f"invalid TOML: nested too deeply (a config nests at most {MAX_DEPTH} levels)"


def _check_depth(d: dict) -> None:
    """ConfigError naming the key of a value nested more than MAX_DEPTH tables or lists deep."""
    path = _too_deep(d, [])
    if path:
        key = ".".join(path[:2]) if path[0] in SECTIONS else path[0]
        raise ConfigError(f"{_shown(key)}: nested more than {MAX_DEPTH} levels deep (a value is a "
                          f"number, string, boolean or a list of them)")


def _too_deep(value, path: list) -> list | None:
    """The key path to the first table or list below MAX_DEPTH levels, else None; the walk stops
    there, so it recurses MAX_DEPTH + 1 calls at most (tomllib parses dotted keys any depth)."""
    if not isinstance(value, (dict, list)):
        return None
    if len(path) > MAX_DEPTH:
        return path
    items = value.items() if isinstance(value, dict) else enumerate(value)
    for name, item in items:
        found = _too_deep(item, [*path, str(name)])
        if found:
            return found
    return None


def _shown(name: str) -> str:
    """A key as typed, or its repr when it holds a control character (a NUL, a terminal escape)
    that would otherwise reach the terminal or break the one error line."""
    return name if name.isprintable() else repr(name)


def _valid_keys() -> list[str]:
    """Every settable key, dotted."""
    fields = [f"{s}.{f.name}" for s, cls in SECTIONS.items() for f in dataclasses.fields(cls)]
    return list(TOP_LEVEL) + fields


# Names other libraries use, and the key of this schema that means the same (only keys that exist)
SYNONYMS = {
    "learning_rate": "lr", "eta": "lr",
    "lr_decay": "gamma", "decay": "gamma", "decay_rate": "gamma",
    "n_epochs": "epochs", "num_epochs": "epochs", "max_epochs": "epochs", "max_iter": "epochs",
    "epoch": "epochs",
    "batch": "batch_size", "batchsize": "batch_size", "minibatch": "batch_size",
    "minibatch_size": "batch_size", "mini_batch_size": "batch_size",
    "hidden_layers": "hidden", "hidden_layer_sizes": "hidden", "layers": "hidden",
    "hidden_sizes": "hidden", "hidden_units": "hidden",
    "activation_function": "activation", "nonlinearity": "activation",
    "l2_reg": "l2", "l2_penalty": "l2", "alpha": "l2", "weight_decay": "l2",  # optim's is another
    "l1_reg": "l1", "l1_penalty": "l1",
    "optimizer": "name", "solver": "name",
    "random_state": "seed", "random_seed": "seed",
    "validation_fraction": "val_fraction", "val_split": "val_fraction",
    "validation_split": "val_fraction",
    "early_stopping": "patience", "n_iter_no_change": "patience",
    "scheduler": "schedule", "lr_schedule": "schedule", "warmup": "warmup_steps",
    "grad_clip": "clip_norm", "clip_grad_norm": "clip_norm",  # max_grad_norm: privacy's key
    "loss": "family",
    "model_type": "kind", "type": "kind", "architecture": "kind",
    "state_size": "state", "hidden_state": "state", "recurrent_units": "state",
    "state_units": "state",
    "recurrent_activation": "state_activation",
    "truncate": "bptt", "bptt_steps": "bptt", "truncated_bptt": "bptt", "tbptt": "bptt",
    "timesteps": "steps", "time_steps": "steps", "seq_len": "steps", "sequence_length": "steps",
}
UNSUPPORTED = {"dropout": "distnn has no dropout; model.l2 or model.l1 regularize",
               "cell": "distnn's recurrent model is a dense network applied through time "
                       "(model.kind = \"recurrent\"); it has no LSTM or GRU cells"}


def similar_keys(name: str, section: str = "") -> list[str]:
    """The keys a user most likely meant by `name` (a key's last part, as typed, in `section`):
    those of that name (model.lr -> optim.lr) and those SYNONYMS gives (learning_rate -> optim.lr);
    `section`'s own first (model.weight_decay -> model.l2), then those of that name."""
    word = name.lower().replace("-", "_")
    last = {k: k.rpartition(".")[2] for k in _valid_keys()}
    found = [k for k, n in last.items() if n == word]
    found += [k for k, n in last.items() if n == SYNONYMS.get(word) and k not in found]
    return sorted(found, key=lambda k: (k.rpartition(".")[0] != section, last[k] != word))


def unsupported(name: str) -> str | None:
    """What to say of a setting distnn does not have (dropout), else None."""
    return UNSUPPORTED.get(name.lower().replace("-", "_"))


def _require_known(key: str) -> None:
    """ConfigError for a key not in the schema, suggesting the same name in another section
    (model.lr -> optim.lr), a key of the same meaning (optim.learning_rate -> optim.lr), or else
    the closest spelling; a setting distnn lacks (dropout) is said to be missing."""
    valid = _valid_keys()
    if key in valid:
        return
    section, _, name = key.rpartition(".")
    close = similar_keys(name, section) or difflib.get_close_matches(key, valid, n=1)
    hint = f"; did you mean {' or '.join(close)}?" if close else ""
    if unsupported(name):
        hint = f"; {unsupported(name)}"
    raise ConfigError(f"{_shown(key)}: unknown key{hint}")


# --------------------------------------------------------------------------------- public

def load_config(path, overrides=()) -> Config:
    """Read a TOML file, apply `overrides` ("section.key=value"), validate."""
    try:
        with open(path, "rb") as f:
            d = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"no such config file: {path}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read config file ({e})") from None
    except ValueError as e:  # TOMLDecodeError, or int()'s for an integer past 4300 digits
        raise ConfigError(f"{path}: invalid TOML: {e}") from None
    except RecursionError:  # only tomllib recurses in here, once per level of nesting
        raise ConfigError(f"{path}: {_TOO_DEEP}") from None
    d.setdefault("out_dir", f"runs/{os.path.splitext(os.path.basename(path))[0]}")
    return parse_config(d, overrides)


def parse_config(d: dict, overrides=()) -> Config:
    """Config from a parsed TOML table plus overrides; raises ConfigError naming the key."""
    d = {k: dict(v) if isinstance(v, dict) else v for k, v in d.items()}  # overrides must not leak
    for item in overrides:
        apply_override(d, item)
    _check_depth(d)
    _check_keys(d)
    if not d.get("data", {}).get("source"):
        raise ConfigError("data.source: required key is missing "
                          "(a data file, 'sklearn:NAME' or 'synthetic:KIND')")
    sections = {name: _build(cls, d.get(name, {}), f"{name}.") for name, cls in SECTIONS.items()}
    if "privacy" in d and sections["privacy"].dp() is None:
        key = f"privacy.{next(iter(d['privacy']))}" if d["privacy"] else "privacy"
        raise ConfigError(f"{key}: a [privacy] section turns DP-SGD on, and needs "
                          f"privacy.noise_multiplier or privacy.target_epsilon")
    top = {k: d[k] for k in TOP_LEVEL if k in d}
    cfg = _build(Config, {**top, **sections}, "")
    _cross_checks(cfg)
    return cfg


def apply_override(d: dict, item: str) -> None:
    """Set "section.key=value" in the raw table `d`; value parsed as TOML, else kept as a string."""
    key, eq, text = item.partition("=")
    key = key.strip()
    if not eq:
        how = f"write {key}=VALUE" if key in _valid_keys() else "expected section.key=value"
        raise ConfigError(f"override {item!r}: no '=' in it ({how})")
    if not key:
        raise ConfigError(f"override {item!r}: no key before '=' (expected section.key=value)")
    _require_known(key)
    try:
        value = tomllib.loads(f"v = {text.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = text.strip()  # bare words such as sklearn:digits or relu
    except ValueError as e:  # int()'s, for an integer past 4300 digits
        raise ConfigError(f"{key}: the --set value is invalid TOML: {e}") from None
    except RecursionError:  # only tomllib recurses in here, once per level of nesting
        raise ConfigError(f"{key}: the --set value is {_TOO_DEEP}") from None
    section, _, name = key.rpartition(".")
    table = d.setdefault(section, {}) if section else d
    if not isinstance(table, dict):
        raise ConfigError(f"{section}: expected a table [{section}], got {table!r}")
    table[name] = value


def to_dict(cfg: Config) -> dict:
    """Plain nested dict of the config (JSON- and TOML-able); without a [privacy] table when
    privacy is off (a written [privacy] section turns it on)."""
    d = dataclasses.asdict(cfg)
    if cfg.privacy.dp() is None:
        del d["privacy"]
    return d


def from_dict(d: dict) -> Config:
    """Inverse of to_dict (validates, so a tampered dict is refused like a bad file)."""
    return parse_config(d)


def to_toml(cfg: Config) -> str:
    """The config as TOML text that load_config reads back to an equal Config."""
    def value(v):
        if isinstance(v, float) and not math.isfinite(v):
            return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf")
        return json.dumps(v, ensure_ascii=False)  # these JSON values are valid TOML values

    d = to_dict(cfg)
    lines = [f"{k} = {value(d[k])}" for k in TOP_LEVEL]
    for section in (s for s in SECTIONS if s in d):
        lines += ["", f"[{section}]"] + [f"{k} = {value(v)}" for k, v in d[section].items()]
    return "\n".join(lines) + "\n"
