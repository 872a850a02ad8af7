"""DP-SGD's Gaussian noise (privacy.add_noise, kernels.add_normal): Philox against Random123's
known answers, the Box–Muller transform against numpy's float64 log, cos and sin from the same
words, the key and counter one to one, and the draws against the normal law: KS on the CDF, the
tails beyond 3, 4, 5 σ against the binomial, each tested at false-alarm rate 1e-6 with a fixed key.
(Share, thread and rank independence and the mean and variance: tests/test_privacy*.py.)"""
import math

import numpy as np
import pytest
from scipy import stats

from distnn import kernels, privacy

U32 = np.uint32
ALARM = 1e-6  # each statistical test's false-alarm rate (fixed keys: a pass is reproducible)
KEY = 0x0123456789ABCDEF_FEDCBA9876543210


@pytest.mark.parametrize("counter, key, expected", [  # Random123's kat_vectors, philox4x32_10
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
])
def test_philox_gives_random123s_known_answers(counter, key, expected):
    words = np.empty((4, 3), U32)
    kernels.philox_soa(words, counter[0] - 1 if counter[0] else 0, *map(U32, counter[1:]),
                       *map(U32, key))
    got = words[:, 1 if counter[0] else 0]
    assert [int(w) for w in got] == list(expected)


def reference_box_muller(words):
    """R cos θ, R sin θ in float64 by numpy's log, cos, sin from Philox words (4, m)."""
    w = words.astype(np.float64)
    u = ((w[0] + 1) * 2.0**-32 + w[1]) * 2.0**-32  # (W + 1) 2^-64, exact in float64's 53 bits
    r = np.sqrt(-2 * np.log(u))
    theta = ((words[3] >> 30).astype(np.float64)
             + ((words[3] & 0x3FFFFFFF) * 2.0**-30 + w[2] * 2.0**-62)) * (np.pi / 2)
    return r * np.cos(theta), r * np.sin(theta), r


def test_box_muller_matches_numpys_float64_transform_to_round_off():
    """float64: ~1e-16 relative (our log and sincos series against numpy's libm); float32 (its
    own shorter series in float32, two pairs a block, 32 more radius bits drawn only where they
    matter): within 2^-21 of the float64 transform of its 64-bit U, i.e. float32 rounding."""
    m = 1 << 16
    words = np.empty((4, m), U32)
    kernels.philox_soa(words, 0, U32(7), U32(1), U32(2), U32(3), U32(4))
    words[:, :4] = [[0, 0xFFFFFFFF, 0, 0xFFFFFFFF], [0, 0xFFFFFFFF, 0, 0xFFFFFFFF],
                    [0, 0, 0xFFFFFFFF, 5], [0, 0x40000000, 0x80000000, 0xFFFFFFFF]]  # extremes
    zc, zs, r = reference_box_muller(words)
    got = np.empty_like(zc), np.empty_like(zs)
    kernels._box_muller(words, *got)
    np.testing.assert_allclose(got[0], zc, rtol=0, atol=4e-15 * r.max())
    np.testing.assert_allclose(got[1], zs, rtol=0, atol=4e-15 * r.max())

    extra = np.empty((4, m // 2), U32)  # X of pair p: word p % 4 of block 2^31 + p // 4
    kernels.philox_soa(extra, 1 << 31, U32(7), U32(1), U32(2), U32(3), U32(4))
    pairs = np.stack([words[0], words[1], words[2], words[3]]).T.reshape(-1, 2)  # (W, angle)
    x = extra.T.reshape(-1)
    ref = np.stack([x, pairs[:, 0], np.zeros_like(x), pairs[:, 1]])  # as float64's words
    zc, zs, r = reference_box_muller(ref)
    got32 = np.empty((4, m), np.float32)
    kernels._box_muller32(words, got32)
    kernels._radius_tail(words, got32, 0, U32(7), U32(1), U32(2), U32(3), U32(4))
    z32 = got32.T.reshape(-1, 2)  # pair p = (2b + h): z[2h, b], z[2h + 1, b]
    assert np.sum(pairs[:, 0] < 1 << 20) > 10  # the redone radii are among them
    assert np.all(np.abs(z32[:, 0] - zc) <= 2.0**-21 * np.maximum(r, 1))
    assert np.all(np.abs(z32[:, 1] - zs) <= 2.0**-21 * np.maximum(r, 1))


def test_the_tail_reaches_the_64_bit_radius():
    """W = 0 (U = 2^-64) is the largest radius, √(128 ln 2) = 9.419, at angle 0: the tail is the
    normal's out to there (probability 4.5e-21 beyond), not cut at 32 bits' 6.66 (float32 draws
    its 64-bit U's low word where W < 2^20, so W = 0 lands past 6.66 too)."""
    words = np.zeros((4, 1), U32)
    zc, zs = np.empty(1), np.empty(1)
    kernels._box_muller(words, zc, zs)
    assert zc[0] == pytest.approx(math.sqrt(128 * math.log(2)), rel=1e-15) and zs[0] == 0
    z = np.empty((4, 1), np.float32)  # float32: W = 0 and the drawn X: past 32 bits' 6.66
    kernels._box_muller32(words, z)
    x = np.empty((4, 1), U32)
    kernels.philox_soa(x, 1 << 31, U32(0), U32(0), U32(0), U32(0), U32(0))
    kernels._radius_tail(words, z, 0, U32(0), U32(0), U32(0), U32(0), U32(0))
    r = math.sqrt(-2 * math.log((float(x[0, 0]) + 1) * 2.0**-64))
    assert z[0, 0] == pytest.approx(r, rel=1e-6) and z[1, 0] == 0 and r > 6.67


def test_every_bit_of_the_key_and_the_step_changes_the_noise():
    """The 128-bit key is Philox's key and two counter words, one to one: flipping any of its
    bits, or the step, gives other noise."""
    base = privacy.add_noise(np.zeros(64), 1.0, KEY, 5)
    for bit in (0, 31, 32, 63, 64, 95, 96, 127):
        assert not np.any(privacy.add_noise(np.zeros(64), 1.0, KEY ^ (1 << bit), 5) == base)
    assert not np.any(privacy.add_noise(np.zeros(64), 1.0, KEY, 6) == base)
    with pytest.raises(ValueError, match="step"):
        privacy.add_noise(np.zeros(4), 1.0, KEY, 2**32)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_noise_of_any_cut_and_thread_count_is_the_same_per_parameter(dtype):
    """Parameter i's noise is a function of (key, step, i): cuts at odd places (a Box–Muller pair
    split between shares) and any thread count give the whole vector's values, bit for bit."""
    n = 5 * privacy.BLOCK + 77
    whole = privacy.add_noise(np.zeros(n, dtype), 1.0, KEY, 9)
    for cuts in ([0, 1, n], [0, 3, 1025, 2 * privacy.BLOCK + 7, n - 1, n]):
        parts = [privacy.add_noise(np.zeros(b - a, dtype), 1.0, KEY, 9, start=a)
                 for a, b in zip(cuts, cuts[1:])]
        np.testing.assert_array_equal(np.concatenate(parts), whole)
    for threads in (2, 3, 7):
        np.testing.assert_array_equal(privacy.add_noise(np.zeros(n, dtype), 1.0, KEY, 9,
                                                        threads=threads), whole)


@pytest.fixture(scope="module", params=[np.float32, np.float64], ids=["float32", "float64"])
def draws(request):
    """2^24 draws: 16 steps of a 1,048,576-parameter net, in the dtype."""
    return np.concatenate([privacy.add_noise(np.zeros(1 << 20, request.param), 1.0, KEY, t)
                           for t in range(16)]).astype(np.float64)


def test_draws_follow_the_normal_cdf(draws):
    """Kolmogorov–Smirnov against Φ over 2^22 of the draws (detects a CDF error of ~1.3e-3; a
    sort of all 2^24 would cost seconds), and mean 0, variance 1 over all (standard errors
    2.4e-4, 3.5e-4)."""
    assert stats.kstest(draws[::4], "norm").pvalue > ALARM
    m = len(draws)
    assert 2 * stats.norm.sf(abs(draws.mean()) * math.sqrt(m)) > ALARM
    assert 2 * min(stats.chi2.sf((draws**2).sum(), m), stats.chi2.cdf((draws**2).sum(), m)) > ALARM


@pytest.mark.parametrize("k", [3, 4, 5])
def test_tails_beyond_k_sigma_are_the_normals(draws, k):
    """The count beyond ±kσ is Binomial(2^24, 2 Φ(−k)) (expected 45,300; 1,062; 9.6)."""
    m, p = len(draws), 2 * stats.norm.sf(k)
    count = int(np.sum(np.abs(draws) > k))
    tail = min(stats.binom.cdf(count, m, p), stats.binom.sf(count - 1, m, p))
    assert 2 * tail > ALARM, (count, m * p)
