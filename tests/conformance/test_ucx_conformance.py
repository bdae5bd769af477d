"""The transport conformance suite over UCX (ucx://), skipped where ucxx is not usable.

UCX_TLS defaults to tcp here: the PyPI wheels have no verbs/rdmacm, and the shared-memory
transports do not serve the listener (connection manager) path.
"""

import os

import pytest

from swarmnet.testing.transport_suite import TransportCase, TransportConformance

UCX_ENV = {"UCX_TLS": os.environ.get("UCX_TLS", "tcp"), "UCX_WARN_UNUSED_ENV_VARS": "n"}


def _ucx_unusable() -> str | None:
    # UCX reads its variables when it initialises, and ucxx.init() adds some of its own; put the
    # environment back afterwards so that the processes later tests start never inherit them.
    saved = dict(os.environ)
    for key, value in UCX_ENV.items():
        os.environ.setdefault(key, value)
    try:
        import ucxx
    except Exception as exc:  # ImportError, or a broken native library
        return f"ucxx cannot be imported: {exc!r}"
    try:
        ucxx.init()
    except Exception as exc:
        return f"UCX fails to initialise: {exc!r}"
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return None


_reason = _ucx_unusable()
pytestmark = pytest.mark.skipif(_reason is not None, reason=_reason or "")


class TestUcxConformance(TransportConformance):
    @pytest.fixture
    def case(self):
        return TransportCase(
            name="ucx", transport="swarmnet.transport.ucx:UcxTransport",
            bind_url=lambda: "ucx://127.0.0.1:0", env=UCX_ENV,
            notices_frozen=False,  # a hung peer costs the deadline (docs/transports.md, UCX)
        )


def test_ucx_scheme_resolves_to_the_ucx_transport():
    from swarmnet.transport import transport_class
    from swarmnet.transport.ucx import UcxTransport

    assert transport_class("ucx://127.0.0.1:0") is UcxTransport


def test_the_configured_slowest_rate_reaches_the_ucx_listener():
    """Before, UCX's replies were cut at their bytes over a fixed 50 MB/s whatever
    network.min_transfer_rate said, while the clients waited for the configured rate."""
    import asyncio

    from swarmnet.transport.registry import TransportSet

    async def main():
        transports = TransportSet(slowest_rate=1e6)
        try:
            listener = await transports.for_url("ucx://127.0.0.1:0").listen("ucx://127.0.0.1:0")
            return listener._slowest_rate
        finally:
            await transports.aclose()

    saved = dict(os.environ)
    os.environ.update(UCX_ENV)
    try:
        assert asyncio.run(main()) == 1e6
    finally:
        os.environ.clear()
        os.environ.update(saved)
