"""Comm collectives, each body run on COMM_SELF (size 1, also under plain pytest) and on COMM_WORLD.

    mpiexec -n 2 python -m pytest --with-mpi -q tests/test_comm_mpi.py     (and -n 3)

Rank-dependent outcomes are combined across ranks (`everywhere`) before asserting, so a failure on
one rank fails the test on every rank instead of hanging the others at the next collective.
"""
import numpy as np
import pytest
from mpi4py import MPI

from distnn.comm import Comm, RankError
from distnn.exactsum import NonFiniteError, SignalGrid, exact_sum_serial, grid_sum_serial
from distnn.network import Network


@pytest.fixture(params=[MPI.COMM_SELF, pytest.param(MPI.COMM_WORLD, marks=pytest.mark.mpi(min_size=2))],
                ids=["self", "world"])
def raw(request):
    """The mpi4py communicator under test."""
    return request.param


@pytest.fixture(params=[None, 30.0], ids=["blocking", "watchdog"])
def comm(raw, request):
    """A Comm with small buckets (5 float64 / 10 float32 per bucket), with and without the watchdog."""
    comm = Comm(raw, timeout=request.param, bucket_bytes=40)
    yield comm
    comm.close()


def everywhere(raw, ok) -> bool:
    """True on every rank iff ok is true on every rank."""
    return raw.allreduce(bool(ok), op=MPI.LAND)


def same_bytes_everywhere(raw, array) -> bool:
    """True on every rank iff array has the same bytes on every rank."""
    return len(set(raw.allgather(array.tobytes()))) == 1


def raised(call):
    """The exception call() raised, or None."""
    try:
        call()
    except Exception as exc:  # noqa: BLE001 - the test inspects whatever came out
        return exc
    return None


class BadRow(ValueError):
    """A ValueError subclass, as data validation raises."""


class NeedsTwo(ValueError):
    """An error whose constructor takes more than a message."""

    def __init__(self, row, column):
        super().__init__(f"bad cell {row},{column}")


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int64])
def test_allreduce_sums_in_place_over_several_buckets(raw, comm, dtype):
    base = np.arange(37, dtype=dtype)  # 8 buckets of float64, the last one partial
    buf = (comm.rank + 1) * base
    assert comm.allreduce(buf) is None
    assert everywhere(raw, np.array_equal(buf, comm.size * (comm.size + 1) // 2 * base))
    assert same_bytes_everywhere(raw, buf)


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int64])
def test_a_shared_buffer_sums_in_rank_order_and_every_rank_gets_the_same_bits(raw, comm, dtype):
    # every rank of these tests runs on one node: buffer() hands out node shared memory there
    buf = comm.buffer(1001, dtype)
    assert everywhere(raw, comm.shares(buf) == (comm.size > 1) and not buf.any())
    rng = [np.random.default_rng(r) for r in range(comm.size)]
    for step in range(3):  # the same buffer again and again, as a trainer's step buffer
        values = [(g.standard_normal(1001) * 1e3).astype(dtype) for g in rng]
        buf[...] = values[comm.rank]
        comm.allreduce(buf, f"step {step}")
        expected = values[0].copy()
        for v in values[1:]:
            expected += v  # rank order, one rounding per addition
        assert everywhere(raw, buf.tobytes() == expected.tobytes())
    assert everywhere(raw, not comm.shares(np.zeros(3)))  # other arrays keep MPI's allreduce


def test_released_or_closed_shared_memory_is_given_back(raw, comm):
    buf = comm.buffer(64, np.float64)
    comm.release(buf)
    assert everywhere(raw, not comm.shares(buf) and comm.shared_nbytes == 0)
    comm.release(np.zeros(3))  # a plain array: nothing to give back
    kept = comm.buffer(64, np.float64)
    comm.close()
    assert everywhere(raw, not comm.shares(kept) and comm.shared_nbytes == 0)


def test_shared_memory_falls_back_to_plain_arrays_without_room(raw, monkeypatch):
    import distnn.comm.shared as shared
    comm = Comm(raw)
    monkeypatch.setattr(shared, "room_for", lambda nbytes: raw.rank != 0)  # one rank is short
    assert everywhere(raw, not comm.shares(comm.buffer(64, np.float32)))
    monkeypatch.setattr(shared, "room_for", lambda nbytes: True)
    monkeypatch.setattr(shared, "SHARED_TOTAL_BYTES", 2 * 64 * 4)  # room for one buffer
    first, second = comm.buffer(64, np.float32), comm.buffer(64, np.float32)
    assert everywhere(raw, comm.shares(first) == (comm.size > 1) and not comm.shares(second))
    comm.close()


def test_shared_memory_can_be_turned_off(raw):
    comm = Comm(raw, shared_memory=False)
    buf = comm.buffer(10, np.float64)
    buf[...] = comm.rank + 1
    comm.allreduce(buf)
    assert everywhere(raw, not comm.shares(buf) and (buf == comm.size * (comm.size + 1) / 2).all())
    comm.close()


@pytest.mark.parametrize("buf", [np.ones(8)[::2], np.ones((2, 4)), np.ones(4, np.float16), [1.0, 2.0]],
                         ids=["strided", "2-D", "float16", "list"])
def test_allreduce_refuses_what_it_cannot_reduce_in_place(comm, buf):
    with pytest.raises(TypeError, match="contiguous 1-D float32/float64/int64"):
        comm.allreduce(buf, "gradient")


def test_allreduce_max_takes_the_elementwise_max(raw, comm):
    def mine(r):
        return (-1.0) ** r * (r + 1) * np.arange(-4.0, 9.0)

    buf = mine(comm.rank)
    comm.allreduce_max(buf)
    assert everywhere(raw, np.array_equal(buf, np.max([mine(r) for r in range(comm.size)], axis=0)))


def test_bcast_copies_the_root_array_in_place(raw, comm):
    root = comm.size - 1
    buf = np.arange(23.0) if comm.rank == root else np.zeros(23)
    comm.bcast(buf, root)
    assert everywhere(raw, np.array_equal(buf, np.arange(23.0)))


def test_bcast_json_gives_every_rank_the_root_object(raw, comm):
    root = comm.size - 1
    sent = {"layers": (3, 5), "name": "ünïcode", "lr": 0.1, "extra": {"a": None}}
    got = comm.bcast_json(sent if comm.rank == root else {"ignored": 1}, root)
    # a JSON round trip on every rank, root included: the tuple arrives as a list everywhere
    assert everywhere(raw, got == {**sent, "layers": [3, 5]})


def test_any_is_a_logical_or_across_ranks(raw, comm):
    assert everywhere(raw, comm.any(comm.rank == comm.size - 1))
    assert everywhere(raw, not comm.any(False))


def test_check_agree_passes_on_equal_buffers(raw, comm):
    assert everywhere(raw, raised(lambda: comm.check_agree(np.linspace(0, 1, 50))) is None)


def test_check_agree_raises_on_every_rank_naming_the_ranks_that_differ(raw, comm):
    params = np.linspace(0, 1, 50)
    drifted = list(range(1, comm.size))
    if comm.rank in drifted:
        params[comm.rank] = np.nextafter(params[comm.rank], 2.0)  # one ulp of drift
    error = raised(lambda: comm.check_agree(params, "parameters after epoch 3"))
    if not drifted:  # size 1: nothing to disagree with
        assert error is None
        return
    assert everywhere(raw, isinstance(error, RankError))
    expected = f"ranks disagree on parameters after epoch 3: ranks {drifted} differ from rank 0"
    assert everywhere(raw, expected in str(error))
    assert len(set(raw.allgather(str(error)))) == 1


def test_fail_together_returns_when_no_rank_failed(raw, comm):
    assert everywhere(raw, raised(lambda: comm.fail_together(None)) is None)


def test_fail_together_raises_the_lowest_failing_rank_error_everywhere(raw, comm):
    first = comm.size // 2  # ranks first.. fail; size 1: rank 0 fails alone
    mine = BadRow(f"row {comm.rank} is ragged") if comm.rank >= first else None
    error = raised(lambda: comm.fail_together(mine))
    if mine is not None:
        assert everywhere(raw, error is mine)  # its own error, re-raised
    else:
        assert everywhere(raw, type(error) is BadRow and str(error) == f"rank {first}: row {first} is ragged")


def test_fail_together_falls_back_to_a_base_class_it_can_build(raw, comm):
    last = comm.size - 1
    mine = NeedsTwo(4, 2) if comm.rank == last else None
    error = raised(lambda: comm.fail_together(mine))
    expected = error is mine if comm.rank == last else (
        type(error) is ValueError and str(error) == f"rank {last}: bad cell 4,2")
    assert everywhere(raw, expected)


def chunks(dtype, n=7, m=40):
    """(n, m) chunk sums of mixed signs over 40 decades, identical on every rank."""
    rng = np.random.default_rng(5)
    return (rng.standard_normal((n, m)) * 10.0 ** rng.integers(-20, 20, size=m)).astype(dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_exact_sum_equals_the_serial_sum_in_bits_for_any_split(raw, comm, dtype):
    rows = chunks(dtype)
    expected = exact_sum_serial(rows)
    rng = np.random.default_rng(6)  # same splits on every rank
    splits = [np.sort(rng.integers(0, len(rows) + 1, size=comm.size - 1)) for _ in range(5)]
    splits.append(np.zeros(comm.size - 1, int))  # everything on the last rank, the others own none
    for cuts in splits:
        bounds = [0, *cuts, len(rows)]
        mine = rows[bounds[comm.rank]:bounds[comm.rank + 1]]
        got = comm.exact_sum(mine, len(rows))
        assert everywhere(raw, got.dtype == dtype and got.tobytes() == expected.tobytes())


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_grid_sum_in_shared_memory_has_the_bits_of_the_serial_grid_sum(dtype, monkeypatch):
    """Deterministic mode's shared-memory path: each rank rounds its blocks of every rank's chunks."""
    monkeypatch.setattr(SignalGrid, "BLOCK", 16)  # many blocks, split unevenly between the ranks
    raw = MPI.COMM_WORLD
    net = Network([6, 9, 4], activation="tanh", dtype=dtype, seed=3)
    rng = np.random.default_rng(7)  # the same chunks on every rank
    rows, bounds, c = np.empty((7, net.n_params), dtype), 0, 5
    for i in range(len(rows)):
        X = (rng.standard_normal((c, 6)) * 10.0 ** rng.integers(-3, 4, size=6)).astype(dtype)
        net.grad_sum(X, net.check_targets(rng.integers(0, 4, c)), rows[i], divisor=35)
        bounds = np.maximum(bounds, net.last_signal_maxabs(X))
    shapes = [w.shape for w in net.weights]
    expected = grid_sum_serial(rows, bounds, shapes, c)
    grid = SignalGrid(bounds, shapes, c, len(rows))
    comm = Comm(raw)
    buf = comm.buffer(net.n_params, dtype, rows=len(rows))
    assert everywhere(raw, comm.shares(buf) and buf.shape == (len(rows), net.n_params))
    for cuts in ([0] * (raw.size - 1), np.sort(rng.integers(0, len(rows) + 1, raw.size - 1))):
        owned = [0, *cuts, len(rows)]  # rank r holds chunks owned[r]:owned[r + 1]
        counts = np.diff(owned).tolist()
        buf[:counts[raw.rank]] = rows[owned[raw.rank]:owned[raw.rank + 1]]
        out = np.full(net.n_params, np.nan, dtype)
        comm.grid_sum(buf, counts, grid, out)
        assert everywhere(raw, out.tobytes() == expected.tobytes())
    comm.close()


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_a_shared_window_sums_each_ranks_slice_and_every_rank_collects_every_slice(dtype):
    """The named steps of a sharded update: each rank sums its slice (the bits of the plain
    shared sum), posts a note, works on its slice; after a fence every rank reads them all."""
    raw = MPI.COMM_WORLD
    comm = Comm(raw)
    buf = comm.buffer(1000, dtype, sharded=True)
    window = comm.window(buf)
    rows = np.random.default_rng(3).normal(size=(raw.size, 1000)).astype(dtype)
    buf[...] = rows[raw.rank]
    expected = comm.buffer(1000, dtype)  # the plain shared sum, in rank order too
    expected[...] = rows[raw.rank]
    comm.allreduce(expected)
    cuts = window.cuts  # the slices tile the buffer, in rank order
    assert cuts[0] == 0 and cuts[-1] == 1000 and all(a <= b for a, b in zip(cuts, cuts[1:]))
    lo, hi = cuts[raw.rank], cuts[raw.rank + 1]
    window.fence("test")
    window.sum_slice(lo, hi)
    window.post(True, raw.rank + 1.0)
    window.slot[lo:hi] *= 2  # what the others collect
    window.fence("test")
    seen = np.full(1000, np.nan, dtype)
    window.collect(seen, cuts)
    assert everywhere(raw, seen.tobytes() == (2 * expected).tobytes())
    assert everywhere(raw, window.notes() == [(True, p + 1.0) for p in range(raw.size)])
    comm.close()


def test_exact_sum_stops_every_rank_on_a_non_finite_chunk(raw, comm):
    rows = chunks(np.float64, n=comm.size)
    if comm.rank == comm.size - 1:
        rows[comm.rank, 3] = np.nan
    error = raised(lambda: comm.exact_sum(rows[comm.rank:comm.rank + 1], comm.size))
    assert everywhere(raw, isinstance(error, NonFiniteError) and "first at index 3" in str(error))


def test_local_ranks_counts_the_ranks_on_this_host(raw, comm):
    hosts = raw.allgather(MPI.Get_processor_name())
    assert everywhere(raw, comm.local_ranks() == hosts.count(hosts[comm.rank]))


class SizeOne:
    """A communicator that only knows its rank and size: any MPI call on it fails."""

    def Get_rank(self):
        return 0

    def Get_size(self):
        return 1


@pytest.mark.parametrize("timeout", [None, 1.0])
def test_size_one_makes_no_mpi_call(timeout):
    comm = Comm(SizeOne(), timeout=timeout, bucket_bytes=8)
    buf = np.arange(5.0)
    comm.allreduce(buf)
    comm.allreduce_max(buf)
    comm.bcast(buf)
    comm.barrier()
    comm.check_agree(buf)
    assert buf.tolist() == [0.0, 1.0, 2.0, 3.0, 4.0]
    assert comm.bcast_json({"a": (1,)}) == {"a": [1]}
    assert comm.any(True) and not comm.any(False)
    assert comm.exact_sum(np.ones((3, 2)), 3).tolist() == [3.0, 3.0]
    assert comm.local_ranks() == 1 and comm.is_root


def test_abort_at_size_one_exits_with_the_code_and_message(capsys):
    with pytest.raises(SystemExit) as exit_info:
        Comm(SizeOne()).abort(4, "distnn: stopping")
    assert exit_info.value.code == 4
    assert capsys.readouterr().err == "distnn: stopping\n"


@pytest.mark.parametrize("options", [{"timeout": 0}, {"timeout": -1.0}, {"bucket_bytes": 4}])
def test_constructor_refuses_bad_options(options):
    with pytest.raises(ValueError, match="timeout|bucket_bytes"):
        Comm(SizeOne(), **options)
