"""Checkpoints round-trip exactly, refuse any file that is not theirs and intact, save atomically."""

import io
import json
import os
import pathlib
import zipfile

import numpy as np
import pytest

from distnn.checkpoint import (FORMAT, CheckpointError, checkpoint_path, latest_checkpoint,
                               list_checkpoints, load, prune, save)

ARRAYS = {
    "params": np.linspace(-1, 1, 7, dtype=np.float32),
    "opt/m": np.arange(1000, dtype=np.float64) / 7,  # long enough to find and corrupt in the file
    "opt/t": np.array(12, dtype=np.int64),
    "data/rows": np.arange(6, dtype=np.int32).reshape(2, 3),
}
META = {"architecture": {"layers": [4, 8, 1], "activation": "tanh"}, "epoch": 3, "step": 120,
        "lr": 0.01, "history": [{"loss": 0.5}, {"loss": 0.25}]}


class WritesMarker:
    """Unpickling this calls Path.touch(marker): proof that code ran."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.touch, (pathlib.Path(self.marker),)


def write_zip(path, members):
    """An npz of raw `.npy` members, bypassing `save`: for crafting files by hand."""
    with zipfile.ZipFile(path, "w") as zf:
        for name, a in members.items():
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.asarray(a), allow_pickle=True)
            zf.writestr(name + ".npy", buf.getvalue())


def raw_members(path):
    """Every member of a file `save` wrote, reserved ones included."""
    with np.load(path) as z:
        return {name: z[name] for name in z.files}


def assert_refused(path, match):
    """load(path) raises a one-line CheckpointError naming the file and matching `match`."""
    with pytest.raises(CheckpointError, match=match) as info:
        load(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_round_trip_keeps_dtypes_shapes_bits_and_nested_meta(tmp_path):
    path = tmp_path / "model.npz"
    save(path, ARRAYS, META)
    arrays, meta = load(path)
    assert meta == META
    assert arrays.keys() == ARRAYS.keys()
    for name, a in ARRAYS.items():
        assert arrays[name].dtype == a.dtype and arrays[name].shape == a.shape, name
        assert arrays[name].tobytes() == a.tobytes(), name
    path.unlink()  # fully loaded: nothing still reads the file
    assert type(arrays["opt/m"]) is np.ndarray and arrays["opt/m"].sum() == ARRAYS["opt/m"].sum()


def test_file_holds_tagged_json_meta_and_no_pickle(tmp_path):
    path = tmp_path / "model.npz"
    save(path, ARRAYS, META)
    members = raw_members(path)
    assert members["__format__"].tobytes().decode() == FORMAT
    assert json.loads(members["__meta__"].tobytes()) == META
    assert not any(a.dtype.hasobject for a in members.values())


def test_missing_truncated_and_foreign_files_are_refused(tmp_path):
    assert_refused(tmp_path / "absent.npz", "no such")
    path = tmp_path / "model.npz"
    save(path, ARRAYS, META)
    whole = path.read_bytes()
    path.write_bytes(whole[: len(whole) // 2])
    assert_refused(path, "not a zip")
    path.write_bytes(b"")
    assert_refused(path, "not a zip")
    np.save(tmp_path / "single.npy", np.ones(3))
    assert_refused(tmp_path / "single.npy", "not a zip")
    (tmp_path / "notes.txt").write_text("hello")
    assert_refused(tmp_path / "notes.txt", "not a zip")


def test_plain_npz_and_wrong_format_tag_are_refused(tmp_path):
    np.savez(tmp_path / "plain.npz", params=np.ones(3))
    assert_refused(tmp_path / "plain.npz", "format tag")
    save(tmp_path / "model.npz", ARRAYS, META)
    members = raw_members(tmp_path / "model.npz")
    members["__format__"] = np.frombuffer(b"distnn-checkpoint-0", np.uint8)
    write_zip(tmp_path / "old.npz", members)
    assert_refused(tmp_path / "old.npz", "format tag b'distnn-checkpoint-0'")


def test_flipped_byte_in_array_data_is_refused(tmp_path):
    path = tmp_path / "model.npz"
    save(path, ARRAYS, META)
    data = bytearray(path.read_bytes())
    at = data.find(ARRAYS["opt/m"][500:501].tobytes())
    assert at > 0
    data[at] ^= 0x10
    path.write_bytes(bytes(data))
    assert_refused(path, "checksum|CRC")


@pytest.mark.parametrize("tamper", ["array", "meta"])
def test_checksum_catches_changes_that_keep_the_zip_consistent(tmp_path, tamper):
    path = tmp_path / "model.npz"
    save(path, ARRAYS, META)
    members = raw_members(path)
    if tamper == "array":
        members["params"][3] += 1
    else:
        members["__meta__"] = np.frombuffer(json.dumps({**META, "epoch": 4}).encode(), np.uint8)
    write_zip(path, members)  # fresh zip CRCs: only the sha256 can notice
    assert_refused(path, "checksum")


def test_pickled_object_array_is_refused_without_running_code(tmp_path):
    marker = tmp_path / "marker"
    path = tmp_path / "evil.npz"
    save(path, ARRAYS, META)
    members = raw_members(path)  # a correct tag, so loading gets as far as the object array
    members["evil"] = np.array([WritesMarker(marker)], dtype=object)
    write_zip(path, members)
    assert_refused(path, "evil|pickle|[Oo]bject")
    assert not marker.exists()
    np.load(path, allow_pickle=True)["evil"]  # the payload is live: loading it unsafely runs it
    assert marker.exists()


def test_object_arrays_and_reserved_names_are_not_saved(tmp_path):
    path = tmp_path / "model.npz"
    with pytest.raises(CheckpointError, match="'bad'.*object"):
        save(path, {"bad": np.array([{}], dtype=object)}, {})
    with pytest.raises(CheckpointError, match="__meta__"):
        save(path, {"__meta__": np.ones(2)}, {})
    assert list(tmp_path.iterdir()) == []


def failing_replace(src, dst):
    raise OSError("disk on fire")


@pytest.mark.parametrize("failure", ["meta", "replace"])
def test_failed_save_keeps_the_previous_file_and_leaves_no_temp_files(tmp_path, monkeypatch, failure):
    path = tmp_path / "model.npz"
    save(path, ARRAYS, META)
    before = path.read_bytes()
    new = {"params": np.zeros(3, np.float32)}
    if failure == "meta":
        with pytest.raises(CheckpointError, match="JSON"):
            save(path, new, {"when": object()})
    else:
        monkeypatch.setattr(os, "replace", failing_replace)
        with pytest.raises(CheckpointError, match=f"{path}.*disk on fire"):
            save(path, new, META)
    assert path.read_bytes() == before
    assert list(tmp_path.iterdir()) == [path]


def test_save_fsyncs_the_file_before_the_rename_and_the_directory_after(tmp_path, monkeypatch):
    calls = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: calls.append("fsync") or real_fsync(fd))
    monkeypatch.setattr(os, "replace", lambda a, b: calls.append("replace") or real_replace(a, b))
    save(tmp_path / "model.npz", ARRAYS, META)
    assert calls == ["fsync", "replace", "fsync"]


def test_save_replaces_an_existing_checkpoint(tmp_path):
    path = tmp_path / "model.npz"
    save(path, ARRAYS, META)
    save(path, {"params": np.ones(2)}, {"epoch": 9})
    arrays, meta = load(path)
    assert list(arrays) == ["params"] and meta == {"epoch": 9}


def test_list_checkpoints_orders_by_step_and_ignores_other_files(tmp_path):
    for step in [20, 3, 1_000_000_000, 999_999_999]:
        save(checkpoint_path(tmp_path, step), {"x": np.ones(1)}, {"step": step})
    (tmp_path / ".ckpt-000000200.npz.123.abcd.tmp").write_bytes(b"partial")
    (tmp_path / "ckpt-best.npz").write_bytes(b"other")
    (tmp_path / "notes.txt").write_text("x")
    assert checkpoint_path(tmp_path, 3).name == "ckpt-000000003.npz"
    assert list_checkpoints(tmp_path) == [checkpoint_path(tmp_path, s)
                                          for s in [3, 20, 999_999_999, 1_000_000_000]]
    assert list_checkpoints(tmp_path / "absent") == []


def test_latest_checkpoint_skips_a_corrupt_newest_file(tmp_path):
    assert latest_checkpoint(tmp_path) is None
    for step in [1, 2, 3]:
        save(checkpoint_path(tmp_path, step), {"x": np.full(50, step)}, {"step": step})
    assert latest_checkpoint(tmp_path) == checkpoint_path(tmp_path, 3)
    newest = checkpoint_path(tmp_path, 3)
    newest.write_bytes(newest.read_bytes()[:100])
    assert latest_checkpoint(tmp_path) == checkpoint_path(tmp_path, 2)


def test_latest_checkpoint_says_what_it_passed_over_and_refuses_when_none_loads(tmp_path):
    save(checkpoint_path(tmp_path, 1), {"x": np.ones(2)}, {"kind": "training"})
    save(checkpoint_path(tmp_path, 2), {"x": np.ones(2)}, {"kind": "model"})
    checkpoint_path(tmp_path, 3).write_bytes(b"not a zip")
    passed = []
    assert latest_checkpoint(tmp_path, kind="training", passed_over=passed.append) == \
        checkpoint_path(tmp_path, 1)
    assert [type(e) for e in passed] == [CheckpointError] * 2
    assert "ckpt-000000003.npz: not a zip" in str(passed[0])
    assert "ckpt-000000002.npz: not a training checkpoint" in str(passed[1])
    checkpoint_path(tmp_path, 1).unlink()
    with pytest.raises(CheckpointError, match=r"none of the 2 checkpoints loads \(the newest: "
                                              r".*ckpt-000000003.npz: not a zip"):
        latest_checkpoint(tmp_path, kind="training")


def test_prune_keeps_the_newest(tmp_path):
    for step in [5, 1, 9, 7]:
        save(checkpoint_path(tmp_path, step), {"x": np.ones(1)}, {})
    prune(tmp_path, keep=2)
    assert list_checkpoints(tmp_path) == [checkpoint_path(tmp_path, 7), checkpoint_path(tmp_path, 9)]
    prune(tmp_path, keep=5)
    assert len(list_checkpoints(tmp_path)) == 2
    with pytest.raises(ValueError, match="keep"):
        prune(tmp_path, keep=0)
