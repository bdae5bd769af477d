"""Key files, allow-lists, the [security] section, key-carrying addresses and exposure warnings."""

import os
import stat
import subprocess
import sys

import pytest
import zmq
import zmq.auth
from zmq.utils import z85

from swarmnet.config import load_config
from swarmnet.errors import ConfigError
from swarmnet.peer.node import PeerIdentity
from swarmnet.security import (
    client_keys,
    exposure_warning,
    generate_keys,
    load_allow_list,
    load_keypair,
    peer_keys,
    split_address,
    with_key,
)

pytestmark = pytest.mark.timeout(60)


def test_keys_generate_cli_writes_an_owner_only_secret_and_a_public_key(tmp_path):
    out = tmp_path / "keys"
    result = subprocess.run([sys.executable, "-m", "swarmnet", "keys", "generate", "--out", str(out),
                             "--name", "peer0"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    public_path, secret_path = out / "peer0.key", out / "peer0.key_secret"
    assert f"wrote {secret_path}" in result.stdout and f"wrote {public_path}" in result.stdout
    assert stat.S_IMODE(secret_path.stat().st_mode) == 0o600
    assert stat.S_IMODE(public_path.stat().st_mode) & (stat.S_IRWXG | stat.S_IRWXO) == 0o044
    # pyzmq's own certificate reader understands both files; the public one holds no secret.
    public, secret = zmq.auth.load_certificate(secret_path)
    assert zmq.curve_public(secret) == public
    assert zmq.auth.load_certificate(public_path) == (public, None)
    assert "secret-key" not in public_path.read_text()
    assert load_keypair(secret_path) == (public, secret)
    # A second run must not silently replace a key that peers may already trust.
    again = subprocess.run([sys.executable, "-m", "swarmnet", "keys", "generate", "--out", str(out),
                            "--name", "peer0"], capture_output=True, text=True, timeout=60)
    assert again.returncode == 2 and "exists; pass --force" in again.stderr
    assert load_keypair(secret_path) == (public, secret)


def test_generated_keys_differ_and_force_replaces(tmp_path):
    _, first = generate_keys(tmp_path, "a")
    _, other = generate_keys(tmp_path, "b")
    key_a = load_keypair(first)
    assert key_a != load_keypair(other)
    generate_keys(tmp_path, "a", force=True)
    assert load_keypair(first) != key_a
    with pytest.raises(ConfigError, match="key name"):
        generate_keys(tmp_path, "../escape")


def test_a_replacement_that_fails_halfway_leaves_the_old_pair_whole(tmp_path):
    """The secret was written before the public key: a failure between the two left a new secret
    beside the old public key, the old secret gone."""
    public_path, secret_path = generate_keys(tmp_path, "y")
    before = (public_path.read_text(), secret_path.read_text())
    (tmp_path / "y.key.tmp").mkdir()  # the public key's temporary file cannot be made
    with pytest.raises(ConfigError, match=r"cannot write .*y\.key\.tmp .*the key files there are unchanged"):
        generate_keys(tmp_path, "y", force=True)
    assert (public_path.read_text(), secret_path.read_text()) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["y.key", "y.key.tmp", "y.key_secret"]


def test_bad_secret_key_files_are_refused_with_the_fix(tmp_path):
    public_path, secret_path = generate_keys(tmp_path, "p")
    with pytest.raises(ConfigError, match="holds only a public key; point security.key"):
        load_keypair(public_path)
    with pytest.raises(ConfigError, match="No such file.*swarmnet keys generate"):
        load_keypair(tmp_path / "missing.key_secret")
    os.chmod(secret_path, 0o644)
    with pytest.raises(ConfigError, match=f"readable by others.*chmod 600 {secret_path}"):
        load_keypair(secret_path)
    os.chmod(secret_path, 0o600)
    text = secret_path.read_text()
    public = load_keypair(secret_path)[0].decode()
    secret_path.write_text(text.replace(public, public[:-1]))
    with pytest.raises(ConfigError, match="is not a CURVE key"):
        load_keypair(secret_path)
    secret_path.write_text(text)
    secret = load_keypair(secret_path)[1].decode()
    secret_path.write_text(text.replace(secret, secret + "x"))  # one character too many
    with pytest.raises(ConfigError, match="secret-key: 41 characters, not a CURVE key") as refused:
        load_keypair(secret_path)
    assert secret not in str(refused.value)  # the secret never reaches a log
    other_public = zmq.curve_keypair()[0].decode()
    secret_path.write_text(text.replace(public, other_public))
    with pytest.raises(ConfigError, match="does not belong to secret-key"):
        load_keypair(secret_path)


def test_allow_list_from_a_directory_or_a_file(tmp_path):
    keys = tmp_path / "keys"
    publics = [load_keypair(generate_keys(keys, n)[1])[0] for n in ("a", "b")]
    assert load_allow_list(keys) == frozenset(publics)  # *.key files; *.key_secret ignored
    listing = tmp_path / "allowed.txt"
    listing.write_text(f"# admitted peers\n{publics[0].decode()}  a\n\n{publics[1].decode()} # b\n")
    assert load_allow_list(listing) == frozenset(publics)
    # '#' is a Z85 digit: inside a key it does not start a comment.
    hashed = next(k for k in (zmq.curve_keypair()[0] for _ in range(5000)) if b"#" in k)
    listing.write_text(f"#comment\n{hashed.decode()} # peer9\n")
    assert load_allow_list(listing) == {hashed}
    listing.write_text("~" * 40 + "\n")  # Z85 digits, but not a number a key can be
    with pytest.raises(ConfigError, match=":1: .* is not a CURVE key"):
        load_allow_list(listing)
    listing.write_text(f"{publics[0].decode()}\nnot-a-key\n")
    with pytest.raises(ConfigError, match=f"{listing}:2: 'not-a-key' is not a CURVE key"):
        load_allow_list(listing)
    # The hex form of #curve= addresses, and a single NAME.key file, serve as well.
    listing.write_text(f"{z85.decode(publics[0]).hex()}  a, copied from its address\n")
    assert load_allow_list(listing) == {publics[0]}
    assert load_allow_list(keys / "b.key") == {publics[1]}
    named_key = tmp_path / "allowed.key"  # a list of keys that happens to end in .key
    named_key.write_text(f"{publics[0].decode()}\n")
    assert load_allow_list(named_key) == {publics[0]}
    listing.write_text("# nobody\n")
    with pytest.raises(ConfigError, match="lists no public keys"):
        load_allow_list(listing)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="has no \\*.key public key files"):
        load_allow_list(tmp_path / "empty")


def _config(tmp_path, body):
    path = tmp_path / "swarm.toml"
    path.write_text("[security]\n" + body)
    return path


@pytest.mark.parametrize("body,fragment", [
    ('mode = "tls"', "security.mode: must be one of none, swarm-key, allow-list"),
    ('mode = "swarm-key"', "security.key: mode 'swarm-key' needs this peer's secret key file"),
    ('mode = "swarm-key"\nkey = "nope.key_secret"', "security.key: 'nope.key_secret' is not a file (relative paths "
     "start in the working directory, {cwd}); give its path, or copy the swarm's key file here"),
    ('mode = "allow-list"\nkey = "nope.key_secret"\nallow = "{secret}"', "'nope.key_secret' is not a file (relative "
     "paths start in the working directory, {cwd}); give its path, or create one with `swarmnet keys generate"),
    ('mode = "allow-list"\nkey = "{secret}"', "security.allow: mode 'allow-list' needs a directory"),
    ('mode = "allow-list"\nkey = "{secret}"\nallow = "nowhere"', "security.allow: 'nowhere' does not exist"),
    ('mode = "swarm-key"\nkey = "{secret}"\nallow = "{secret}"', "security.allow: only applies to mode = 'allow-list'"),
    ('key = "{secret}"', "security.key: is set but security.mode is 'none'"),
    ('mode = "swarm-key"\nkee = "x"', "unknown key 'security.kee' in [security]; did you mean 'security.key'?"),
])
def test_bad_security_sections_name_file_key_and_fix(tmp_path, body, fragment):
    _, secret = generate_keys(tmp_path / "keys", "p")
    path = _config(tmp_path, body.format(secret=secret))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(path) in str(info.value) and fragment.format(cwd=os.getcwd()) in str(info.value)


def test_security_sections_build_the_keys_of_each_mode(tmp_path):
    keys = tmp_path / "keys"
    _, swarm = generate_keys(keys, "swarm")
    _, mine = generate_keys(keys, "mine")
    assert peer_keys(load_config(None).security) is None
    shared = peer_keys(load_config(_config(tmp_path, f'mode = "swarm-key"\nkey = "{swarm}"')).security)
    assert shared.allowed == {shared.public} and not shared.per_peer and shared.check_servers
    assert shared.server_key("tcp://10.0.0.1:7000") == shared.public  # everyone presents the swarm key
    listed = peer_keys(load_config(_config(tmp_path, f'mode = "allow-list"\nkey = "{mine}"\nallow = "{keys}"')).security)
    assert listed.per_peer and len(listed.allowed) == 2
    with pytest.raises(ConfigError, match="no key in the address"):
        listed.server_key("tcp://10.0.0.1:7000")
    stranger = zmq.curve_keypair()[0]
    with pytest.raises(ConfigError, match="not in the allow-list"):
        listed.server_key(with_key("tcp://10.0.0.1:7000", stranger))
    # A tool that only reads status trusts the key an address carries.
    tool = client_keys(mine)
    assert tool.server_key(with_key("tcp://10.0.0.1:7000", stranger)) == stranger
    (keys / "mine.key").unlink()
    with pytest.raises(ConfigError, match="not in the allow-list .* Add mine.key"):
        peer_keys(load_config(_config(tmp_path, f'mode = "allow-list"\nkey = "{mine}"\nallow = "{keys}"')).security)


def test_addresses_carry_a_hex_public_key():
    public = zmq.curve_keypair()[0]
    address = with_key("tcp://10.0.0.1:7000", public)
    assert address.startswith("tcp://10.0.0.1:7000#curve=") and len(address.split("=")[1]) == 64
    assert split_address(address) == ("tcp://10.0.0.1:7000", public)
    assert split_address("tcp://10.0.0.1:7000") == ("tcp://10.0.0.1:7000", None)
    assert with_key(address, public) == address
    with pytest.raises(ConfigError, match="64-digit hex public key"):
        split_address("tcp://10.0.0.1:7000#curve=abc")


@pytest.mark.parametrize("listen,warns", [
    ("tcp://127.0.0.1:0", False), ("tcp://[::1]:7000", False), ("tcp://localhost:7000", False),
    ("ipc:///tmp/p.sock", False), ("inproc://x", False),
    ("tcp://0.0.0.0:7000", True), ("tcp://*:7000", True), ("tcp://[::]:7000", True),
    ("tcp://10.1.2.3:7000", True),
])
def test_listening_beyond_loopback_without_authentication_warns(listen, warns):
    warning = exposure_warning(listen, secured=False)
    assert bool(warning) == warns
    if warns:
        assert listen in warning and "without authentication" in warning and "[security] mode" in warning
    assert exposure_warning(listen, secured=True) is None


@pytest.mark.parametrize("listen", ["ucx://0.0.0.0:0", "ucx://127.0.0.1:7000", "ucx://localhost:7000"])
def test_ucx_warns_whatever_its_host_since_it_listens_everywhere_and_cannot_authenticate(listen):
    warning = exposure_warning(listen, secured=False)
    assert warning and listen in warning and "all interfaces whatever the host" in warning


@pytest.mark.parametrize("name", ["..", ".", "../x", "a/b", "", ".hidden", "-x", "a\x00b", "x" * 129])
def test_peer_names_cannot_leave_the_run_directory(name):
    with pytest.raises(ConfigError, match="names the peer's run directory"):
        PeerIdentity(name, 0)
    assert PeerIdentity("gpu-3.node_1", 0).name == "gpu-3.node_1"


def test_manifest_names_are_checked_too(tmp_path):
    from swarmnet.config import load_manifest

    path = tmp_path / "p.toml"
    path.write_text('name = "../../etc"\nkey = "keys/p.key_secret"\n')
    with pytest.raises(ConfigError, match=f"{path}: peer name '../../etc'"):
        load_manifest(path)
    path.write_text('key = "keys/p.key_secret"\n')
    assert load_manifest(path).key == "keys/p.key_secret"


def test_peers_and_tools_refuse_unusable_keys_with_the_fix(tmp_path, caplog):
    import asyncio

    from swarmnet.peer.node import run_peer

    _, secret = generate_keys(tmp_path / "keys", "swarm")
    os.chmod(secret, 0o640)
    config = _config(tmp_path, f'mode = "swarm-key"\nkey = "{secret}"\n[run]\ndir = "{tmp_path / "run"}"')
    code = asyncio.run(run_peer(load_config(config), PeerIdentity("p", 0), install_signals=False))
    assert code == 2 and f"chmod 600 {secret}" in caplog.text
    status = subprocess.run([sys.executable, "-m", "swarmnet", "status", "--seed", "tcp://127.0.0.1:9",
                             "--config", str(config), "--once"], capture_output=True, text=True, timeout=60)
    assert status.returncode == 2 and f"chmod 600 {secret}" in status.stderr
