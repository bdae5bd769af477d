"""The fused CPU loops of the lossy codecs give bit for bit what the torch passes give (those
serve accelerators, so a CPU peer and a GPU peer must agree), and the codecs built on them keep
their guarantees: unbiased private rounding, exact decodes across the two paths. (The blockwise
codecs' error bounds and unbiasedness on both paths are in test_codecs_basic.py.)"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from swarmnet.codecs import bitplanes, blockwise, kernels, lattice, make_codec
from swarmnet.codecs.lattice_codec import LatticeCodec

pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.skipif(not kernels.usable(torch.empty(0)), reason="numba is not installed"),
]
FAST = settings(max_examples=25, deadline=None)


def rows_of(seed: int, rows: int, cols: int, scale: float) -> torch.Tensor:
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)) * scale


def pow2(e: list[int]) -> torch.Tensor:
    return torch.ldexp(torch.ones(len(e), 1), torch.tensor(e)[:, None])


@FAST
@given(seed=st.integers(0, 2**20), rows=st.integers(1, 5), cols=st.integers(1, 300))
def test_max_abs_matches_and_flags_non_finite_rows(seed, rows, cols) -> None:
    x = rows_of(seed, rows, cols, 3.0)
    assert torch.equal(kernels.max_abs(x), torch.maximum(x.amax(1), x.amin(1).neg()))
    bad = x.clone()
    bad[0, seed % cols] = [math.inf, -math.inf, math.nan][seed % 3]
    assert kernels.max_abs(bad)[0] == math.inf
    assert torch.equal(kernels.max_abs(bad)[1:], kernels.max_abs(x)[1:])


@FAST
@given(
    seed=st.integers(0, 2**20),
    rows=st.integers(1, 4),
    cols=st.integers(1, 200),
    e=st.integers(-20, 4),
    magnitude=st.sampled_from([1e-3, 1.0, 1e4, 3e8]),
    dither=st.booleans(),
)
def test_quantize_with_given_offsets_is_the_torch_result(
    seed, rows, cols, e, magnitude, dither
) -> None:
    x = rows_of(seed, rows, cols, magnitude)
    e_rows = [e + (i % 2) for i in range(rows)]
    eps = pow2(e_rows)
    bound = float((x / eps).abs().max())
    if not bound < lattice.INT64_SAFE:
        return
    v = torch.randint(0, 1 << 16, (rows, cols), generator=torch.Generator().manual_seed(seed + 1))
    v = v.to(torch.int32)
    want_k = lattice.quantize(x, eps, v)
    want_q = lattice.dequantize(want_k, eps, lattice.dither(v) if dither else None)
    k, q = torch.empty_like(want_k), torch.empty_like(x)
    kernels.quantize(x, e_rows, k, q, offsets=v, dither=dither)
    assert torch.equal(k, want_k)
    assert torch.equal(q, want_q)


def test_private_offsets_round_without_bias_and_depend_on_the_seed() -> None:
    x = rows_of(3, 2, 4000, 1.0)
    e = [-3, -3]
    eps = 2.0**-3
    k, q = torch.empty(2, 4000, dtype=torch.int32), torch.empty_like(x)
    total = torch.zeros_like(x, dtype=torch.float64)
    draws = 200
    for s in range(draws):
        kernels.quantize(x, e, k, q, seed=(s, 0))
        assert (q - x).abs().max() < eps
        total += q.double()
    # Per coordinate the error has mean 0 and standard deviation <= eps/2: each coordinate's
    # mean over 200 draws lies within 5 standard errors (the largest of 8000 is about 4), and
    # so does the mean over all of them.
    bias = total / draws - x.double()
    assert bias.abs().max() < 5 * (eps / 2) / math.sqrt(draws)
    assert abs(float(bias.mean())) < 5 * (eps / 2) / math.sqrt(draws * x.numel())
    first = q.clone()
    kernels.quantize(x, e, k, q, seed=(draws - 1, 0))
    assert torch.equal(q, first), "the same seed rounds the same way"
    kernels.quantize(x, e, k, q, seed=(draws - 1, 1))
    assert not torch.equal(q, first), "another chunk index draws other offsets"


@FAST
@given(
    seed=st.integers(0, 2**20),
    rows=st.integers(1, 3),
    cols=st.integers(1, 300),
    e=st.integers(-22, 0),
    wide=st.booleans(),
    data=st.data(),
)
def test_quantize_packs_each_row_as_the_bitplanes_layout(seed, rows, cols, e, wide, data) -> None:
    """The planes quantize packs are bitplanes.pack of the k it returns, up to each row's bits
    rounded to whole bytes, padding columns zero, the planes above untouched."""
    x = rows_of(seed, rows, cols, 2.0**20)
    dtype = torch.int64 if wide else torch.int32
    if not wide:
        e = max(e, -7)  # |x| / eps (up to about 2^29) stays within int32
    pad = -(-cols // 8) * 8
    stored = 8 * (8 if wide else 4)
    bits = data.draw(st.lists(st.integers(0, stored), min_size=rows, max_size=rows))
    k = torch.full((rows, pad), -1, dtype=dtype)
    planes = torch.full((rows, stored, pad // 8), 0xAB, dtype=torch.uint8)
    v = torch.randint(0, 1 << 16, (rows, cols), generator=torch.Generator().manual_seed(seed))
    v = v.to(torch.int32)
    q = torch.empty_like(x)
    kernels.quantize(x, [e] * rows, k, q, offsets=v, planes_RSP=planes, bits_R=bits)
    assert torch.equal(k[:, :cols], lattice.quantize(x, pow2([e] * rows), v).to(dtype))
    assert not k[:, cols:].any()
    want = bitplanes.pack(k, 1, stored // 8).view(rows, stored, pad // 8)
    for r, b in enumerate(bits):
        top = 8 * -(-b // 8)
        assert torch.equal(planes[r, :top], want[r, :top])
        assert (planes[r, top:] == 0xAB).all()


@FAST
@given(
    seed=st.integers(0, 2**20),
    rows=st.integers(1, 3),
    eighths=st.integers(1, 40),
    nbytes=st.integers(1, 8),
)
def test_unpack_reads_the_bitplanes_layout(seed, rows, eighths, nbytes) -> None:
    dtype = torch.int32 if nbytes <= 4 else torch.int64
    info = torch.iinfo(dtype)
    g = torch.Generator().manual_seed(seed)
    k = torch.randint(info.min, info.max, (rows, 8 * eighths), generator=g, dtype=dtype)
    planes = bitplanes.pack(k, 1, nbytes)
    back, want = torch.empty_like(k), torch.empty_like(k)
    kernels.unpack(planes.clone(), 8 * nbytes, back)
    bitplanes.unpack(planes.clone(), 1, nbytes, want)
    assert torch.equal(back, want)


@FAST
@given(
    seed=st.integers(0, 2**20),
    rows=st.integers(1, 4),
    cols=st.integers(1, 300),
    b=st.integers(2, 30),
    spread=st.sampled_from([0.5, 10.0, 1e3, 1e7]),
    dither=st.booleans(),
)
def test_nearest_is_lattice_decode_with_its_window_statistics(
    seed, rows, cols, b, spread, dither
) -> None:
    g = torch.Generator().manual_seed(seed)
    e_rows = [-6 + (i % 3) for i in range(rows)]
    eps = pow2(e_rows)
    x = torch.randn(rows, cols, generator=g)
    v = torch.randint(0, 1 << 16, (rows, cols), generator=g).to(torch.int32)
    theta = lattice.dither(v) if dither else None
    k = lattice.quantize(x, eps, v)
    key = x + (torch.rand(rows, cols, generator=g) * 2 - 1) * spread * eps
    bits = [b] * rows
    keyless = [i == 1 for i in range(rows)]  # row 1 decodes by sign extension alone
    r = lattice.colour(k, b)
    k_hat = torch.empty_like(k)
    dmax, dmin = kernels.nearest(r, key, e_rows, keyless, bits, k_hat, theta=theta)
    key_or_zero = key.clone()
    key_or_zero[torch.tensor(keyless)] = 0.0
    u_theta = None if theta is None else torch.where(torch.tensor(keyless)[:, None], 0.0, theta)
    want = lattice.decode(r, b, key_or_zero, eps, u_theta)
    assert torch.equal(k_hat, want)
    u = key_or_zero / eps - (0 if u_theta is None else u_theta)
    d = want.to(torch.int64) - (torch.floor(u).to(torch.int64) + 1 - 2 ** (b - 1))
    assert dmax.tolist() == d.amax(1).tolist()
    assert dmin.tolist() == d.amin(1).tolist()


def test_nearest_survives_keys_that_are_not_finite_or_far_out() -> None:
    r = torch.zeros(1, 4, dtype=torch.int32)
    key = torch.tensor([[math.nan, math.inf, -math.inf, 1e38]])
    k_hat = torch.empty_like(r)
    kernels.nearest(r, key, [-10], [False], [8], k_hat)  # any value; the digest judges it
    assert k_hat.dtype == torch.int32


def test_dequantize_writes_only_rows_with_a_destination() -> None:
    k = torch.tensor([[1, -2], [3, 4], [5, 6]], dtype=torch.int32)
    out = torch.full((3, 2), -7.0)
    kernels.dequantize(k, [0, -1, 1], [2, -1, 0], out)
    assert out.tolist() == [[10.0, 12.0], [-7.0, -7.0], [1.0, -2.0]]
    theta = torch.full((3, 2), 0.25)
    kernels.dequantize(k, [0, -1, 1], [0, 1, 2], out, theta=theta)
    assert out.tolist() == [[1.25, -1.75], [1.625, 2.125], [10.5, 12.5]]


def _pull(codec: LatticeCodec, enc, key: torch.Tensor) -> torch.Tensor:
    out, state = torch.full_like(key, math.nan), {}
    want = codec.plan(state)
    for _ in range(12):
        meta, frames = codec.select(enc, want)
        res = codec.decode(meta, frames, key, out, state)
        if res.complete:
            return out
        want = res.more
    raise AssertionError("pull did not complete")


@pytest.mark.parametrize("mode", ["stochastic", "dither"])
@pytest.mark.parametrize(("sender", "reader"), [("1", "0"), ("0", "1")])
def test_snapshots_decode_exactly_across_the_fused_and_torch_paths(
    monkeypatch, mode, sender, reader
) -> None:
    """A peer on the fused loops and one on the torch passes (as on a GPU) read each other."""
    x = torch.randn(70_000) * 0.1
    key = x + torch.randn(70_000) * 1e-3
    codec = LatticeCodec(chunk=4096, mode=mode, eps=2.0**-10, seed=5)
    monkeypatch.setenv("SWARMNET_FUSED", sender)
    enc = codec.encode(x)
    monkeypatch.setenv("SWARMNET_FUSED", reader)
    assert torch.equal(_pull(LatticeCodec(chunk=4096, mode=mode, seed=6), enc, key), enc.quantized)


@FAST
@given(seed=st.integers(0, 2**20), pairs=st.integers(1, 500))
def test_pack_nibbles_is_the_torch_layout(seed, pairs) -> None:
    q = torch.randint(-8, 8, (2 * pairs,), generator=torch.Generator().manual_seed(seed))
    q = q.to(torch.int8)
    got = kernels.pack_nibbles(q, torch.empty(pairs, dtype=torch.uint8))
    want = blockwise.pack_nibbles(q, torch.empty(pairs, dtype=torch.uint8))
    assert torch.equal(got, want)


@pytest.mark.parametrize("name", ["blockwise8", "blockwise4"])
@pytest.mark.parametrize("n", [1, 63, 1001])
@pytest.mark.parametrize(("sender", "reader"), [("1", "0"), ("0", "1")])
def test_blockwise_snapshots_decode_exactly_across_the_two_paths(
    monkeypatch, name, n, sender, reader
) -> None:
    x = torch.randn(n) * 3
    x[::7] = 0.0
    monkeypatch.setenv("SWARMNET_FUSED", sender)
    enc = make_codec(name, block=5, seed=1).encode(x)
    monkeypatch.setenv("SWARMNET_FUSED", reader)
    out = torch.full_like(x, math.nan)
    make_codec(name, block=5).decode(enc.meta, tuple(bytes(f) for f in enc.frames), x, out, {})
    assert torch.equal(out, enc.quantized)


WARMED_PULL = """
import asyncio, torch, numba
from swarmnet.codecs import loops, make_codec
from swarmnet.peer.exchange import warm_up_loops
from swarmnet.transport.zmq import ZmqTransport

torch.manual_seed(0)
x = torch.randn(26122) * 0.1
codec = make_codec("lattice", seed=0, chunk=1024, eps_scale=4.0)
warm_up_loops(codec, x)  # what a peer does before it joins
def loaded():
    return {name: len(f.signatures) for name, f in vars(loops).items() if isinstance(f, numba.core.dispatcher.Dispatcher)}
before = loaded()
encoded = codec.encode(x, {"lr": 0.05, "local_steps": 2, "progress": torch.randn(26122) * 0.01, "progress_steps": 2})

async def pull():
    transport = ZmqTransport()
    listener = await transport.listen("tcp://127.0.0.1:0")
    conn = transport.connect(listener.address)
    own, out, state = x + 0.01 * torch.randn(26122), torch.empty(26122), {}
    want = codec.plan(state)
    for _ in range(8):
        request = asyncio.ensure_future(conn.request([b"pull"], timeout=10))
        route, _ = await listener.recv()
        meta, frames = codec.select(encoded, want)
        await listener.send(route, list(frames))
        result = codec.decode(meta, tuple(await request), own, out, state)  # frames as a pull receives them
        if result.complete:
            break
        want = result.more
    await conn.aclose(); await listener.aclose(); await transport.aclose()
    return result.complete

assert asyncio.run(pull())
print(sorted(name for name, n in loaded().items() if n != before.get(name)))
"""


def test_a_warmed_up_peer_loads_no_loop_at_its_first_pull() -> None:
    """A peer warms its codec's loops up before it joins (exchange.warm_up_loops): numba then
    loads nothing more when the first snapshot arrives over a real socket (loading there charged
    a lattice peer's first interaction about 15 ms of CPU). In a fresh process, so that what this
    one has loaded does not hide a missing signature."""
    import subprocess
    import sys

    pytest.importorskip("numba")
    out = subprocess.run([sys.executable, "-c", WARMED_PULL], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", f"loops loaded at the first pull: {out.stdout}"
