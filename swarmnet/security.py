"""Keys and the admission rule of a closed swarm (ZeroMQ CURVE; docs/operations.md, "Security").

Every secured endpoint holds a CURVE keypair. A listener presents its keypair as the CURVE server
and admits a client only if the client's public key is allowed; a client presents its keypair
and must know the server's public key before it dials:

- ``swarm-key``: every peer holds the same keypair, so the server key is the client's own public
  key and the only key admitted is that one. Addresses stay plain.
- ``allow-list``: every peer has its own keypair and admits the public keys of an allow-list. A
  peer advertises its address with its public key appended, ``tcp://host:port#curve=<hex>``, so
  the key travels wherever the address does (gossip, card.json, status); seeds need it too.

Key files use pyzmq's certificate format (``zmq.auth.load_certificate`` reads them): NAME.key
holds the public key, NAME.key_secret both keys and is created owner-only (0600).
"""

from __future__ import annotations

import contextlib
import functools
import ipaddress
import os
import stat
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import zmq
import zmq.auth
from zmq.utils import z85

from swarmnet.errors import ConfigError, disk_full

if TYPE_CHECKING:
    from swarmnet.config import SecurityConfig

KEY_FRAGMENT = "#curve="
"""Separates a dialable address from the hex public key of the listener behind it."""
KEYGEN_HINT = "create keys with `swarmnet keys generate --out keys --name NAME`"


@dataclass(frozen=True, slots=True)
class CurveKeys:
    """What a transport needs to authenticate: our keypair and whom we admit (Z85 keys)."""

    public: bytes
    secret: bytes = field(repr=False)
    allowed: frozenset[bytes] = frozenset()
    """Client public keys a listener admits (empty for clients that never listen)."""
    per_peer: bool = False
    """allow-list mode: every listener has its own key, so addresses carry it (ours too)."""
    check_servers: bool = False
    """Dial only listeners whose key is allowed too (peers: a stranger's address that reached
    the membership table must not feed us a model). Tools that only read status trust the key
    an address carries."""
    on_refused: Callable[[bytes], None] | None = field(default=None, compare=False)
    """Called with the client key of every refused handshake (from the authenticator thread)."""
    on_broken_handshake: Callable[[], None] | None = field(default=None, compare=False)
    """Called for every handshake that failed before it reached the key check: a client
    without our key or without CURVE (from the listener's event loop)."""

    def admits(self, client_key: bytes) -> bool:
        return client_key in self.allowed

    def server_key(self, address: str) -> bytes:
        """Public key of the listener at ``address``: the one the address carries, else ours
        (in a swarm-key swarm every listener presents the swarm key)."""
        _, key = split_address(address)
        if key is None:
            if self.per_peer:
                raise ConfigError(
                    f"{address}: no key in the address; in allow-list mode give peer addresses as "
                    f"tcp://host:port{KEY_FRAGMENT}<hex> (the peer logs it and writes it to its "
                    "card.json) or a file:// seed card")
            key = self.public
        if self.check_servers and key not in self.allowed:
            if not self.per_peer:
                raise ConfigError(f"{address}: its key is not this swarm's key, and in swarm-key mode every peer "
                                  "presents the swarm key: the address is a peer of an allow-list swarm or of "
                                  "another swarm; not dialling it")
            raise ConfigError(f"{address}: its key is not in the allow-list; not dialling it")
        return key


def url_host(url: str) -> str:
    """The host of ``scheme://host:port`` (IPv6 brackets stripped; the whole rest without a port)."""
    rest = url.partition("://")[2]
    return rest.rpartition(":")[0].strip("[]") if ":" in rest else rest


def split_address(address: str) -> tuple[str, bytes | None]:
    """``tcp://h:p#curve=<hex>`` -> (``tcp://h:p``, Z85 key); a plain address -> (address, None)."""
    base, sep, hex_key = address.partition(KEY_FRAGMENT)
    if not sep:
        return address, None
    try:
        raw = bytes.fromhex(hex_key)
    except ValueError:
        raw = b""
    if len(raw) != 32:
        raise ConfigError(f"address {address!r}: the part after {KEY_FRAGMENT} must be a 64-digit "
                          "hex public key (copy the address from the peer's card.json or log)")
    return base, z85.encode(raw)


def refuse_inproc(url: str) -> None:
    """libzmq skips the security handshake inside a process: no inproc:// with [security]."""
    if url.startswith("inproc://"):
        raise ConfigError(f"{url}: inproc:// skips CURVE authentication; with [security] enabled "
                          "use tcp:// or ipc:// addresses")


def dial_target(address: str, curve: CurveKeys | None) -> tuple[str, bytes | None]:
    """(the address to dial, the listener's public key) for a side with these keys (None: no
    [security], no key); a ConfigError when they can never dial ``address``."""
    if curve is None:
        if KEY_FRAGMENT in address:
            raise ConfigError(f"{address} is a CURVE-secured peer; configure [security] (peers) or pass "
                              "--key (tools) to talk to it")
        return address, None
    refuse_inproc(address)
    return split_address(address)[0], curve.server_key(address)


def with_key(address: str, public: bytes) -> str:
    """``address`` carrying the Z85 ``public`` key (replacing any key it carried)."""
    base, _ = split_address(address)
    return f"{base}{KEY_FRAGMENT}{z85.decode(public).hex()}"


# -- key files --------------------------------------------------------------------------------

_SECRET_BANNER = "#   swarmnet CURVE secret key: keep it owner-only (0600), never share it.\n"
_PUBLIC_BANNER = "#   swarmnet CURVE public key: give it to the peers that should admit this one.\n"


def _require_curve() -> None:
    if not zmq.has("curve"):
        raise ConfigError(f"this libzmq ({zmq.zmq_version()}) was built without CURVE support; "
                          "install pyzmq's wheels from PyPI, which bundle libsodium")


def generate_keys(out_dir: Path, name: str, *, force: bool = False) -> tuple[Path, Path]:
    """Write a fresh keypair as ``NAME.key`` (public) and ``NAME.key_secret`` (owner-only)."""
    _require_curve()
    if not name or not all(c.isalnum() or c in "._-" for c in name) or name.startswith("."):
        raise ConfigError(f"key name {name!r}: use letters, digits, '.', '_' and '-' (e.g. peer0)")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        what = "exists and is not a directory" if isinstance(exc, FileExistsError) else exc.strerror or exc
        raise ConfigError(f"--out {out_dir}: {what}; pass a directory to write the keys into") from None
    public_path, secret_path = out_dir / f"{name}.key", out_dir / f"{name}.key_secret"
    if not force:
        for path in (public_path, secret_path):
            if path.exists():
                raise ConfigError(f"{path} exists; pass --force to replace it (peers using the old "
                                  "key will be refused until they get the new public key)")
    public, secret = zmq.curve_keypair()
    # Both written aside first, then both moved in: a failure (a full disk, Ctrl-C) must not leave
    # a new secret key beside the old public one, with the old secret gone.
    staged: list[Path] = []
    try:
        staged.append(_write_aside(secret_path, _SECRET_BANNER + _cert_body(public, secret), 0o600))
        staged.append(_write_aside(public_path, _PUBLIC_BANNER + _cert_body(public, None), 0o644))
    except BaseException as exc:
        for tmp in staged:
            tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise ConfigError(f"cannot write {exc.filename or out_dir} ({exc.strerror or exc}); "
                              f"{'free space' if disk_full(exc) else 'pass a writable --out'}; "
                              "the key files there are unchanged") from None
        raise
    for tmp, path in zip(staged, (secret_path, public_path), strict=True):
        os.replace(tmp, path)
    return public_path, secret_path


def _cert_body(public: bytes, secret: bytes | None) -> str:
    lines = ["metadata", "curve", f'    public-key = "{public.decode()}"']
    if secret is not None:
        lines.append(f'    secret-key = "{secret.decode()}"')
    return "\n".join(lines) + "\n"


def _write_aside(path: Path, text: str, mode: int) -> Path:
    """Write ``text`` to a temporary file beside ``path``, created with ``mode`` from the start
    (never briefly readable by others); returns it, for the caller to move over ``path``."""
    tmp = path.with_name(path.name + ".tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)  # the umask may have removed bits we asked for
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def load_keypair(path: str | os.PathLike[str]) -> tuple[bytes, bytes]:
    """(public, secret) Z85 keys from a secret key file; refuses files others can read."""
    _require_curve()
    path = Path(path)
    try:
        mode = path.stat().st_mode
        public, secret = zmq.auth.load_certificate(path)
    except OSError as exc:
        raise ConfigError(f"secret key file {path}: {exc.strerror or exc}; {KEYGEN_HINT}") from None
    except ValueError:
        raise ConfigError(f"{path}: no public-key line; is it a key file? {KEYGEN_HINT}") from None
    if secret is None:
        raise ConfigError(f"{path} holds only a public key; point security.key (or --key) at the "
                          f"NAME.key_secret file next to it")
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(f"secret key file {path} is readable by others (mode {stat.S_IMODE(mode):o}); "
                          f"run: chmod 600 {path}")
    _check_key(public, f"{path}: public-key")
    _check_key(secret, f"{path}: secret-key")
    if zmq.curve_public(secret) != public:
        raise ConfigError(f"{path}: public-key does not belong to secret-key; regenerate the file")
    return public, secret


def load_allow_list(path: str | os.PathLike[str]) -> frozenset[bytes]:
    """Public keys from a directory of ``*.key`` files, one such file, or a file with one key
    per line: Z85 (a ``.key`` file's public-key) or the 64 hex digits of a ``#curve=`` address
    (blank and ``#`` comment lines ignored, and anything after the key on its line)."""
    path = Path(path)
    if path.is_dir() or _is_certificate(path):
        files = sorted(path.glob("*.key")) if path.is_dir() else [path]
        if not files:
            raise ConfigError(f"allow-list directory {path} has no *.key public key files; "
                              "copy every admitted peer's NAME.key there")
        keys: set[bytes] = set()
        for file in files:
            try:
                public, _ = zmq.auth.load_certificate(file)
            except (OSError, ValueError) as exc:
                raise ConfigError(f"allow-list file {file}: {exc}") from None
            keys.add(_check_key(public, f"{file}: public-key"))
        return frozenset(keys)
    keys = set()
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"allow-list {path}: cannot read it ({exc})") from None
    for number, line in enumerate(lines, 1):
        words = line.split()
        if not words:
            continue
        if words[0].startswith("#"):  # a comment: no key starts with '#' (it is Z85's top digit)
            continue
        key = words[0].encode()
        if len(key) == 64 and all(c in b"0123456789abcdefABCDEF" for c in key):  # as in #curve= addresses
            key = z85.encode(bytes.fromhex(key.decode()))
        keys.add(_check_key(key, f"{path}:{number}", "40 Z85 characters, or the 64 hex digits after #curve= in an address"))
    if not keys:
        raise ConfigError(f"allow-list {path} lists no public keys; put one key per line (the "
                          "public-key value of each NAME.key, or the hex after #curve= in its address)")
    return frozenset(keys)


def _is_certificate(path: Path) -> bool:
    """A NAME.key file as ``keys generate`` writes it (rather than a list of keys that happens
    to be named *.key)."""
    try:
        return path.suffix == ".key" and "public-key" in path.read_text(errors="replace")
    except OSError:
        return False


def _check_key(key: bytes, where: str, forms: str = "40 Z85 characters") -> bytes:
    try:
        ok = len(key) == 40 and len(z85.decode(key)) == 32
    except (ValueError, KeyError, IndexError, struct.error):
        ok = False
    if not ok:
        if where.endswith("secret-key"):  # a secret nearly right is still a secret: never into a log
            raise ConfigError(f"{where}: {len(key)} characters, not a CURVE key ({forms}); {KEYGEN_HINT}")
        shown = key[:72].decode(errors="replace")
        raise ConfigError(f"{where}: {shown!r} is not a CURVE key ({forms}); {KEYGEN_HINT}")
    return key


# -- from config ------------------------------------------------------------------------------

def peer_keys(cfg: SecurityConfig, on_refused: Callable[[bytes], None] | None = None,
              on_broken_handshake: Callable[[], None] | None = None) -> CurveKeys | None:
    """The keys a peer listens and dials with (None when ``mode = "none"``)."""
    if cfg.mode == "none":
        return None
    public, secret = load_keypair(cfg.key)
    keys = functools.partial(CurveKeys, public, secret, check_servers=True, on_refused=on_refused,
                             on_broken_handshake=on_broken_handshake)
    if cfg.mode == "swarm-key":
        return keys(frozenset({public}))
    allowed = load_allow_list(cfg.allow)
    if public not in allowed:
        raise ConfigError(f"security.key {cfg.key}: its public key is not in the allow-list "
                          f"{cfg.allow}; peers sharing that list would refuse this one. Add "
                          f"{Path(cfg.key).name.removesuffix('_secret')} to it")
    return keys(allowed, per_peer=True)


def client_keys(key_file: str | os.PathLike[str] | None, cfg: SecurityConfig | None = None) -> CurveKeys | None:
    """Keys for a tool that only asks (``swarmnet status``, tests): ``key_file`` if given, else the
    key of a config's ``[security]`` section, else None (plain connections)."""
    if key_file:
        public, secret = load_keypair(key_file)
        return CurveKeys(public, secret)
    if cfg is not None and cfg.mode != "none":
        public, secret = load_keypair(cfg.key)
        return CurveKeys(public, secret)
    return None


# -- exposure ---------------------------------------------------------------------------------

def is_loopback(host: str) -> bool:
    """Whether ``host`` (an IP literal or a name) is this machine's loopback, by its spelling."""
    if host in ("localhost", "lo"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def exposure_warning(listen: str, secured: bool) -> str | None:
    """A warning when ``listen`` is reachable from other machines without authentication."""
    if secured:
        return None
    scheme, sep, _ = listen.partition("://")
    if not sep or scheme in ("ipc", "inproc"):
        return None
    if scheme == "ucx":  # UCX takes a port only: its listener is open on every interface
        return (f"listening on {listen}: UCX listens on all interfaces whatever the host, and it cannot "
                "authenticate: anyone who can reach this port can pull the model, push updates into it, join "
                "the swarm and read its status. Run UCX swarms only on a network you trust, or use tcp:// "
                "with [security] (docs/operations.md, Security)")
    host = url_host(listen)
    if is_loopback(host):
        return None
    where = "all interfaces" if host in ("*", "0.0.0.0", "::", "") else f"{host}, not loopback"
    return (f"listening on {listen} ({where}) without authentication: anyone who can reach this "
            "port can pull the model, push updates into it, join the swarm and read its status. "
            "Set [security] mode = \"swarm-key\" or \"allow-list\" (docs/operations.md, Security)")
