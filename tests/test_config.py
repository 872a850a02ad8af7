"""Specification of distnn.config: full file parses, errors name keys, overrides, round trip."""
import json
import tomllib

import pytest

from distnn import activations, config, families, network, optim
from distnn.config import (ACTIVATIONS, CHECKS, Config, ConfigError, apply_override, from_dict,
                           load_config, parse_config, to_dict, to_toml)

FULL = """
out_dir = "runs/full"

[model]
hidden = [32, 16, 8]
activation = "tanh"
family = "poisson"
l1 = 1e-5
l2 = 0
dtype = "float32"

[data]
source = "data/train.csv"
target = "count"
features = ["a", "b"]
val_fraction = 0.1
standardize = false
test_source = "data/test.csv"

[optim]
name = "adamw"
lr = 3e-3
momentum = 0.0
nesterov = false
betas = [0.8, 0.99]
eps = 1e-7
weight_decay = 0.01
schedule = "step"
step_size = 100
gamma = 0.5
warmup_steps = 10
min_lr = 1e-5
clip_norm = 1.0

[train]
batch_size = 64
epochs = 3
seed = 42
patience = 2
checkpoint_every = 50
keep_checkpoints = 2
deterministic = true
chunk_size = 16
watchdog = 5
bucket_mb = 8.0
threads = 1
check_every = 10
"""

MINIMAL = {"data": {"source": "sklearn:digits"}}


def write(tmp_path, text, name="cfg.toml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_full_example_parses_with_types(tmp_path):
    cfg = load_config(write(tmp_path, FULL))
    assert cfg.out_dir == "runs/full"
    assert cfg.model.hidden == [32, 16, 8] and cfg.model.family == "poisson"
    assert cfg.model.l2 == 0.0 and isinstance(cfg.model.l2, float)  # int accepted for float
    assert cfg.data.features == ["a", "b"] and cfg.data.standardize is False
    assert cfg.optim.name == "adamw" and cfg.optim.betas == [0.8, 0.99]
    assert cfg.train.deterministic is True and cfg.train.watchdog == 5.0
    assert isinstance(cfg.train.watchdog, float)


def test_defaults_fill_everything_but_the_source(tmp_path):
    cfg = load_config(write(tmp_path, '[data]\nsource = "sklearn:iris"\n', "iris.toml"))
    assert cfg.out_dir == "runs/iris"  # named after the config file
    assert cfg.model == Config().model and cfg.optim == Config().optim
    assert cfg.train.batch_size == 256 and parse_config(MINIMAL).out_dir == "runs/run"


@pytest.mark.parametrize("d, message", [
    ({"modle": {"hidden": [4]}}, r"^\[modle\]: unknown section; did you mean \[model\]\?"),
    ({"model": {"activaton": "relu"}}, r"^model\.activaton: unknown key; did you mean model\.activ"),
    ({"model": {"lr": 0.1}}, r"^model\.lr: unknown key; did you mean optim\.lr\?"),
    ({"outdir": "x"}, r"^outdir: unknown key; did you mean out_dir\?"),
    ({"model": 3}, r"^model: expected a table \[model\]"),
    ({"model": {"activation": "rleu"}}, r"^model\.activation: expected one of \[.*\], got 'rleu'"),
    ({"model": {"family": "binomial"}}, r"^model\.family: expected one of"),
    ({"model": {"dtype": "float16"}}, r"^model\.dtype: expected one of"),
    ({"model": {"hidden": 64}}, r"^model\.hidden: expected a list, got 64"),
    ({"model": {"hidden": [64, 0]}}, r"^model\.hidden: expected sizes >= 1"),
    ({"model": {"hidden": [64, 1.5]}}, r"^model\.hidden\[1\]: expected an integer, got 1\.5"),
    ({"model": {"l1": -1}}, r"^model\.l1: expected a finite value >= 0"),
    ({"model": {"l2": "small"}}, r"^model\.l2: expected a number, got 'small'"),
    ({"model": {"l2": True}}, r"^model\.l2: expected a number, got True"),
    ({"data": {"source": 3}}, r"^data\.source: expected a string, got 3"),
    ({"data": {"val_fraction": 1.0}}, r"^data\.val_fraction: expected 0 <= value < 1"),
    ({"data": {"features": ["a", 2]}}, r"^data\.features\[1\]: expected a string"),
    ({"data": {"standardize": 1}}, r"^data\.standardize: expected true or false, got 1"),
    ({"optim": {"name": "adagrad"}}, r"^optim\.name: expected one of"),
    ({"optim": {"lr": 0}}, r"^optim\.lr: expected a finite value > 0"),
    ({"optim": {"lr": float("nan")}}, r"^optim\.lr: expected a finite value > 0"),
    ({"optim": {"momentum": 1.0}}, r"^optim\.momentum: expected 0 <= value < 1"),
    ({"optim": {"betas": [0.9]}}, r"^optim\.betas: expected two numbers in \[0, 1\)"),
    ({"optim": {"eps": 0.0}}, r"^optim\.eps: expected a finite value > 0"),
    ({"train": {"bucket_mb": float("inf")}}, r"^train\.bucket_mb: expected a value in \[1e-05, 4096\]"),
    ({"train": {"bucket_mb": 1e-9}}, r"^train\.bucket_mb: expected a value in \[1e-05, 4096\]"),
    ({"train": {"threads": 10**18}}, r"^train\.threads: expected a value in \[0, 4096\]"),
    ({"optim": {"schedule": "exp"}}, r"^optim\.schedule: expected one of"),
    ({"optim": {"schedule": "step"}}, r"^optim\.step_size: expected >= 1 with optim\.schedule"),
    ({"optim": {"nesterov": True, "momentum": 0}}, r"^optim\.nesterov: needs optim\.momentum > 0"),
    ({"optim": {"min_lr": 1.0}}, r"^optim\.min_lr: expected <= optim\.lr"),
    ({"optim": {"clip_norm": -1}}, r"^optim\.clip_norm: expected a finite value >= 0"),
    ({"train": {"batch_size": 0}}, r"^train\.batch_size: expected a finite value >= 1, got 0"),
    ({"train": {"batch_size": True}}, r"^train\.batch_size: expected an integer, got True"),
    ({"train": {"batch_size": 32.0}}, r"^train\.batch_size: expected an integer, got 32\.0"),
    ({"train": {"epochs": 0}}, r"^train\.epochs: expected a finite value >= 1"),
    ({"train": {"seed": -1}}, r"^train\.seed: expected a finite value >= 0"),
    ({"train": {"chunk_size": 0}}, r"^train\.chunk_size: expected a value in \[1, 1048576\]"),
    ({"train": {"chunk_size": 2**20 + 1}}, r"^train\.chunk_size: expected a value in \[1, 1048576\]"),
    ({"train": {"keep_checkpoints": 0}}, r"^train\.keep_checkpoints: expected a finite value >= 1"),
    ({"train": {"bucket_mb": 0}}, r"^train\.bucket_mb: expected a value in \[1e-05, 4096\]"),
    ({"train": {"watchdog": -5}}, r"^train\.watchdog: expected a value in \[0, 604800\]"),
    ({"out_dir": ""}, r"^out_dir: expected a non-empty string"),
    # bounds that keep a value from overflowing where it is used
    ({"train": {"bucket_mb": 1e308}}, r"^train\.bucket_mb: expected a value in \[1e-05, 4096\]"),
    ({"train": {"bucket_mb": 4097}}, r"^train\.bucket_mb: expected a value in \[1e-05, 4096\]"),
    ({"train": {"watchdog": 1e308}}, r"^train\.watchdog: expected a value in \[0, 604800\]"),
    ({"train": {"watchdog": float("inf")}}, r"^train\.watchdog: expected a value in \[0, 604800\]"),
    ({"optim": {"gamma": 1e308}}, r"^optim\.gamma: expected a decay factor in \(0, 1\]"),
    ({"optim": {"gamma": 1.5}}, r"^optim\.gamma: expected a decay factor in \(0, 1\]"),
    ({"optim": {"lr": 10**400}}, r"^optim\.lr: expected a 64-bit integer .*, got one of 1329 bits"),
    ({"train": {"seed": 2**63}}, r"^train\.seed: expected a 64-bit integer"),
    ({"model": {"hidden": [4, -2**63 - 1]}}, r"^model\.hidden\[1\]: expected a 64-bit integer"),
])
def test_every_error_names_its_key(d, message):
    d = {**d, "data": {**MINIMAL["data"], **d.get("data", {})}}  # a source unless the case sets one
    with pytest.raises(ConfigError, match=message):
        parse_config(d)


@pytest.mark.parametrize("d", [{}, {"data": {}}, {"data": {"target": "y"}}])
def test_missing_source_is_named(d):
    with pytest.raises(ConfigError, match=r"^data\.source: required key is missing"):
        parse_config(d)


def test_every_activation_name_is_accepted():
    for name in ACTIVATIONS:
        assert parse_config({**MINIMAL, "model": {"activation": name}}).model.activation == name


@pytest.mark.parametrize("key,table", [
    ("model.activation", activations.ACTIVATIONS), ("model.family", families.FAMILIES),
    ("model.dtype", network.DTYPES), ("optim.name", optim.OPTIMIZERS), ("optim.schedule", optim.SCHEDULES)])
def test_the_accepted_names_are_the_tables_keys(key, table):
    for value in table:  # a new table entry is accepted with no second list to extend
        assert CHECKS[key](value) is None
    assert CHECKS[key]("nope") == f"expected one of {list(table)}, got 'nope'"


def test_bounds_admit_their_ends():
    ends = {"train": {"bucket_mb": 4096, "watchdog": 604800, "seed": 2**63 - 1},
            "optim": {"gamma": 1.0}}
    cfg = parse_config({**MINIMAL, **ends})
    assert (cfg.train.bucket_mb, cfg.train.watchdog, cfg.optim.gamma) == (4096.0, 604800.0, 1.0)


def test_an_integer_past_pythons_digit_limit_names_the_file_or_key(tmp_path):
    digits = "1" + "0" * 5000
    path = write(tmp_path, f'[data]\nsource = "sklearn:iris"\n[train]\nseed = {digits}\n')
    with pytest.raises(ConfigError, match=r"cfg\.toml: invalid TOML: Exceeds the limit"):
        load_config(path)
    with pytest.raises(ConfigError, match=r"^train\.seed: the --set value is invalid TOML"):
        parse_config(MINIMAL, [f"train.seed={digits}"])


def test_missing_file_and_toml_syntax_error_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match=r"no such config file: .*nope\.toml"):
        load_config(tmp_path / "nope.toml")
    bad = write(tmp_path, '[data]\nsource = "x.csv"\nepochs 5\n', "bad.toml")
    with pytest.raises(ConfigError, match=r"bad\.toml: invalid TOML: .*line 3"):
        load_config(bad)


def test_overrides_reach_nested_keys_lists_bools_and_bare_strings(tmp_path):
    cfg = load_config(write(tmp_path, FULL), overrides=[
        "model.l2=1e-4", "model.hidden=[10, 5]", "train.deterministic=false",
        "model.activation=relu", "data.source=sklearn:wine", 'data.target="class"',
        "out_dir = runs/other", "optim.lr=1",
    ])
    assert cfg.model.l2 == 1e-4 and cfg.model.hidden == [10, 5]
    assert cfg.train.deterministic is False and cfg.model.activation == "relu"
    assert cfg.data.source == "sklearn:wine" and cfg.data.target == "class"
    assert cfg.out_dir == "runs/other" and cfg.optim.lr == 1.0


def test_override_creates_a_missing_section_and_does_not_touch_the_input():
    d = {"data": {"source": "sklearn:digits"}}
    cfg = parse_config(d, ["train.epochs=7", "data.val_fraction=0"])
    assert cfg.train.epochs == 7 and cfg.data.val_fraction == 0.0
    assert d == {"data": {"source": "sklearn:digits"}}


@pytest.mark.parametrize("item, message", [
    ("model.l2", r"no '=' in it"),
    ("model.l3=0.1", r"^model\.l3: unknown key; did you mean model\.l"),
    ("trian.epochs=3", r"^trian\.epochs: unknown key; did you mean train\.epochs\?"),
    ("=3", r"^override '=3': no key before '='"),
    ("train.epochs=many", r"^train\.epochs: expected an integer, got 'many'"),
])
def test_override_errors_name_the_key(item, message):
    with pytest.raises(ConfigError, match=message):
        parse_config(MINIMAL, [item])


@pytest.mark.parametrize("item, message", [
    ("optim.learning_rate=0.1", r"^optim\.learning_rate: unknown key; did you mean optim\.lr\?$"),
    ("optim.lr_decay=0.5", r"did you mean optim\.gamma\?$"),
    ("train.max_iter=9", r"did you mean train\.epochs\?$"),
    ("train.num-epochs=9", r"did you mean train\.epochs\?$"),
    ("model.epochs=9", r"did you mean train\.epochs\?$"),
    ("train.minibatch=32", r"did you mean train\.batch_size\?$"),
    ("model.hidden_layer_sizes=[8]", r"did you mean model\.hidden\?$"),
    ("model.activation_function='tanh'", r"did you mean model\.activation\?$"),
    ("model.alpha=1e-4", r"did you mean model\.l2\?$"),
    ("model.weight_decay=1e-4", r"did you mean model\.l2 or optim\.weight_decay\?$"),
    ("model.dropout=0.5", r"^model\.dropout: unknown key; distnn has no dropout"),
    ("model.l2", r"^override 'model\.l2': no '=' in it \(write model\.l2=VALUE\)"),
])
def test_unknown_keys_suggest_the_key_of_the_same_meaning(item, message):
    with pytest.raises(ConfigError, match=message):
        parse_config(MINIMAL, [item])


def test_every_synonym_names_a_key_that_exists():
    names = {key.rpartition(".")[2] for key in config._valid_keys()}
    assert set(config.SYNONYMS.values()) <= names
    assert not set(config.SYNONYMS) & names - {"weight_decay"}  # model's means l2; optim has its own


def test_apply_override_edits_the_raw_table():
    d = {}
    apply_override(d, "train.batch_size=32")
    apply_override(d, "data.features=['a', 'b']")
    assert d == {"train": {"batch_size": 32}, "data": {"features": ["a", "b"]}}


def test_to_dict_from_dict_and_toml_round_trip(tmp_path):
    cfg = load_config(write(tmp_path, FULL))
    d = to_dict(cfg)
    assert from_dict(json.loads(json.dumps(d))) == cfg
    assert from_dict(tomllib.loads(to_toml(cfg))) == cfg
    assert load_config(write(tmp_path, to_toml(cfg), "again.toml")) == cfg


def test_from_dict_validates():
    d = to_dict(parse_config(MINIMAL))
    d["train"]["batch_size"] = -3
    with pytest.raises(ConfigError, match=r"^train\.batch_size"):
        from_dict(d)


# ------------------------------------------------------------------------------- nesting depth
# A config nests two levels (a [section], then a list); tomllib recurses once per level and runs
# out of stack a few hundred levels down, so deep nesting must end as a ConfigError, not a crash.

DEEP = {"3000 arrays": "[" * 3000 + "]" * 3000,
        "600 inline tables": "{a = " * 600 + "1" + "}" * 600,
        "3000 unclosed arrays": "[" * 3000}


@pytest.mark.parametrize("value", DEEP.values(), ids=DEEP)
def test_a_value_nested_too_deeply_for_the_parser_names_the_file(tmp_path, value):
    path = write(tmp_path, f'[data]\nsource = "sklearn:iris"\n[model]\nhidden = {value}\n')
    with pytest.raises(ConfigError, match=r"^.*cfg\.toml: .*nested too deeply"):
        load_config(path)


@pytest.mark.parametrize("value", DEEP.values(), ids=DEEP)
def test_an_override_nested_too_deeply_for_the_parser_names_the_key(value):
    with pytest.raises(ConfigError, match=r"^model\.hidden: .*--set .*nested too deeply"):
        parse_config(MINIMAL, [f"model.hidden={value}"])


@pytest.mark.parametrize("text", [
    "[model]\nhidden = " + "[" * 50 + "]" * 50,          # parses, but no key takes it
    "[model]\nhidden = [" + "{a = " * 50 + "1" + "}" * 50 + "]",
    ".".join(["model"] + ["a"] * 3000) + " = 1",          # dotted keys: tomllib does not recurse
    "[" + ".".join(["train"] + ["b"] * 3000) + "]\nx = 1",
])
def test_nesting_that_parses_but_no_config_needs_is_refused_naming_the_key(tmp_path, text):
    path = write(tmp_path, f'{text}\n[data]\nsource = "sklearn:iris"\n')
    with pytest.raises(ConfigError, match=r"^(model\.hidden|model\.a|train\.b): nested more than 4"):
        load_config(path)


def test_a_list_of_lists_is_still_a_type_error_naming_the_item():
    with pytest.raises(ConfigError, match=r"^model\.hidden\[0\]: expected an integer, got \[2\]"):
        parse_config({**MINIMAL, "model": {"hidden": [[2]]}})


@pytest.mark.parametrize("item", ["model.\x00a=1", "model.\x1b[2J=1", "\x00=1"])
def test_a_key_with_control_characters_is_shown_escaped(item):
    with pytest.raises(ConfigError) as e:
        parse_config(MINIMAL, [item])
    assert str(e.value).isprintable() and "unknown key" in str(e.value)
