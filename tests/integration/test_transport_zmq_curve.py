"""CURVE on the ZeroMQ transport over real sockets: who is admitted, who gets nothing."""

import asyncio
import contextlib
import logging

import pytest
import zmq

from swarmnet.errors import ConfigError, HandshakeFailed, TransportError
from swarmnet.security import CurveKeys, generate_keys, load_allow_list, load_keypair, with_key
from swarmnet.transport import TransportSet

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def keys(tmp_path):
    """Keypairs a, b, stranger; an allow-list holding a and b."""
    allow = tmp_path / "allow"
    pairs = {}
    for name in ("a", "b", "stranger"):
        public_path, secret_path = generate_keys(tmp_path / "keys", name)
        pairs[name] = load_keypair(secret_path)
        if name != "stranger":
            allow.mkdir(exist_ok=True)
            (allow / public_path.name).write_bytes(public_path.read_bytes())
    return pairs, load_allow_list(allow)


def swarm_key(pair, **kw):
    return CurveKeys(pair[0], pair[1], frozenset({pair[0]}), check_servers=True, **kw)


def listed(pair, allowed, **kw):
    return CurveKeys(pair[0], pair[1], allowed, per_peer=True, check_servers=True, **kw)


@contextlib.asynccontextmanager
async def echo_server(curve, url="tcp://127.0.0.1:0"):
    transports = TransportSet(curve)
    listener = await transports.for_url(url).listen(url)

    async def serve():
        while True:
            route, frames = await listener.recv()
            await listener.send(route, [b"echo", *[bytes(f) for f in frames]])

    task = asyncio.create_task(serve())
    try:
        yield listener
    finally:
        task.cancel()
        await transports.aclose()


async def eventually(condition, within=10.0):
    """Wait until ``condition()`` holds: the listener's monitor and the ZAP handler report on
    their own schedule, later on a loaded machine."""
    deadline = asyncio.get_running_loop().time() + within
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, (
            f"the condition on line {condition.__code__.co_firstlineno} did not hold within {within} s")
        await asyncio.sleep(0.02)


async def ask(curve, address, timeout=1.0):
    transports = TransportSet(curve)
    try:
        reply = await transports.for_url(address).connect(address).request([b"hi"], timeout=timeout)
        return [bytes(f) for f in reply]
    finally:
        await transports.aclose()


@pytest.mark.parametrize("scheme", ["tcp", "ipc"])
async def test_swarm_key_admits_its_holders_and_nobody_else(keys, scheme, tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="swarmnet")
    pairs, _ = keys
    refused = []
    url = "tcp://127.0.0.1:0" if scheme == "tcp" else f"ipc://{tmp_path}/s.sock"
    async with echo_server(swarm_key(pairs["a"], on_refused=refused.append), url) as listener:
        assert "#curve=" not in listener.address  # everyone knows the swarm key: plain addresses
        assert await ask(swarm_key(pairs["a"]), listener.address) == [b"echo", b"hi"]
        # A refused handshake ends in a timeout or, as libzmq drops it, a lost connection.
        with pytest.raises(TransportError):
            await ask(None, listener.address)  # no key: the handshake never completes
        with pytest.raises(TransportError):
            # A wrong key, even one that names the right server key: refused by the ZAP handler.
            await ask(CurveKeys(*pairs["stranger"]), with_key(listener.address, pairs["a"][0]))
        await eventually(lambda: pairs["stranger"][0] in refused)
        stranger = pairs["stranger"][0].decode()
        said = next(line for line in caplog.text.splitlines() if f"unknown key {stranger}" in line)
        # where the stranger came from, for an operator to act on (a Unix socket has no address)
        assert ("refused a client at 127.0.0.1 with unknown key" in said) == (scheme == "tcp"), said
        assert await ask(swarm_key(pairs["a"]), listener.address) == [b"echo", b"hi"]  # still serving


async def refusal(curve, address):
    """What a request whose handshake fails is told (a HandshakeFailed, not a bare TransportError)."""
    with pytest.raises(HandshakeFailed) as failed:
        await ask(curve, address, timeout=20)
    return str(failed.value)


async def test_a_failed_handshake_says_which_side_to_look_at_on_both_ends(keys, caplog):
    """libzmq ends a failed CURVE handshake without a reason: the client's request failed as
    "lost mid-request" and the listener logged nothing. Both ends now say what went wrong."""
    pairs, allowed = keys
    broken = []
    caplog.set_level(logging.WARNING, logger="swarmnet")
    async with echo_server(swarm_key(pairs["a"], on_broken_handshake=lambda: broken.append(1))) as listener:
        # Another swarm's key: the listener cannot read the client's hello.
        message = await refusal(swarm_key(pairs["stranger"]), listener.address)
        assert "dropped during the CURVE handshake" in message and "different swarm key files" in message
        # the listener's monitor reports on the event loop
        await eventually(lambda: broken and "refused a CURVE handshake from a client that does not hold" in caplog.text)
        # A client without CURVE: the peer drops it, or it sees the mechanisms differ first.
        message = await refusal(None, listener.address)
        assert "requires CURVE" in message, message
        await eventually(lambda: "from a client without CURVE" in caplog.text)
        many = len(broken)
        for _ in range(3):  # a stranger that keeps knocking is counted every time, logged once
            with contextlib.suppress(TransportError):
                await ask(swarm_key(pairs["stranger"]), listener.address, timeout=5)
        await eventually(lambda: len(broken) >= many + 3)
        assert caplog.text.count("does not hold this peer's key") == 1
        assert await ask(swarm_key(pairs["a"]), listener.address) == [b"echo", b"hi"]  # still serving
    async with echo_server(listed(pairs["a"], allowed)) as listener:  # a key the allow-list lacks
        message = await refusal(CurveKeys(*pairs["stranger"]), listener.address)
        assert "the peer refused our key" in message, message
    async with echo_server(None) as listener:  # a secured client dialling a plain peer
        message = await refusal(swarm_key(pairs["a"]), listener.address)
        # Which end notices first is a race: either message names the missing [security].
        assert "does not run CURVE" in message or "runs without [security]" in message, message
        # the plain side says so too
        await eventually(lambda: "refused a CURVE handshake from a client with CURVE" in caplog.text)


async def test_allow_list_peers_admit_listed_keys_and_carry_theirs_in_the_address(keys):
    pairs, allowed = keys
    refused = []
    async with echo_server(listed(pairs["a"], allowed, on_refused=refused.append)) as listener:
        assert "#curve=" in listener.address
        assert await ask(listed(pairs["b"], allowed), listener.address) == [b"echo", b"hi"]
        with pytest.raises(TransportError):  # a timeout, or the refused connection dropping
            await ask(CurveKeys(*pairs["stranger"]), listener.address)
        await eventually(lambda: refused)
        assert refused == [pairs["stranger"][0]] * len(refused)
        with pytest.raises(TransportError, match="CURVE-secured peer; configure \\[security\\]"):
            await ask(None, listener.address)  # a plain client is told why, not left waiting
        with pytest.raises(TransportError, match="no key in the address"):
            await ask(listed(pairs["b"], allowed), listener.address.partition("#")[0])
        with pytest.raises(TransportError, match="is not this swarm's key"):  # a swarm-key peer
            await ask(swarm_key(pairs["b"]), listener.address)
    # A stranger's listener: a peer with the allow-list will not dial it (it could feed us a model).
    async with echo_server(listed(pairs["stranger"], allowed | {pairs["stranger"][0]})) as listener:
        with pytest.raises(TransportError, match="not in the allow-list; not dialling it"):
            await ask(listed(pairs["b"], allowed), listener.address)


async def test_schemes_that_cannot_authenticate_are_refused(keys):
    pairs, _ = keys
    transports = TransportSet(swarm_key(pairs["a"]))
    with pytest.raises(ConfigError, match="inproc:// skips CURVE authentication"):
        await transports.for_url("inproc://x").listen("inproc://x")
    with pytest.raises(TransportError, match="inproc:// skips CURVE"):
        await transports.for_url("inproc://x").connect("inproc://x").request([b"x"], timeout=1)
    with pytest.raises(ConfigError, match="ucx:// addresses cannot authenticate peers"):
        transports.for_url("ucx://127.0.0.1:0")
    await transports.aclose()


async def test_curve_pull_bench_reports_both_sides():
    from swarmnet.bench.curve import measure

    result = await measure(size_mb=1, repeats=2)
    assert result["plain_s"] > 0 and result["curve_s"] > 0 and result["ratio"] > 0


def test_a_handshake_that_times_out_is_not_blamed_on_keys():
    """A frozen peer never answers the handshake: libzmq gives up after HANDSHAKE_IVL with the
    same event a refused key gives at once. Only the quick one names keys."""
    from swarmnet.transport.zmq import _lost_because

    dropped = zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
    error, why = _lost_because(dropped, 0, True, handshake_s=30.0, handshake_ivl=30.0)
    assert error is TransportError and "no handshake within 30s (a frozen or overloaded peer, or something" in why
    error, why = _lost_because(dropped, 0, True, handshake_s=0.01, handshake_ivl=30.0)
    assert error is HandshakeFailed and "different swarm key files" in why
    error, why = _lost_because(zmq.EVENT_DISCONNECTED, 0, True, handshake_s=0.01, handshake_ivl=30.0)
    assert error is TransportError and why.startswith(" lost mid-request: the peer closed it or died, answered no "
                                                      "heartbeat for 3s (frozen)")


async def test_an_on_refused_hook_that_raises_refuses_one_stranger_not_everyone(keys):
    """The ZAP handler is one thread per process: an exception there used to end it, and every
    secured listener's handshakes stalled from then on, its own keys' included."""
    pairs, _ = keys

    def broken(key):
        raise RuntimeError("a hook's own bug")

    async with echo_server(swarm_key(pairs["a"], on_refused=broken)) as listener:
        with pytest.raises(TransportError):
            await ask(CurveKeys(*pairs["stranger"]), with_key(listener.address, pairs["a"][0]))
        assert await ask(swarm_key(pairs["a"]), listener.address, timeout=10) == [b"echo", b"hi"]


def _stranger_in_a_forked_child(pairs, conn):
    """In a child forked from a process whose ZAP handler runs: a secured listener of the
    child's own, and what a stranger holding the server key gets from it."""
    async def round_():
        async with echo_server(swarm_key(pairs["a"])) as listener:
            try:
                return await ask(CurveKeys(*pairs["stranger"]), with_key(listener.address, pairs["a"][0]))
            except TransportError:
                return "refused"
    try:
        conn.send(asyncio.run(round_()))
    finally:
        conn.close()


async def test_a_forked_child_refuses_strangers_too(keys):
    """The ZAP handler's thread does not survive a fork, and a context without one admitted any
    key: the child's listener now starts its own handler and enforces it."""
    import multiprocessing

    pairs, _ = keys
    async with echo_server(swarm_key(pairs["a"])) as listener:  # the parent's handler is running
        assert await ask(swarm_key(pairs["a"]), listener.address) == [b"echo", b"hi"]
    ctx = multiprocessing.get_context("fork")
    receive, send = ctx.Pipe(duplex=False)
    child = ctx.Process(target=_stranger_in_a_forked_child, args=(pairs, send))
    child.start()
    send.close()
    loop = asyncio.get_running_loop()
    assert await loop.run_in_executor(None, lambda: receive.poll(30)), "the child did not answer"
    assert receive.recv() == "refused"
    await loop.run_in_executor(None, child.join, 10)
