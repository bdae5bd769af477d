"""Property tests of the registry and the float and blockwise codecs (fp32, fp16, bf16,
blockwise8, blockwise4): round trip, error bounds, unbiasedness, sizes, malformed input."""

from __future__ import annotations

import contextlib
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from swarmnet.codecs import CODECS, kernels, make_codec
from swarmnet.errors import CodecError, ConfigError, NonFiniteInput

pytestmark = pytest.mark.timeout(60)
FAST = settings(max_examples=25, deadline=None)
SIMPLE = ["fp32", "fp16", "bf16", "blockwise8", "blockwise4"]


def vector(seed: int, n: int, scale: float) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g) * scale
    x[torch.rand(n, generator=g) < 0.05] = 0.0
    return x


def roundtrip(codec, x, frames_as=bytes):
    enc = codec.encode(x)
    out = torch.full_like(x, float("nan"))
    res = codec.decode(enc.meta, tuple(frames_as(f) for f in enc.frames), x, out, {})
    return enc, out, res


def test_registry_builds_every_codec_and_rejects_unknown() -> None:
    assert set(CODECS) == {"fp32", "fp16", "bf16", "blockwise8", "blockwise4", "lattice"}
    for name in CODECS:
        assert make_codec(name).name == name
    with pytest.raises(ConfigError, match="unknown codec"):
        make_codec("int3")
    with pytest.raises(ConfigError):
        make_codec("fp16", nonsense=1)
    with pytest.raises(ConfigError):
        make_codec("blockwise8", block=0)
    with pytest.raises(ConfigError):
        make_codec("bf16", rounding="up")


@FAST
@given(
    name=st.sampled_from(SIMPLE),
    n=st.integers(0, 700),
    scale=st.sampled_from([1e-30, 1e-3, 1.0, 1e4]),
    seed=st.integers(0, 2**16),
    writable=st.booleans(),
)
def test_decode_reproduces_quantized_exactly(name, n, scale, seed, writable) -> None:
    codec = make_codec(name, seed=seed) if name != "fp32" else make_codec(name)
    x = vector(seed, n, scale)
    enc, out, res = roundtrip(codec, x, bytearray if writable else bytes)
    assert res.complete
    assert torch.equal(out, enc.quantized)
    assert enc.quantized.dtype == torch.float32 and enc.quantized.shape == x.shape
    if name == "fp32":
        assert torch.equal(out, x)


@FAST
@given(
    n=st.integers(1, 2000),
    seed=st.integers(0, 2**16),
    rounding=st.sampled_from(["nearest", "stochastic"]),
)
def test_half_formats_error_bound(n, seed, rounding) -> None:
    # fp16 keeps 11 significant bits, bf16 8: nearest is within half a unit in the last place,
    # stochastic within one. Values stay in fp16's normal range here.
    x = vector(seed, n, 1.0).clamp_(-60000, 60000)
    x[x.abs() < 2**-13] = 0.0
    for name, bits in (("fp16", 11), ("bf16", 8)):
        enc, _, _ = roundtrip(make_codec(name, rounding=rounding, seed=seed), x)
        ulp = 2.0 ** (torch.floor(torch.log2(x.abs().clamp_min(1e-30))) - (bits - 1))
        limit = ulp * (0.5 if rounding == "nearest" else 1.0)
        assert torch.all((enc.quantized - x).abs() <= limit)


@FAST
@given(
    name=st.sampled_from(["blockwise8", "blockwise4"]),
    n=st.integers(1, 1500),
    block=st.sampled_from([1, 7, 64, 256]),
    scale=st.sampled_from([1e-20, 1.0, 3e5]),
    seed=st.integers(0, 2**16),
    fused=st.booleans(),
)
def test_blockwise_error_bound_and_sizes(name, n, block, scale, seed, fused) -> None:
    codec = make_codec(name, block=block, seed=seed)
    x = vector(seed, n, scale)
    with contextlib.nullcontext() if fused else kernels.torch_passes():
        enc, _, res = roundtrip(codec, x)
    levels = 127 if name == "blockwise8" else 7
    rows = math.ceil(n / block)
    pad = rows * block - n
    xb = torch.cat([x, x.new_zeros(pad)]).view(rows, block)
    qb = torch.cat([enc.quantized, x.new_zeros(pad)]).view(rows, block)
    step = xb.abs().amax(1, keepdim=True) / levels
    # |Q - x| <= s/L, plus float32 rounding of q * (s/L): at most 2L ulps of a step.
    assert torch.all((qb - xb).abs() <= step * (1 + 4 * levels * 2.0**-24))
    values = n if name == "blockwise8" else (n + 1) // 2
    assert [memoryview(f).nbytes for f in enc.frames] == [values, 4 * rows]
    assert enc.nbytes == values + 4 * rows
    assert res.stats["bits_per_coord"] == pytest.approx(
        (8 if name == "blockwise8" else 4) + 32 / block
    )


@pytest.mark.parametrize(
    ("name", "params", "fused"),
    [
        ("blockwise8", {}, True),
        ("blockwise4", {}, True),
        ("blockwise4", {"block": 5}, True),
        ("blockwise8", {}, False),  # the torch passes, as on a GPU
        ("blockwise4", {"block": 5}, False),
        ("fp16", {"rounding": "stochastic"}, True),
        ("bf16", {"rounding": "stochastic"}, True),
    ],
)
def test_stochastic_codecs_are_unbiased(name, params, fused) -> None:
    # SPEC 3.5 item 1 style bound: |mean Q - x| <= 4 * sigma / sqrt(N), sigma <= step / 2.
    x = vector(3, 300, 1.0)
    codec = make_codec(name, seed=11, **params)
    trials = 1500
    total = torch.zeros_like(x, dtype=torch.float64)
    with contextlib.nullcontext() if fused else kernels.torch_passes():
        for _ in range(trials):
            total += codec.encode(x).quantized.double()
    bias = (total / trials - x.double()).abs()
    if name.startswith("blockwise"):
        block = params.get("block", 64)
        levels = 127 if name == "blockwise8" else 7
        rows = math.ceil(x.numel() / block)
        xb = torch.cat([x, x.new_zeros(rows * block - x.numel())]).view(rows, block)
        step = (
            (xb.abs().amax(1, keepdim=True) / levels).expand(rows, block).reshape(-1)[: x.numel()]
        )
    else:
        bits = 11 if name == "fp16" else 8
        step = 2.0 ** (torch.floor(torch.log2(x.abs().clamp_min(1e-30))) - (bits - 1))
    assert torch.all(bias <= 4 * (step.double() / 2) / math.sqrt(trials) + 1e-12)


def test_nearest_rounding_is_deterministic_and_biased_where_expected() -> None:
    # The default half formats round to nearest: identical output every time (a control for
    # the unbiasedness test above, which would fail for them on values between grid points).
    x = torch.full((10,), 1.0 + 2.0**-10)  # between two bf16 values, nearer the lower one
    q1 = make_codec("bf16").encode(x).quantized
    q2 = make_codec("bf16").encode(x).quantized
    assert torch.equal(q1, q2) and torch.all(q1 == 1.0)


@pytest.mark.parametrize(("name", "params"), [
    ("fp16", {}), ("fp16", {"rounding": "stochastic"}), ("bf16", {}), ("bf16", {"rounding": "stochastic"}),
    ("blockwise8", {}), ("blockwise4", {}), ("lattice", {})])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_input_is_rejected(name, params, bad) -> None:
    """As NonFiniteInput: the one refusal a peer turns into "training diverged" (with a summary)."""
    x = torch.randn(100)
    x[17] = bad
    with pytest.raises(NonFiniteInput, match="non-finite"):
        make_codec(name, **params).encode(x)


def test_fp16_overflow_is_rejected_and_integers_are_refused() -> None:
    with pytest.raises(NonFiniteInput, match=r"beyond the format's range \(\+-65504\)"):
        make_codec("fp16").encode(torch.tensor([1.0, 70000.0]))
    for name in ("blockwise8", "blockwise4"):  # a block scaled near float32's limit dequantizes to inf
        with pytest.raises(NonFiniteInput, match="beyond"):
            make_codec(name, block=4).encode(torch.tensor([torch.finfo(torch.float32).max, 1.0, -2.0, 3.0]))
    for name in CODECS:
        with pytest.raises(CodecError, match="floating-point"):
            make_codec(name).encode(torch.arange(8))
        with pytest.raises(CodecError, match="flat"):
            make_codec(name).encode(torch.zeros(2, 3))


def _valid(name: str, n: int = 300):
    codec = make_codec(name)
    enc = codec.encode(vector(1, n, 1.0))
    return codec, dict(enc.meta), list(enc.frames), n


MALFORMED_META = [
    ("not a map", lambda m: [1, 2]),
    ("missing n", lambda m: {k: v for k, v in m.items() if k != "n"}),
    ("wrong n", lambda m: {**m, "n": m["n"] + 1}),
    ("bool n", lambda m: {**m, "n": True}),
    ("float n", lambda m: {**m, "n": float(m["n"])}),
    ("negative n", lambda m: {**m, "n": -1}),
]


@pytest.mark.parametrize("name", SIMPLE)
@pytest.mark.parametrize(("label", "corrupt"), MALFORMED_META, ids=[c[0] for c in MALFORMED_META])
def test_malformed_meta_raises_codec_error(name, label, corrupt) -> None:
    codec, meta, frames, n = _valid(name)
    with pytest.raises(CodecError):
        codec.decode(corrupt(meta), tuple(frames), torch.zeros(n), torch.empty(n), {})


@pytest.mark.parametrize("name", ["fp16", "bf16"])
@pytest.mark.parametrize("rounding", [None, True, 2, "junk"])
def test_half_formats_check_their_rounding_flag(name, rounding) -> None:
    codec, meta, frames, n = _valid(name)
    meta = {k: v for k, v in meta.items() if k != "r"} | ({} if rounding is None else {"r": rounding})
    with pytest.raises(CodecError, match="'r'"):
        codec.decode(meta, tuple(frames), torch.zeros(n), torch.empty(n), {})


@pytest.mark.parametrize("name", SIMPLE)
def test_malformed_frames_raise_codec_error(name) -> None:
    codec, meta, frames, n = _valid(name)
    key, out = torch.zeros(n), torch.empty(n)
    for bad in (
        frames[:-1],  # one missing
        [*frames, b"x"],  # one too many
        [bytes(memoryview(frames[0])[:-1]), *frames[1:]],  # truncated
        [bytes(memoryview(frames[0])) + b"\0", *frames[1:]],  # too long
        ["not a buffer", *frames[1:]],
        7,  # not a sequence
    ):
        with pytest.raises(CodecError):
            codec.decode(meta, bad if isinstance(bad, int) else tuple(bad), key, out, {})


@pytest.mark.parametrize("name", ["blockwise8", "blockwise4"])
def test_blockwise_header_and_scales_are_validated(name) -> None:
    codec, meta, frames, n = _valid(name)
    key, out = torch.zeros(n), torch.empty(n)
    for bad_meta in (
        {**meta, "bits": 6},
        {**meta, "bits": 4 if name == "blockwise8" else 8},
        {**meta, "block": 0},
        {**meta, "block": 2**30},
        {**meta, "v": 2},
    ):
        with pytest.raises(CodecError):
            codec.decode(bad_meta, tuple(frames), key, out, {})
    for value in (float("nan"), float("inf"), -1.0):
        scales = bytearray(frames[1])
        scales[:4] = torch.tensor([value]).numpy().tobytes()
        with pytest.raises(CodecError, match="scales"):
            codec.decode(meta, (frames[0], bytes(scales)), key, out, {})


def test_frames_are_host_bytes_of_the_right_size() -> None:
    x = vector(5, 1001, 1.0)
    sizes = {name: make_codec(name).encode(x).nbytes for name in SIMPLE}
    assert sizes == {
        "fp32": 4004,
        "fp16": 2002,
        "bf16": 2002,
        "blockwise8": 1001 + 4 * 16,
        "blockwise4": 501 + 4 * 16,
    }


def test_fp32_view_reads_a_writable_frame_in_place_and_nothing_else() -> None:
    codec = make_codec("fp32")
    x = vector(0, 1000, 1.0)
    enc = codec.encode(x)
    frame = bytearray(memoryview(enc.frames[0]))  # what the transport hands over: writable
    view = codec.view(enc.meta, (frame,), x)
    assert view is not None and torch.equal(view, x)
    assert view.data_ptr() == torch.frombuffer(frame, dtype=torch.uint8).data_ptr()  # no copy
    assert codec.view(enc.meta, (bytes(frame),), x) is None  # read-only: decode copies it
    assert codec.view(enc.meta, (frame,), torch.empty(1000, device="meta")) is None  # not on the CPU
    for bad in ((), (frame[:-4],), (frame, b"x")):
        with pytest.raises(CodecError):
            codec.view(enc.meta, bad, x)
    with pytest.raises(CodecError):
        codec.view({"n": 999}, (frame,), x)
    for name in CODECS:
        if name != "fp32":
            other = make_codec(name)
            enc = other.encode(x)
            assert other.view(enc.meta, enc.frames, x) is None
