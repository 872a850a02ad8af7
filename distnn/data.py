"""Data for training: checks and checksums, class labels, the train/validation split, per-epoch
order, sharding and standardization. Loading is sources.py's (`load`, `Dataset`, `DataError` are
re-exported here).

Everything here is a plain function of (n, seed, epoch, size, rank): every rank computes the same
permutation and the same batch boundaries, then reads only its own rows. No MPI in this module.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np

from . import exactsum
from .sources import DataError, Dataset, load  # noqa: F401  (loading's public names, here too)


# ------------------------------------------------------------------------------ checks, labels

BLOCK_BYTES = 8 << 20  # rows of X read at a time when streaming: memory stays flat however wide


def _block_rows(X, block):
    """Rows per streamed block: `block` if given, else about BLOCK_BYTES of X."""
    row_bytes = max(1, X.dtype.itemsize * int(np.prod(X.shape[1:])))  # a sequence is one row
    return block or max(1, BLOCK_BYTES // row_bytes)


def check_finite(X, rows=None, *, name: str = "X", block: int | None = None) -> None:
    """Raise DataError naming the first NaN/Inf ("X row 12, column 3 is NaN"); streams in blocks.

    `rows` is None (all rows) or an array of row indices; row numbers in the message are 0-based
    indices into X. Integer arrays are finite by construction and are not read.
    """
    if X.dtype.kind != "f":
        return
    n = X.shape[0] if rows is None else len(rows)
    block = _block_rows(X, block)
    for lo in range(0, n, block):
        hi = min(lo + block, n)
        part = np.asarray(X[lo:hi] if rows is None else X[np.asarray(rows[lo:hi])])
        index = np.arange(lo, hi) if rows is None else np.asarray(rows[lo:hi])
        _refuse_non_finite(part, index, name)


def _refuse_non_finite(part, index, name, lengths=None) -> None:
    """DataError naming the first NaN/Inf of the block `part`, whose row i is row index[i]; of
    sequences (3-D) with `lengths` (those of index), only in the steps that exist (padding may
    hold anything: nothing reads it)."""
    if part.dtype.kind != "f":
        return
    bad = ~np.isfinite(part)
    if lengths is not None and part.ndim == 3:
        bad &= alive(lengths, *part.shape[:2])[:, :, None]
    if bad.any():
        where = np.argwhere(bad)[0]
        value = part[tuple(where)]
        what = "NaN" if np.isnan(value) else ("inf" if value > 0 else "-inf")
        col = (f", step {where[1]}, feature {where[2]}" if part.ndim == 3 else
               f", column {where[1]}" if part.ndim == 2 else "")
        raise DataError(f"{name} row {int(index[where[0]])}{col} is {what}")


def scan(X, rank=0, size=1, *, name: str = "X", lengths=None) -> np.ndarray:
    """Check a rank's share of X is finite and checksum it in the same read, block by block
    (sequences with `lengths`: finite where their steps exist).

    Returns (blocks,) int64: the crc32 of each block this rank read and 0 for the others', so the
    SUM over ranks holds every block's crc32. Blocks depend on X alone, not on the rank count."""
    block = _block_rows(X, None)
    crcs = np.zeros(max(1, -(-X.shape[0] // block)), np.int64)
    first, last = chunk_range(len(crcs), size, rank)
    for j in range(first, last):
        lo, hi = j * block, min((j + 1) * block, X.shape[0])
        part = np.ascontiguousarray(X[lo:hi])
        _refuse_non_finite(part, np.arange(lo, hi), name,
                           None if lengths is None else lengths[lo:hi])
        crcs[j] = zlib.crc32(part)
    return crcs


def fingerprint(ds: Dataset, classes, crcs) -> dict:
    """What identifies the training data cheaply: shape, class labels, and a crc32 over the
    blocks' crc32s (scan, summed over ranks) and the targets, without a second read of X."""
    y = np.ascontiguousarray(ds.y)
    crc = zlib.crc32(y, zlib.crc32(np.ascontiguousarray(crcs, "<i8")))
    found = {"rows": int(ds.X.shape[0]), "features": int(ds.X.shape[-1])}
    if ds.X.ndim == 3:  # sequences: their steps and lengths too (a dense run's keeps its keys)
        found["steps"] = int(ds.X.shape[1])
        if ds.lengths is not None:
            crc = zlib.crc32(np.ascontiguousarray(ds.lengths, "<i8"), crc)
    return found | {"classes": None if classes is None else classes.tolist(),
                    "crc32": f"{crc:#010x}"}


def fingerprint_changes(before: dict, now: dict) -> list[str]:
    """What differs between two fingerprints, in words ("rows 120 there, 119 here")."""
    def brief(v):
        return _names_in_brief(v) if isinstance(v, list) else v
    differ = [f"{k} {brief(before.get(k))} there, {brief(now[k])} here"
              for k in ("rows", "features", "steps", "classes") if before.get(k) != now.get(k)]
    if not differ and before.get("crc32") != now["crc32"]:
        differ.append(f"the same shape but other content (crc32 {before.get('crc32')} there, "
                      f"{now['crc32']} here)")
    return differ


def _names_in_brief(items, shown=6) -> str:
    more = f", ... ({len(items)} in all)" if len(items) > shown else ""
    return "[" + ", ".join(map(repr, items[:shown])) + more + "]"


def encode_labels(y, *, name: str = "labels") -> tuple[np.ndarray, np.ndarray]:
    """(codes int64 in 0..K-1, classes sorted) so that classes[codes] == y; NaN/Inf is no class."""
    y = np.asarray(y)
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1:
        raise DataError(f"{name}: class labels must be one column, got shape {y.shape}")
    try:
        _refuse_non_finite(y, np.arange(len(y)), name)
    except DataError as e:
        raise DataError(f"{e}; class labels must be finite numbers or strings") from None
    if y.dtype.kind == "f":
        fractional = np.flatnonzero(y != np.round(y))
        if len(fractional):
            i = int(fractional[0])
            raise DataError(f"{name}: row {i} holds {y[i].item()!r}, not a class label; class "
                            f"labels are whole numbers or strings (a continuous target needs "
                            f"model.family = \"gaussian\")")
    classes, codes = np.unique(y, return_inverse=True)
    return codes.reshape(-1).astype(np.int64), classes


# ------------------------------------------------------------------ splits, order and sharding

def train_val_split(n: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, val) sorted row indices, round(n * val_fraction) for validation, from the seed.

    Sorted so memory-mapped reads go forward. The split uses its own random stream (spawn key 1),
    distinct from every epoch_permutation stream.
    """
    if not 0 <= val_fraction < 1:
        raise DataError(f"val_fraction: expected 0 <= value < 1, got {val_fraction}")
    n_val = min(int(round(n * val_fraction)), max(n - 1, 0))
    perm = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(1,))).permutation(n)
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


def epoch_permutation(seed: int, epoch: int, n: int) -> np.ndarray:
    """Sample order of one epoch, the same on every rank and recomputable on resume."""
    return np.random.default_rng([seed, epoch]).permutation(n)


def batches(n: int, batch_size: int) -> list[tuple[int, int]]:
    """[start, stop) of each global batch of an epoch of n samples; the last may be short."""
    return [(lo, min(lo + batch_size, n)) for lo in range(0, n, batch_size)]


def shard(start: int, stop: int, size: int, rank: int) -> tuple[int, int]:
    """Rank's contiguous part of [start, stop); sizes differ by <= 1, earlier ranks larger."""
    if not 0 <= rank < size:
        raise ValueError(f"rank {rank} is outside 0..{size - 1}")
    q, r = divmod(stop - start, size)
    lo = start + rank * q + min(rank, r)
    return lo, lo + q + (rank < r)


def chunk_range(n_chunks: int, size: int, rank: int) -> tuple[int, int]:
    """[first, stop) of the whole chunks a rank owns, split as in `shard`."""
    return shard(0, n_chunks, size, rank)


# ----------------------------------------------------------------------------------- sequences

def alive(lengths, n: int, steps: int) -> np.ndarray:
    """(n, steps) bool: which steps of each sequence exist (t < its length; all without lengths)."""
    if lengths is None:
        return np.ones((n, steps), bool)
    return np.arange(steps) < np.asarray(lengths)[:, None]


def encode_step_labels(y, lengths, *, name: str = "labels") -> tuple[np.ndarray, np.ndarray]:
    """encode_labels for a label per step, y (N, T) (or (N, T, 1)): (codes (N, T) int64, classes)
    from the steps that exist; padded steps, whatever they hold (NaN, -1), get code 0 and never
    make a class."""
    y = np.asarray(y)
    if y.ndim == 3 and y.shape[2] == 1:
        y = y[:, :, 0]
    if y.ndim != 2:
        raise DataError(f"{name}: class labels per step must be (N, T), got shape {y.shape}")
    there = alive(lengths, *y.shape)
    codes = np.zeros(y.shape, np.int64)
    codes[there], classes = encode_labels(y[there], name=f"{name} (at the steps that exist)")
    return codes, classes


def zero_padding(y, lengths) -> np.ndarray:
    """Targets per step (N, T) or (N, T, K) with the padded steps set to 0 (a copy if any): nothing
    there is scored, and a NaN there must not fail a check meant for the steps that exist."""
    if lengths is None:
        return y
    gone = ~alive(lengths, *y.shape[:2])
    if not gone.any() or y.dtype.kind not in "biuf":
        return y
    y = np.array(y)
    y[gone] = 0
    return y


class Steps:
    """The steps that exist of sequences `rows` of X (N, T, d), as the rows of a 2-D array (M, d):
    what Standardizer.fit reads, so that padded steps count for nothing. Indexing reads X."""

    def __init__(self, X, rows, lengths=None):
        rows = np.arange(X.shape[0]) if rows is None else np.asarray(rows)
        counts = (np.full(len(rows), X.shape[1]) if lengths is None
                  else np.asarray(lengths)[rows].astype(np.int64))
        self.X = X
        self.seq = np.repeat(rows, counts)                       # (M,) sequence of each step
        starts = np.repeat(np.cumsum(counts) - counts, counts)
        self.t = np.arange(len(self.seq)) - starts               # (M,) its step
        self.shape, self.ndim, self.dtype = (len(self.seq), X.shape[2]), 2, X.dtype

    def __len__(self):
        return len(self.seq)

    def __getitem__(self, idx):
        return self.X[self.seq[idx], self.t[idx]]


# ----------------------------------------------------------------------------- standardization

SCALER_CHUNK = 4096  # rows per standardization chunk: moments are summed exactly over chunks


def _serial_exact_sum(rows, n_chunks):
    return exactsum.exact_sum_serial(rows)  # one rank holds all n_chunks rows


@dataclass
class Standardizer:
    """Per-feature (x - mean) / scale; scale is the std with 0 replaced by 1 (constant features)."""

    mean: np.ndarray    # (d,) float64
    scale: np.ndarray   # (d,) float64

    @staticmethod
    def moments(X, rows=None, block: int | None = None, shift=None) -> np.ndarray:
        """(2d+1,) float64 [count, sum(x - shift), sum((x - shift)^2)] over rows, in blocks.

        Shifting by a value near the data (default X[0], the same on every rank) avoids the
        cancellation of sumsq/n - mean^2 for features with a large offset, and makes a constant
        feature's variance exactly 0. Moments of row blocks add up to the moments of their union.
        """
        d = X.shape[1]
        shift = np.asarray(X[0] if shift is None else shift, dtype=np.float64)
        m = np.zeros(2 * d + 1)
        n = X.shape[0] if rows is None else len(rows)
        block = _block_rows(X, block)
        for lo in range(0, n, block):
            hi = min(lo + block, n)
            part = np.asarray(X[lo:hi] if rows is None else X[np.asarray(rows[lo:hi])])
            z = part.astype(np.float64) - shift          # (rows, d)
            m[0] += hi - lo
            m[1:d + 1] += z.sum(axis=0)
            m[d + 1:] += np.einsum("ij,ij->j", z, z)
        return m

    @classmethod
    def from_moments(cls, count, sum_, sumsq, shift=0.0) -> "Standardizer":
        """From [count, sum, sumsq] of (x - shift), e.g. after ranks allreduce their moments."""
        if not count > 0:
            raise DataError("cannot standardize: no training rows")
        mu = np.asarray(sum_, dtype=np.float64) / count
        var = np.maximum(np.asarray(sumsq, dtype=np.float64) / count - mu * mu, 0.0)  # round-off
        std = np.sqrt(var)
        return cls(mean=mu + shift, scale=np.where(std == 0, 1.0, std))

    @classmethod
    def fit(cls, X, rows=None, *, rank=0, size=1, exact_sum=None) -> "Standardizer":
        """Fit on `rows` of X (all by default), the same bits for every rank count.

        The rows are cut into chunks of SCALER_CHUNK; rank `rank` of `size` reads its chunks
        (chunk_range) and their moments are summed exactly by `exact_sum(moments, n_chunks)`, the
        cross-rank sum (Comm.exact_sum; by default, on one rank, exactsum.exact_sum_serial)."""
        if exact_sum is None:
            if size != 1:
                raise ValueError(f"a fit on {size} ranks needs their exact_sum")
            exact_sum = _serial_exact_sum
        d = X.shape[1]
        shift = np.asarray(X[0], np.float64)
        n = X.shape[0] if rows is None else len(rows)
        n_chunks = max(1, -(-n // SCALER_CHUNK))
        first, last = chunk_range(n_chunks, size, rank)
        moments = np.zeros((last - first, 2 * d + 1))  # one chunk's [count, sum, sumsq] per row
        for i, j in enumerate(range(first, last)):
            lo, hi = j * SCALER_CHUNK, min((j + 1) * SCALER_CHUNK, n)
            chunk = np.arange(lo, hi) if rows is None else rows[lo:hi]
            moments[i] = cls.moments(X, chunk, shift=shift)
        try:
            m = exact_sum(moments, n_chunks)
        except exactsum.NonFiniteError:  # the same verdict on every rank: the check follows the MAX
            raise DataError("X has values too large to standardize (their squares overflow, |x| > "
                            "1e154); rescale the data or set data.standardize = false") from None
        return cls.from_moments(m[0], m[1:d + 1], m[d + 1:], shift)

    def transform(self, X, out=None) -> np.ndarray:
        """(X - mean) / scale in X's float dtype (float64 for integer X); `out` may be X itself."""
        dt = X.dtype if X.dtype.kind == "f" else np.float64
        out = np.subtract(X, self.mean.astype(dt), out=out, dtype=dt)
        return np.divide(out, self.scale.astype(dt), out=out)

    def to_arrays(self) -> dict:
        """{"mean", "scale"} arrays, for a checkpoint or model file."""
        return {"mean": self.mean, "scale": self.scale}

    @classmethod
    def from_arrays(cls, d) -> "Standardizer":
        """Inverse of to_arrays."""
        return cls(mean=np.asarray(d["mean"], dtype=np.float64),
                   scale=np.asarray(d["scale"], dtype=np.float64))
