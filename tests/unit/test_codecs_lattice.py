"""SPEC 3.5 oracles 1-8 for the lattice quantizer, on the batched functions of
swarmnet.codecs.lattice and through the lattice codec."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from swarmnet.algorithms.averaging import swarm_interaction
from swarmnet.codecs import lattice
from swarmnet.codecs.lattice_codec import LatticeCodec
from swarmnet.codecs.rounding import RandomBits, seeded_bits16

pytestmark = pytest.mark.timeout(60)
FAST = settings(max_examples=20, deadline=None)
MODES = ["stochastic", "dither"]


def offsets_for(mode: str, shape, seed: int) -> torch.Tensor:
    if mode == "dither":
        return lattice.dither_offsets(seed, shape)
    return lattice.random_offsets(shape, "cpu", RandomBits(seed))


def quantize(x, eps, mode, seed):
    v = offsets_for(mode, x.shape, seed)
    k = lattice.quantize(x, eps, v)
    theta = lattice.dither(v) if mode == "dither" else None
    return k, theta, lattice.dequantize(k, eps, theta, out=torch.empty_like(x))


def pull(codec: LatticeCodec, enc, key: torch.Tensor, state: dict, limit: int = 12):
    """The runtime's side of the dialogue: plan, select, decode until complete."""
    out = torch.full_like(key, float("nan"))
    want, rounds, wants = codec.plan(state), 0, []
    while True:
        wants.append(want)
        meta, frames = codec.select(enc, want)
        res = codec.decode(meta, frames, key, out, state)
        rounds += 1
        if res.complete:
            return out, res, wants
        assert rounds < limit
        want = res.more


# ------------------------------------------------------------------- 1. unbiasedness


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(("eps", "offset"), [(0.25, 0.0), (2.0**-7, 1e4), (0.3, 1e4), (1.0, -3e6)])
def test_1_unbiased(mode, eps, offset) -> None:
    trials, d = 4000, 32
    # Seeded: each case is a fixed draw, whatever ran before it (at 4 sigma over 32 coordinates
    # about 3% of draws fail for the dither mode).
    g = torch.Generator().manual_seed(0)
    x = (torch.rand(d, dtype=torch.float64, generator=g) * 8 - 4) * eps + offset
    x = x.float()  # the values the codec sees; the oracle is E[Q(x)] = x for these
    xs = x.expand(trials, d).contiguous()
    if mode == "dither":  # one dither seed per encoding, as per snapshot
        v = torch.stack([lattice.dither_offsets(s, (d,)) for s in range(trials)])
    else:
        v = lattice.random_offsets((trials, d), "cpu", RandomBits(7))
    k = lattice.quantize(xs, eps, v)
    theta = lattice.dither(v) if mode == "dither" else None
    q = lattice.dequantize(k, eps, theta, out=torch.empty(trials, d, dtype=torch.float64))
    bias = (q.mean(0) - x.double()).abs().max().item() / eps
    sigma = 0.5 if mode == "stochastic" else 0.29
    assert bias <= 4 * sigma / math.sqrt(trials)


# ------------------------------------------------------------------- 2. max error


@FAST
@given(
    mode=st.sampled_from(MODES),
    e=st.integers(-20, 10),
    magnitude=st.sampled_from([0.0, 1.0, 1e4, 1e7]),
    seed=st.integers(0, 2**20),
)
def test_2_max_error_independent_of_norm(mode, e, magnitude, seed) -> None:
    eps = 2.0**e
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(500, generator=g) * 10 + magnitude) * eps
    _, _, q = quantize(x, eps, mode, seed)
    err = (q.double() - x.double()).abs() / eps
    if mode == "stochastic":
        assert err.max() < 1
    else:
        # float32 holds eps*(k + theta) to 24 bits: allow that rounding beyond eps/2.
        slack = (q.double().abs() * 2.0**-24 / eps).max()
        assert err.max() <= 0.5 + slack


# ------------------------------------------------------------------- 3. exact iff


@FAST
@given(
    mode=st.sampled_from(MODES),
    b=st.integers(1, 12),
    e=st.integers(-12, 4),
    seed=st.integers(0, 2**20),
)
def test_3_exact_iff_half_open_window(mode, b, e, seed) -> None:
    eps, h = 2.0**e, 2.0 ** (b - 1)
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(64, generator=g) * 400).float() * eps
    k, theta, _ = quantize(x, eps, mode, seed)
    # u - k on a quarter grid straddling both ends of [-h, h).
    delta = torch.arange(-4 * h - 8, 4 * h + 9, dtype=torch.float64)[:, None] / 4
    delta = delta[(delta.abs() >= h - 2).squeeze(1)]  # only near the window's edges
    key = ((k.double() + delta + (theta.double() if theta is not None else 0)) * eps).float()
    # The oracle is stated on u = key/eps - theta as the decoder forms it in float32 (exact for
    # stochastic keys here; dithered ones carry 17 fractional bits and may round).
    u = (key / eps - theta if theta is not None else key / eps).double()
    k_hat = lattice.decode(lattice.colour(k, b).expand_as(key).contiguous(), b, key, eps, theta)
    inside = (u - k >= -h) & (u - k < h)
    assert torch.equal(k_hat == k, inside)
    if theta is None:
        assert torch.equal(u - k, delta.expand_as(u))


@FAST
@given(mode=st.sampled_from(MODES), b=st.integers(2, 20), seed=st.integers(0, 2**20))
def test_3_sufficient_distance_always_exact(mode, b, seed) -> None:
    eps = 2.0**-9
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(300, generator=g) * 5
    k, theta, _ = quantize(x, eps, mode, seed)
    radius = (2 ** (b - 1) - 1) if mode == "stochastic" else (2 ** (b - 1) - 0.5)
    y = x + (torch.rand(300, generator=g) * 2 - 1) * radius * eps * 0.999
    assert torch.equal(lattice.decode(lattice.colour(k, b), b, y, eps, theta), k)


def test_3_reference_exact_fractions() -> None:
    # SPEC 3.5 item 3's reference numbers: at D/eps = 100, b=8 is always exact, b=7 about
    # 64 % and b=6 about 32 % of the coordinates.
    eps, d = 1.0, 20000
    x = torch.zeros(d)
    k, _, _ = quantize(x, eps, "stochastic", 1)
    y = x + (torch.rand(d, generator=torch.Generator().manual_seed(2)) * 2 - 1) * 100 * eps
    rates = {
        b: (lattice.decode(lattice.colour(k, b), b, y, eps) == k).double().mean().item()
        for b in (6, 7, 8)
    }
    assert rates[8] == 1.0
    assert rates[7] == pytest.approx(0.64, abs=0.03)
    assert rates[6] == pytest.approx(0.32, abs=0.03)


# ------------------------------------------------------------------- 4. prefix / monotonicity


@FAST
@given(
    width=st.sampled_from([1, 4, 8]), cols=st.sampled_from([8, 64, 200]), seed=st.integers(0, 2**20)
)
def test_4_prefix_planes_are_the_colour_and_exactness_is_monotone(width, cols, seed) -> None:
    eps = 2.0**-6
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, cols, generator=g) * 3
    k, _, _ = quantize(x, eps, "stochastic", seed)
    key = x + torch.randn(3, cols, generator=g) * 40 * eps
    planes = lattice.to_planes(k, width, 4)  # all 32 bits
    b_full = lattice.full_bits(k)
    exact_before = torch.zeros(3, cols, dtype=torch.bool)
    for b in range(width, 32, width):
        prefix = planes.clone()
        prefix[:, b // width :] = 0  # a reader that received planes 0..b-1 only
        r = lattice.from_planes(prefix, width, 4, torch.empty_like(k))
        assert torch.equal(r, lattice.colour(k, b))
        exact = lattice.decode(r, b, key, eps) == k
        assert torch.all(exact | ~exact_before)  # exact at b implies exact at b + width
        exact_before = exact
    for row in range(3):  # b_full planes decode without any key
        bf = int(b_full[row])
        r = lattice.colour(k[row], bf)
        sign_extended = torch.where(r >= 2 ** (bf - 1), r - 2**bf, r)
        assert torch.equal(sign_extended, k[row])


def test_4_b_full_matches_spec_formula() -> None:
    k = torch.tensor([[0, 0], [1, -1], [3, 0], [-4, 2], [2**30 - 1, 0]], dtype=torch.int32)
    assert lattice.full_bits(k).tolist() == [1, 2, 3, 4, 31]


# ------------------------------------------------------------------- 5. bits


@pytest.mark.parametrize("cols", [64, 100, 1000])
def test_5_bytes_per_plane_exact(cols) -> None:
    codec = LatticeCodec(chunk=256, width=1, seed=0)
    enc = codec.encode(torch.randn(cols))
    for b in (1, 3, 7):
        meta, frames = codec.select(enc, {"v": 1, "from": 0, "to": b})
        per_chunk = [math.ceil(min(256, cols - 256 * i) / 8) * min(b, meta["bf"][i]) for i in meta["ck"]]
        assert [memoryview(f).nbytes for f in frames] == [sum(per_chunk)]  # one frame, back to back


@pytest.mark.parametrize("distance", [3.0, 40.0, 1000.0])
def test_5_reader_policy_mean_planes_on_stationary_distance(distance) -> None:
    # Same sup-distance D every pull (fresh noise): after the first pull the reader asks for at
    # most b_min(D) + 1 planes on average, and the pulls stay exact.
    eps, d = 2.0**-8, 4096
    codec = LatticeCodec(chunk=1024, width=1, eps=eps, seed=3)
    g = torch.Generator().manual_seed(4)
    state: dict = {}
    bits = []
    x = torch.randn(d, generator=g)
    for step in range(12):
        x = x + torch.randn(d, generator=g) * 0.01
        enc = codec.encode(x)
        noise = torch.rand(d, generator=g) * 2 - 1
        key = enc.quantized + noise / noise.abs().max() * distance * eps
        out, res, _ = pull(codec, enc, key, state)
        assert torch.equal(out, enc.quantized)
        if step:
            bits.append(res.stats["bits_per_coord"])
    assert sum(bits) / len(bits) <= lattice.bits_needed(distance) + 1


def test_5_one_far_neighbour_does_not_set_the_first_request_to_a_new_one() -> None:
    # A neighbour with no history gets the bits recent accepted pulls from others needed: three
    # near neighbours (D <= 3) and then one far or hostile one (D = 10^5) leave it near the three;
    # decodes the runtime does not accept (nudges, screened-out models) do not count at all.
    eps, d = 2.0**-8, 4096
    codec = LatticeCodec(chunk=1024, width=1, eps=eps, seed=3)
    g = torch.Generator().manual_seed(5)
    enc = codec.encode(torch.randn(d, generator=g))
    for distance, accepted in ((3.0, True), (3.0, True), (3.0, True), (1e5, True), (1e5, False), (1e5, False)):
        noise = torch.rand(d, generator=g) * 2 - 1
        out, res, _ = pull(codec, enc, enc.quantized + noise / noise.abs().max() * distance * eps, {})
        assert torch.equal(out, enc.quantized)
        if accepted:
            codec.accepted(res.stats)
    assert codec.plan({})["to"] <= lattice.bits_needed(3.0) + 1 < lattice.bits_needed(1e5)


# ------------------------------------------------------------------- 6. failure detection


@FAST
@given(
    mode=st.sampled_from(MODES),
    width=st.sampled_from([1, 4, 8]),
    far=st.sampled_from([1e2, 1e4, 1e7]),
    seed=st.integers(0, 2**20),
)
def test_6_far_keys_are_detected_and_escalation_ends_exact(mode, width, far, seed) -> None:
    codec = LatticeCodec(chunk=128, width=width, mode=mode, seed=seed, first_bits=4)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(700, generator=g)
    enc = codec.encode(x)
    eps = 2.0 ** min(enc.meta["e"])
    key = x.clone()
    key[torch.rand(700, generator=g) < 0.02] += far * eps
    out, res, wants = pull(codec, enc, key, {})
    assert torch.equal(out, enc.quantized)  # never a wrong value, always ends exact
    if far >= 1e4:
        assert res.stats["failed_chunks"] > 0 and len(wants) > 1


def test_6_digest_rejects_every_wrong_decode() -> None:
    eps = 2.0**-4
    x = torch.randn(50, 256)
    k, _, _ = quantize(x, eps, "stochastic", 5)
    key = x + torch.randn(50, 256) * 30 * eps
    truth = lattice.chunk_hashes(k)
    for shift in (16, 8, 30):  # wrong by a multiple of 2^b that a narrower width would fold away
        bad = k.clone()
        bad[0, 0] += 1 << shift
        assert (
            lattice.chunk_hashes(bad)[:8] != truth[:8]
            and lattice.chunk_hashes(bad)[8:] == truth[8:]
        )
    for b in range(1, 10):
        k_hat = lattice.decode(lattice.colour(k, b), b, key, eps)
        got = lattice.chunk_hashes(k_hat)
        for row in range(50):
            same = torch.equal(k_hat[row], k[row])
            assert (got[8 * row : 8 * row + 8] == truth[8 * row : 8 * row + 8]) == same


# ------------------------------------------------------------------- 7. translation


@FAST
@given(
    mode=st.sampled_from(MODES),
    b=st.integers(2, 14),
    shift=st.integers(-(10**6), 10**6),
    seed=st.integers(0, 2**20),
)
def test_7_translation_by_lattice_vectors(mode, b, shift, seed) -> None:
    # float64 values on a 2^-20 grid, so that x + v*eps is exact for these shifts.
    eps = 2.0**-5
    g = torch.Generator().manual_seed(seed)
    x = torch.round(torch.randn(200, generator=g, dtype=torch.float64) * 2**20) / 2**20
    y = (
        x
        + torch.round(torch.randn(200, generator=g, dtype=torch.float64) * 3 * 2**20) * eps / 2**20
    )
    v = torch.randint(min(shift, 0), max(shift, 0) + 1, (200,), generator=g).double()
    offsets = offsets_for(mode, x.shape, seed)
    theta = lattice.dither(offsets) if mode == "dither" else None
    k = lattice.quantize(x, eps, offsets)
    k_moved = lattice.quantize(x + v * eps, eps, offsets)
    assert torch.equal(k_moved, k + v.to(k.dtype))
    k_hat = lattice.decode(lattice.colour(k, b), b, y, eps, theta)
    k_hat_moved = lattice.decode(lattice.colour(k_moved, b), b, y + v * eps, eps, theta)
    assert torch.equal(k_hat_moved, k_hat + v.to(k.dtype))


# ------------------------------------------------------------------- 8. mean preservation


@pytest.mark.parametrize("mode", MODES)
def test_8_symmetric_exchange_preserves_the_sum(mode) -> None:
    codec_i = LatticeCodec(chunk=512, mode=mode, seed=1)
    codec_j = LatticeCodec(chunk=512, mode=mode, seed=2)
    g = torch.Generator().manual_seed(0)
    c_i = torch.randn(1300, generator=g)
    c_j = c_i + torch.randn(1300, generator=g) * 1e-3
    for _ in range(3):  # a few interactions, each side decoding the other with its own key
        enc_i, enc_j = codec_i.encode(c_i), codec_j.encode(c_j)
        q_j_at_i, _, _ = pull(codec_i, enc_j, c_i, {})
        q_i_at_j, _, _ = pull(codec_j, enc_i, c_j, {})
        q_i, q_j = enc_i.quantized.double(), enc_j.quantized.double()
        assert torch.equal(q_j_at_i.double(), q_j) and torch.equal(q_i_at_j.double(), q_i)
        new_i, new_j = swarm_interaction(q_i, q_j_at_i.double(), torch.zeros_like(q_i))
        _, new_j = swarm_interaction(q_i_at_j.double(), q_j, torch.zeros_like(q_i))
        assert torch.equal(new_i + new_j, q_i + q_j)
        c_i, c_j = new_i.float(), new_j.float()


# ------------------------------------------------------------------- batched use and wire constants


def test_batched_functions_on_a_population() -> None:
    # The simulator's use: B models, per-model eps, per-model plane counts, one call each.
    bsz, d = 64, 500
    g = torch.Generator().manual_seed(9)
    x = torch.randn(bsz, d, generator=g)
    eps = 2.0 ** torch.randint(-10, -4, (bsz, 1), generator=g).float()
    v = lattice.random_offsets((bsz, d), "cpu", RandomBits(1))
    k = lattice.quantize(x, eps, v)
    key = x + torch.randn(bsz, d, generator=g) * eps * 50
    bits = torch.randint(3, 12, (bsz, 1), generator=g)
    k_hat = lattice.decode(lattice.colour(k, bits), bits, key, eps)
    u = key / eps
    h = 2.0 ** (bits - 1)
    assert torch.equal(k_hat == k, (u - k >= -h) & (u - k < h))
    assert torch.equal(lattice.dequantize(k, eps), (k * eps).float())
    assert lattice.bits_needed(torch.tensor([0.0, 1.0, 100.0])).tolist() == [2, 3, 8]
    x64 = x.double()
    k64 = lattice.quantize(x64, eps.double(), v)
    assert torch.equal(k64, k)  # float64 inputs take the same path


def test_wire_constants_are_pinned() -> None:
    # The dither stream and the digest are part of the wire format: a change breaks readers.
    assert seeded_bits16(12345, 4).tolist() == [int(v) for v in seeded_bits16((12345,), 4)]
    assert seeded_bits16((7, 3), 3).tolist() == PINNED_DITHER
    k = torch.arange(-8, 8, dtype=torch.int32).view(2, 8)
    assert lattice.chunk_hashes(k).hex() == PINNED_DIGEST
    assert np.array_equal(seeded_bits16(1, 1000)[:10], seeded_bits16(1, 10))


PINNED_DITHER = [3752, 1475, 2811]
PINNED_DIGEST = "a80b9c017b0a5d2343e675183c70e071"  # XXH3-64 (big-endian) of each int32 LE row


def test_5_an_abandoned_escalation_raises_the_next_first_request() -> None:
    """A pull cut short mid-escalation (the neighbour published past it, or it timed out) used
    to leave the next first request asking for the very planes that had just failed, so a reader
    whose escalations kept being cut short never merged. Now the failed chunks get at least one
    plane more, and the chunks it verified keep their new statistic."""
    eps, d = 2.0**-8, 4096
    codec = LatticeCodec(chunk=1024, width=1, eps=eps, seed=3)
    g = torch.Generator().manual_seed(6)
    x = torch.randn(d, generator=g)
    enc = codec.encode(x)
    state: dict = {}
    pull(codec, enc, enc.quantized + (torch.rand(d, generator=g) * 2 - 1) * eps, state)  # near: D <= 1
    near = codec.plan(state)["to"]
    state.pop("pull", None)
    far = enc.quantized.clone()
    far[:1024] += 200 * eps  # chunk 0 only: far beyond the planes the near history asks for
    out = torch.full_like(far, float("nan"))
    res = codec.decode(*codec.select(enc, codec.plan(state)), far, out, state)
    assert not res.complete and res.more["to"][0] > near[0]  # chunk 0 failed, the others verified
    again = codec.plan(state)["to"]  # the escalation is abandoned: a new pull starts
    assert again[0] >= near[0] + 1 and again[1:] == near[1:]
    out, res, _ = pull(codec, enc, far, state)
    assert torch.equal(out, enc.quantized)
