"""Checkpoints: atomic, self-checking `.npz` files of named arrays plus JSON metadata, never pickle.

A file holds the caller's arrays (names may contain '/', e.g. "opt/m") and three reserved members,
each a uint8 array: `__format__` (FORMAT), `__meta__` (UTF-8 JSON) and `__sha256__` (hex digest over
the sorted array names, dtypes, shapes, bytes and the meta JSON). `save` writes atomically
(atomic.py), so a crash leaves the old file or the new one, never half of one. `load` refuses, with
a `CheckpointError` naming the file, anything else. Files are named `ckpt-{step:09d}.npz`;
`latest_checkpoint` finds the newest one that loads, the one to resume from.
"""

import hashlib
import json
import re
import zipfile
from pathlib import Path

import numpy as np

from .atomic import write_atomically

FORMAT = "distnn-checkpoint-1"
_RESERVED = ("__format__", "__meta__", "__sha256__")
_NAME = re.compile(r"ckpt-(\d{9,})\.npz")


class CheckpointError(ValueError):
    """A checkpoint that cannot be written or is refused on reading; the message names the file."""


def save(path, arrays, meta, what="checkpoint"):
    """Atomically write `arrays` (name -> array) and JSON-able `meta` (a dict) to `path`; `what`
    names the file in messages ("model" for a model file)."""
    path = Path(path)
    arrays = _checked_arrays(path, arrays)
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}: meta must be a dict, got {type(meta).__name__}")
    try:
        meta_json = json.dumps(meta, sort_keys=True).encode()
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: meta is not JSON-serializable: {e}") from e
    digest = _digest(arrays, meta_json).encode()
    members = arrays | {"__format__": _bytes_array(FORMAT.encode()),
                        "__meta__": _bytes_array(meta_json), "__sha256__": _bytes_array(digest)}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(path, lambda f: _write_npz(f, members), binary=True)
    except OSError as e:  # mkdir's, or write_atomically's, whose __cause__ is the system's reason
        raise CheckpointError(f"{path}: could not write {what} file: {e.__cause__ or e}") from e


def load(path, kind=None, what="checkpoint"):
    """(arrays, meta) from a file `save` wrote, fully in memory; refuses anything else, and with
    `kind` a file whose meta["kind"] differs (a model file where a training checkpoint belongs).
    `what` names the file in messages ("model" for a model file)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such {what} file")
    members = _read_members(path, what)
    tag = members.pop("__format__", None)
    if tag is None:
        raise CheckpointError(f"{path}: no distnn format tag; not a {what} file distnn wrote")
    if tag.tobytes() != FORMAT.encode():
        raise CheckpointError(f"{path}: format tag {tag.tobytes()[:40]!r}, expected {FORMAT!r}")
    if "__meta__" not in members or "__sha256__" not in members:
        raise CheckpointError(f"{path}: missing __meta__ or __sha256__ member")
    meta_json, digest = members.pop("__meta__").tobytes(), members.pop("__sha256__").tobytes()
    if _digest(members, meta_json).encode() != digest:
        raise CheckpointError(f"{path}: checksum mismatch; the file is corrupted")
    try:
        meta = json.loads(meta_json)
    except ValueError as e:
        raise CheckpointError(f"{path}: __meta__ is not UTF-8 JSON: {e}") from e
    except RecursionError:  # json recurses once per level; distnn writes four or so
        raise CheckpointError(f"{path}: __meta__ is JSON nested too deeply; not a file distnn "
                              f"wrote") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}: __meta__ is not a JSON object")
    if kind is not None and meta.get("kind") != kind:
        raise CheckpointError(f"{path}: not a {kind} checkpoint (its kind is {meta.get('kind')!r})")
    return members, meta


def checkpoint_path(directory, step):
    """The file name for the checkpoint taken after `step` steps."""
    return Path(directory) / f"ckpt-{step:09d}.npz"


def list_checkpoints(directory):
    """Checkpoint files in `directory`, oldest step first, ignoring temp files and other names."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    steps = [(int(m[1]), p) for p in directory.iterdir() if (m := _NAME.fullmatch(p.name))]
    return [p for _, p in sorted(steps)]


def step_of(path):
    """The step a checkpoint's file name records (ckpt-{step:09d}.npz)."""
    return int(_NAME.fullmatch(Path(path).name)[1])


def is_checkpoint_name(name):
    """Whether `name` is a checkpoint's file name (ckpt-{step:09d}.npz)."""
    return _NAME.fullmatch(name) is not None


def latest_checkpoint(directory, kind=None, passed_over=None):
    """The newest checkpoint in `directory` that loads (as load(path, kind) checks it), or None when
    it holds none; passed_over(error) hears why each newer one did not. Checkpoints none of which
    loads are a CheckpointError: nothing can resume from them, and ignoring them would drop them."""
    candidates, refused = list_checkpoints(directory), []
    for candidate in reversed(candidates):
        try:
            load(candidate, kind=kind)
        except CheckpointError as e:
            refused.append(e)
            continue
        for e in refused if passed_over is not None else []:
            passed_over(e)
        return candidate
    if candidates:
        raise CheckpointError(f"{directory}: none of the {len(candidates)} checkpoints loads "
                              f"(the newest: {refused[0]}); nothing to resume")
    return None


def prune(directory, keep):
    """Delete all but the newest `keep` (>= 1) checkpoints in `directory`."""
    if keep < 1:
        raise CheckpointError(f"{directory}: prune needs keep >= 1, got {keep}")
    for p in list_checkpoints(directory)[:-keep]:
        p.unlink(missing_ok=True)


def _checked_arrays(path, arrays):
    """The arrays as numpy arrays, refusing reserved or empty names and object dtypes."""
    out = {}
    for name, a in arrays.items():
        if not isinstance(name, str) or not name or name in _RESERVED:
            raise CheckpointError(f"{path}: array name {name!r} is empty, not a string or reserved")
        out[name] = np.asarray(a)
        if out[name].dtype.hasobject:
            raise CheckpointError(f"{path}: array {name!r} has object dtype; only plain data saves")
    return out


def _bytes_array(b):
    return np.frombuffer(b, dtype=np.uint8)


def _digest(arrays, meta_json):
    """SHA-256 hex over sorted names, dtypes, shapes and bytes, then the meta JSON."""
    h = hashlib.sha256()
    for name in sorted(arrays):
        a = arrays[name]
        h.update(json.dumps([name, a.dtype.str, a.shape]).encode() + b"\n")  # framing: JSON escapes
        h.update(np.ascontiguousarray(a).reshape(-1).view(np.uint8).data)  # any dtype, 0-d too
    h.update(meta_json)
    return h.hexdigest()


def _write_npz(f, members):
    """The members as an uncompressed npz (zip64: members may pass 4 GiB) into the open file f."""
    with zipfile.ZipFile(f, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
        for name, a in members.items():
            with zf.open(name + ".npy", "w", force_zip64=True) as member:
                np.lib.format.write_array(member, a, allow_pickle=False)


def _read_members(path, what):
    """Every member of the npz at `path` as an in-memory array, without ever unpickling."""
    # Checked first: np.load takes whatever is neither zip nor .npy for a pickle, and says so.
    if not zipfile.is_zipfile(path):
        raise CheckpointError(f"{path}: not a zip/npz archive (truncated, or another format)")
    try:
        with np.load(path, allow_pickle=False) as z:
            members = {name: z[name] for name in z.files}
    except Exception as e:  # malformed input raises a zoo: BadZipFile, EOFError, ValueError, ...
        raise CheckpointError(f"{path}: unreadable {what} file: {type(e).__name__}: {e}") from e
    for name, a in members.items():
        if not isinstance(a, np.ndarray):
            raise CheckpointError(f"{path}: member {name!r} is not an .npy array")
    return members
