"""``swarmnet init``: every file it writes loads back with the runtime's own loaders."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from swarmnet.bootstrap import SwarmPlan, render_all, write_bootstrap
from swarmnet.config import load_config, load_manifest
from swarmnet.errors import ConfigError
from swarmnet.peer.budget import LOCAL_PEERS_VARIABLE
from swarmnet.ui.commands import init_command

pytestmark = pytest.mark.timeout(30)


def cli() -> typer.Typer:
    app = typer.Typer()
    app.command("init")(init_command)
    app.command("noop")(lambda: None)  # two commands, so "init" is a subcommand as in swarmnet
    return app


def test_manifests_and_config_load_back(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli(), ["init", "--hosts", "node-a,node-b", "--gpus-per-host", "8",
                                        "--port-base", "7300", "--codec", "fp32", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    manifests = sorted(tmp_path.glob("peers/*.toml"), key=lambda p: int(p.stem.removeprefix("peer")))
    assert len(manifests) == 16
    loaded = [load_manifest(p) for p in manifests]
    assert [m.rank for m in loaded] == list(range(16))
    assert loaded[0].seeds == [] and loaded[0].advertise == "tcp://node-a:7300"
    assert all(m.seeds == ["tcp://node-a:7300"] for m in loaded[1:])
    assert loaded[11].device == "cuda:3" and loaded[11].advertise == "tcp://node-b:7303"
    assert loaded[11].listen == "tcp://0.0.0.0:7303"
    assert len({(m.advertise) for m in loaded}) == 16
    cfg = load_config(tmp_path / "configs/swarm.toml")
    assert cfg.run.peers == 16 and cfg.codec.name == "fp32"


def test_procfile_runs_the_first_hosts_peers(tmp_path: Path) -> None:
    write_bootstrap(SwarmPlan(hosts=("h1", "h2"), gpus_per_host=2), tmp_path)
    lines = [line for line in (tmp_path / "Procfile").read_text().splitlines() if not line.startswith("#")]
    assert [line.split(":", 1)[0] for line in lines] == ["peer0", "peer1"]
    for i, line in enumerate(lines):
        words = line.split()
        assert words[1:3] == ["exec", "env"] and words[-4:] == ["--config", "configs/swarm.toml", "--peer", f"peers/peer{i}.toml"]
        for flag in ("--config", "--peer"):  # every path a Procfile line names exists relative to the output directory
            assert (tmp_path / words[words.index(flag) + 1]).is_file()


def procfile_environment(procfile: Path, names: str, env: dict[str, str]) -> list[str]:
    """The values of ``names`` that the Procfile's first line gives its peer, run under sh as
    honcho and foreman run it."""
    line = next(line for line in procfile.read_text().splitlines() if line and not line.startswith("#"))
    command = line.split(":", 1)[1].replace("swarmnet peer", f"printenv {names} #", 1)
    return subprocess.run(["sh", "-c", command], env={"PATH": "/usr/bin:/bin"} | env, capture_output=True,
                          text=True, check=True).stdout.split()


@pytest.mark.parametrize(("given", "expected"), [(None, "glibc.malloc.hugetlb=1"), ("glibc.malloc.hugetlb=2", "glibc.malloc.hugetlb=2")])
def test_procfile_keeps_the_environments_glibc_tunables(tmp_path: Path, given: str | None, expected: str) -> None:
    """honcho and foreman run each line under sh: the tunable is set as `swarmnet up` sets it,
    unless the environment has one already."""
    write_bootstrap(SwarmPlan(hosts=("h1",), gpus_per_host=1), tmp_path)
    env = {"GLIBC_TUNABLES": given} if given else {}
    assert procfile_environment(tmp_path / "Procfile", "PYTHONUNBUFFERED GLIBC_TUNABLES", env) == ["1", expected]


def test_procfiles_tell_each_peer_how_many_share_its_host(tmp_path: Path) -> None:
    """Unset, a peer takes itself for the host's only one, and its exchange's CPU budget for
    every core but its training thread's: the bundled Procfile's four peers on two cores merged
    7 times as often as with it set and stepped 30% slower (616-727 against 879-980 steps/s)."""
    write_bootstrap(SwarmPlan(hosts=("h1", "h2"), gpus_per_host=3), tmp_path)
    assert procfile_environment(tmp_path / "Procfile", LOCAL_PEERS_VARIABLE, {}) == ["3"]
    bundled = Path(__file__).parents[2] / "Procfile"
    peers = [line for line in bundled.read_text().splitlines() if line and not line.startswith("#")]
    assert procfile_environment(bundled, LOCAL_PEERS_VARIABLE, {}) == [str(len(peers))]


def test_slurm_script_is_valid_bash_and_seeds_from_the_first_node(tmp_path: Path) -> None:
    write_bootstrap(SwarmPlan(hosts=("h1", "h2", "h3"), gpus_per_host=4, port_base=7400), tmp_path)
    script = tmp_path / "swarmnet.sbatch"
    text = script.read_text()
    assert "#SBATCH --nodes=3" in text and "#SBATCH --ntasks-per-node=4" in text
    assert 'scontrol show hostnames "$SLURM_JOB_NODELIST" | sed -n 1p' in text  # head -n 1: SIGPIPE, set -e
    assert '--seed "tcp://$SEED_HOST:$PORT_BASE"' in text and "PORT_BASE=${PORT_BASE:-7400}" in text
    assert '--rank "$SLURM_PROCID"' in text  # not a RANK the submitting shell may export
    assert 'srun --kill-on-bad-exit=0 --cpus-per-task="$SLURM_CPUS_PER_TASK"' in text  # Slurm 22.05+ does not pass it on
    subprocess.run(["bash", "-n", str(script)], check=True)


def test_kubernetes_manifest(tmp_path: Path) -> None:
    yaml = pytest.importorskip("yaml", reason="PyYAML is not installed")
    write_bootstrap(SwarmPlan(hosts=("h1",), gpus_per_host=3), tmp_path)
    docs = list(yaml.safe_load_all((tmp_path / "swarmnet-k8s.yaml").read_text()))
    kinds = {d["kind"]: d for d in docs}
    assert kinds["Service"]["spec"]["clusterIP"] == "None"
    job = kinds["Job"]["spec"]  # peers end: a Job's pods complete, a StatefulSet's would be restarted
    assert job["completionMode"] == "Indexed" and job["completions"] == job["parallelism"] == 3
    assert job["backoffLimit"] == 18  # all peers' restarts count together: reached, it ends every pod
    pod = job["template"]["spec"]
    assert pod["restartPolicy"] == "OnFailure" and pod["subdomain"] == kinds["Service"]["metadata"]["name"]
    assert pod["containers"][0]["resources"]["requests"] == {"cpu": "2", "memory": "8Gi"}  # not BestEffort
    args = pod["containers"][0]["args"][0]
    assert '--rank "$JOB_COMPLETION_INDEX"' in args and "tcp://swarmnet-0.swarmnet:7100" in args
    assert '--advertise "tcp://swarmnet-$JOB_COMPLETION_INDEX.swarmnet:7100"' in args
    # An evicted peer must not exit 0: its pod would count as a completed index, never replaced.
    assert "--set run.stopped_exit_code=143" in args
    config = tmp_path / "from-configmap.toml"
    config.write_text(kinds["ConfigMap"]["data"]["swarm.toml"])
    assert load_config(config, {"run.stopped_exit_code": 143}).run.peers == 3


def test_refuses_to_overwrite_without_force(tmp_path: Path) -> None:
    plan = SwarmPlan(hosts=("h1",), gpus_per_host=2)
    (tmp_path / "Procfile").write_text("mine\n")
    with pytest.raises(ConfigError, match="--force"):
        write_bootstrap(plan, tmp_path)
    assert (tmp_path / "Procfile").read_text() == "mine\n"
    assert not (tmp_path / "peers").exists()  # nothing written at all
    result = CliRunner().invoke(cli(), ["init", "--hosts", "h1", "--out", str(tmp_path)])
    assert result.exit_code == 2
    write_bootstrap(plan, tmp_path, force=True)
    assert (tmp_path / "Procfile").read_text() == render_all(plan)["Procfile"]


def test_force_removes_the_manifests_of_peers_an_earlier_plan_had(tmp_path: Path) -> None:
    write_bootstrap(SwarmPlan(hosts=("n1", "n2"), gpus_per_host=2), tmp_path)
    (tmp_path / "peers" / "mine.toml").write_text('name = "mine"\n')  # not init's: kept
    write_bootstrap(SwarmPlan(hosts=("n1",), gpus_per_host=2), tmp_path, force=True)
    assert sorted(p.name for p in (tmp_path / "peers").glob("*.toml")) == ["mine.toml", "peer0.toml", "peer1.toml"]


def test_a_slurm_seed_host_is_read_without_sigpipe_on_a_long_node_list(tmp_path: Path) -> None:
    """Under set -euo pipefail, `scontrol ... | head -n 1` could end the script when scontrol got
    SIGPIPE writing the rest of a long list; the script's own line, fed 5,000 names, must not."""
    write_bootstrap(SwarmPlan(hosts=("h1",), gpus_per_host=1), tmp_path)
    line = next(line for line in (tmp_path / "swarmnet.sbatch").read_text().splitlines() if line.startswith("SEED_HOST="))
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "scontrol").write_text("#!/bin/bash\nfor i in $(seq 0 4999); do echo gpu-node-$i; done\n")
    (fake / "scontrol").chmod(0o755)
    for _ in range(5):
        out = subprocess.run(["bash", "-c", f"set -euo pipefail\n{line}\necho $SEED_HOST"], capture_output=True,
                             text=True, env={"PATH": f"{fake}:/usr/bin:/bin", "SLURM_JOB_NODELIST": "x"})
        assert out.returncode == 0 and out.stdout.strip() == "gpu-node-0", out


@pytest.mark.parametrize(("port_base", "listen"), [(None, 7401), ("7200", 7201)])
def test_the_slurm_script_starts_each_task_as_its_peer(tmp_path: Path, port_base: str | None, listen: int) -> None:
    """The whole batch script under fake scontrol, srun and swarmnet: task 3 (the second GPU of
    its node) gets its rank, its port and the first node's seed; PORT_BASE from sbatch --export wins."""
    write_bootstrap(SwarmPlan(hosts=("h1", "h2"), gpus_per_host=2, port_base=7400), tmp_path)
    fake = tmp_path / "bin"
    fake.mkdir()
    for name, body in {"scontrol": "printf 'node-a\\nnode-b\\n'", "hostname": "echo node-b",
                       "srun": 'while [ "$1" != bash ]; do shift; done; exec "$@"', "swarmnet": 'echo "$@"'}.items():
        (fake / name).write_text(f"#!/bin/bash\n{body}\n")
        (fake / name).chmod(0o755)
    env = {"PATH": f"{fake}:/usr/bin:/bin", "SLURM_JOB_NODELIST": "node-[a-b]", "SLURM_PROCID": "3",
           "SLURM_LOCALID": "1", "SLURM_CPUS_PER_TASK": "4", "SLURM_JOB_ID": "42"} | ({"PORT_BASE": port_base} if port_base else {})
    out = subprocess.run(["bash", str(tmp_path / "swarmnet.sbatch")], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=20)
    assert out.returncode == 0, out.stderr
    base = listen - 1
    assert out.stdout.split() == [
        "peer", "--config", "configs/swarm.toml", "--name", "peer3", "--rank", "3",
        "--listen", f"tcp://0.0.0.0:{listen}", "--advertise", f"tcp://node-b:{listen}", "--seed", f"tcp://node-a:{base}",
        "--device", "auto", "--run-dir", "runs/swarm-42"]


@pytest.mark.parametrize("kwargs, message", [
    ({"hosts": ("a", "a")}, "'a' is listed twice"), ({"hosts": ("a", "A")}, r"'A' is listed twice \(as 'a'\)"),
    ({"hosts": ("a b",)}, "--hosts"), ({"hosts": ("node_1",)}, r"'node_1' is not a host name: .* \(found '_'\)"),
    ({"hosts": ("10.0.0.1", "10.0.0.01")}, "'10.0.0.01' is not an IPv4 address"),
    ({"hosts": ("a\nb",)}, "--hosts"), ({"hosts": ("a$(id)b",)}, "--hosts"), ({"hosts": ("-x",)}, "--hosts"),
    ({"gpus_per_host": 0}, "gpus"), ({"codec": "nope"}, "unknown codec"), ({"port_base": 80}, "port"),
    ({"port_base": 65535, "gpus_per_host": 2}, r"port-base: must be in \[1024, 65534\]"),
    ({"gpus_per_host": 100_000}, r"--gpus-per-host: must be in \[1, 64512\] \(each peer"),
])
def test_bad_arguments(kwargs: dict, message: str) -> None:
    args = {"hosts": ("a",), "gpus_per_host": 1, **kwargs}
    with pytest.raises(ConfigError, match=message):
        SwarmPlan(**args)
