"""Property: whatever the TOML text or the `--set` overrides, load_config returns a Config or raises
one of USER_ERRORS whose message is one printable line; never anything else.

Hypothesis builds the hostile input: values nested up to far past the parser's recursion limit,
numbers at and beyond float and 64-bit range, control characters and NULs in keys, values and
the text itself. The CLI-level test at the end runs `python -m distnn train` on a few such configs
and checks the whole contract: exit 2, one stderr line, no traceback, no run directory left.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from distnn import config
from distnn.errors import USER_ERRORS

FUZZ = settings(deadline=None, derandomize=True, database=None, print_blob=False,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
REPO = Path(__file__).resolve().parents[1]
GOOD = '[data]\nsource = "sklearn:iris"\n[model]\nhidden = [4]\n[train]\nepochs = 1\n'
SOURCE = 'data.source = "sklearn:iris"\n'  # the one key a config needs, as a dotted key
KEYS = ["out_dir", "model.hidden", "model.l2", "data.source", "data.features", "optim.lr",
        "optim.betas", "optim.gamma", "train.seed", "train.bucket_mb", "train.watchdog"]
CONTROL = [chr(c) for c in [*range(0x20), 0x7F]]


def loads_or_refuses(text, overrides=(), tmp=None):
    """load_config on `text` (str or bytes): a Config, or a USER_ERRORS one printable line."""
    path = Path(tmp) / "cfg.toml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8", "surrogatepass"))
    try:
        return config.load_config(path, overrides=overrides)
    except USER_ERRORS as e:
        message = str(e)
        assert message.isprintable(), repr(message)  # one line, and no terminal escapes
        return e


# --------------------------------------------------------------------------------- values

def nested(depth, kind, leaf="1"):
    """A TOML value nested `depth` arrays or inline tables deep (unclosed: a syntax error too)."""
    if kind == "array":
        return "[" * depth + leaf + "]" * depth
    if kind == "table":
        return "{a = " * depth + leaf + "}" * depth
    return "[" * depth + leaf


NUMBERS = ["1e308", "1e309", "-1e309", "inf", "-inf", "+inf", "nan", "-nan", "-0.0", "+0.0",
           "5e-324", "1e-400", "9223372036854775807", "9223372036854775808",
           "-9223372036854775809", "1" + "0" * 400, "1" + "0" * 5000, "0x7fffffffffffffffff",
           "0b" + "1" * 70, "1_000", "1__0", "00", "0.", ".5", "1e", "2.0\x00"]


@st.composite
def hostile_values(draw):
    """The text of one TOML value: nested, a number at the edge, or a string with controls."""
    kind = draw(st.sampled_from(["nested", "number", "string", "raw"]))
    if kind == "nested":
        depth = draw(st.one_of(st.integers(0, 12), st.sampled_from([100, 400, 600, 1000, 3000])))
        return nested(depth, draw(st.sampled_from(["array", "table", "unclosed"])),
                      draw(st.sampled_from(NUMBERS[:6] + ["1", '"x"'])))
    if kind == "number":
        return draw(st.sampled_from(NUMBERS))
    text = draw(st.text(st.sampled_from(CONTROL + ["a", "\\", '"', "'", "é"]), max_size=6))
    if kind == "string":  # a basic string holding the controls as escapes, which TOML allows
        return '"' + "".join(f"\\u{ord(c):04x}" if c in CONTROL or c in '"\\' else c
                             for c in text) + '"'
    return text  # raw: controls straight in the text, which TOML forbids


@st.composite
def hostile_keys(draw):
    """A known key, or a quoted key with control characters, or a dotted key many levels deep."""
    kind = draw(st.sampled_from(["known", "quoted", "deep"]))
    if kind == "known":
        return draw(st.sampled_from(KEYS))
    if kind == "quoted":
        name = draw(st.text(st.sampled_from(CONTROL + ["a", "."]), min_size=1, max_size=4))
        return "model." + '"' + "".join(f"\\u{ord(c):04x}" for c in name) + '"'
    return ".".join(["model"] + ["a"] * draw(st.sampled_from([5, 50, 3000])))


# ------------------------------------------------------------------------------ properties

@settings(FUZZ, max_examples=300)
@given(hostile_keys(), hostile_values())
@example("model.hidden", nested(3000, "array"))
@example("model.hidden", nested(600, "table"))
@example("train.bucket_mb", "1e308")
@example("optim.lr", "1" + "0" * 400)
def test_any_key_and_value_in_the_file_loads_or_is_refused_in_one_line(tmp_path_factory, key,
                                                                        value):
    text = f"{key} = {value}\n" + ("" if key == "data.source" else SOURCE)  # dotted keys only
    loads_or_refuses(text, tmp=tmp_path_factory.mktemp("c"))


@settings(FUZZ, max_examples=300)
@given(st.lists(st.tuples(hostile_keys(), hostile_values()), min_size=1, max_size=3))
@example([("model.hidden", nested(3000, "array"))])
@example([("model.hidden", nested(600, "table"))])
@example([("train.watchdog", "1e308")])
def test_any_override_applies_or_is_refused_in_one_line(tmp_path_factory, items):
    overrides = [f"{key.replace(chr(34), '')}={value}" for key, value in items]
    loads_or_refuses(GOOD, overrides, tmp=tmp_path_factory.mktemp("c"))


@settings(FUZZ, max_examples=300)
@given(st.lists(st.tuples(st.integers(0, len(GOOD)),
                          st.text(st.sampled_from(CONTROL + ["[", "{", "=", '"', "\udcff"]),
                                  min_size=1, max_size=3)), min_size=1, max_size=4))
def test_control_characters_anywhere_in_the_text_load_or_are_refused_in_one_line(
        tmp_path_factory, inserts):
    text = GOOD
    for at, chars in sorted(inserts, reverse=True):
        text = text[:at] + chars + text[at:]
    loads_or_refuses(text, tmp=tmp_path_factory.mktemp("c"))


# --------------------------------------------------------------------------- the command line

BAD = {  # a config file's [model] or [train] line -> what the one error line says
    "nested arrays": ("[model]\nhidden = " + nested(3000, "array"), "nested too deeply"),
    "nested inline tables": ("[model]\nhidden = " + nested(600, "table"), "nested too deeply"),
    "huge bucket": ("[train]\nbucket_mb = 1e308", "train.bucket_mb: expected a value in"),
    "huge integer": ("[optim]\nlr = 1" + "0" * 400, "optim.lr: expected a 64-bit integer"),
    "NUL in a value": ('[model]\nactivation = "relu\\u0000"', "model.activation: expected one of"),
    "NUL in the text": ("[model]\nhidden = [4]\x00", "invalid TOML"),
}


@pytest.mark.skipif("PMI_SIZE" in os.environ or "OMPI_COMM_WORLD_SIZE" in os.environ,
                    reason="starts its own process: run under plain pytest")
@pytest.mark.parametrize("case", sorted(BAD))
def test_a_bad_config_is_one_line_exit_2_and_leaves_no_run_directory(tmp_path, case):
    text, message = BAD[case]
    (tmp_path / "cfg.toml").write_text('[data]\nsource = "synthetic:binary?n=40"\n' + text + "\n")
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    env = os.environ | {"PYTHONPATH": path}
    done = subprocess.run([sys.executable, "-m", "distnn", "train", "cfg.toml", "--out", "D"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    lines = done.stderr.splitlines()
    assert done.returncode == 2 and len(lines) == 1, done.stderr
    assert lines[0].startswith("distnn: error: ") and message in lines[0], lines[0]
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "D").exists()  # no lock, no partial files: not even the directory
