"""Swarm bootstrap files: what ``swarmnet init`` writes to start one peer per GPU on a set of hosts.

From a host list and a GPU count it plans one peer per (host, GPU), then renders the peer
manifests (``peers/*.toml``), a swarm config (``configs/swarm.toml``), a ``Procfile`` for the first
host, a Slurm batch script and a Kubernetes Indexed Job. Every peer's seed is the first peer of the
first host. Nothing is written when any target exists, unless ``force``.
"""

from __future__ import annotations

import ipaddress
import json
import re
from dataclasses import dataclass
from pathlib import Path

from swarmnet.codecs import CODECS
from swarmnet.errors import ConfigError
from swarmnet.log import counted
from swarmnet.peer.budget import LOCAL_PEERS_VARIABLE

GLIBC_TUNABLES = "glibc.malloc.hugetlb=1"
"""Set for every peer unless its environment says otherwise (swarmnet up, and the files written
here): fresh receive buffers on huge pages, much faster large pulls (docs/benchmarks.md, Exchange
and Receive buffers)."""
# A Procfile line runs under sh (honcho, foreman): a value the environment already has is kept.
PROCFILE_TUNABLES = f'GLIBC_TUNABLES="${{GLIBC_TUNABLES:-{GLIBC_TUNABLES}}}"'

CONFIG_PATH = "configs/swarm.toml"
SLURM_PATH = "swarmnet.sbatch"
KUBERNETES_PATH = "swarmnet-k8s.yaml"


@dataclass(frozen=True, slots=True)
class PeerPlan:
    name: str
    host: str
    gpu: int
    rank: int
    port: int

    @property
    def advertise(self) -> str:
        return f"tcp://{self.host}:{self.port}"

    @property
    def listen(self) -> str:
        return f"tcp://0.0.0.0:{self.port}"


MARK = "Written by swarmnet init."
"""On the first line of every manifest init writes: ``--force`` removes those a new plan drops."""

HOST = re.compile(r"[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?")
"""A host name or IPv4 address as the files written put it in addresses and shell lines."""


def _not_a_host(host: str) -> str:
    """Why ``host`` cannot stand in the files written ("" where it can)."""
    if re.fullmatch(r"[0-9.]+", host):
        try:
            ipaddress.IPv4Address(host)
        except ValueError as exc:
            return f"is not an IPv4 address ({exc})"
        return ""
    if not HOST.fullmatch(host):
        odd = sorted({c for c in host if not (c.isascii() and (c.isalnum() or c in ".-"))})
        shown = ", ".join(repr(c) for c in odd) or "its first or last character"
        return (f"is not a host name: letters, digits, '.' and '-' only, starting and ending with a letter or "
                f"digit (found {shown}); give the name the hosts resolve, or the address")
    return ""


@dataclass(frozen=True, slots=True)
class SwarmPlan:
    """One peer per GPU per host; ranks run host-major, ports ``port_base + gpu`` on every host."""

    hosts: tuple[str, ...]
    gpus_per_host: int
    port_base: int = 7100
    codec: str = "fp32"

    def __post_init__(self) -> None:
        if not self.hosts or not all(self.hosts):
            raise ConfigError(f"--hosts: expected host names or IPv4 addresses separated by commas, got "
                              f"{','.join(self.hosts)!r}")
        for host in self.hosts:
            if why := _not_a_host(host):
                raise ConfigError(f"--hosts: {host!r} {why}")
        seen: dict[str, str] = {}
        for host in self.hosts:
            if (same := seen.get(host.lower())) is not None:  # DNS names ignore case
                raise ConfigError(f"--hosts: {host!r} is listed twice" + (f" (as {same!r})" if same != host else ""))
            seen[host.lower()] = host
        if not 1 <= self.gpus_per_host <= 65536 - 1024:
            raise ConfigError(f"--gpus-per-host: must be in [1, {65536 - 1024}] (each peer of a host takes a port "
                              "of its own from --port-base up)")
        if not 1024 <= self.port_base <= 65536 - self.gpus_per_host:  # ports port_base .. + gpus - 1
            raise ConfigError(f"--port-base: must be in [1024, {65536 - self.gpus_per_host}]")
        if self.codec not in CODECS:
            raise ConfigError(f"--codec: unknown codec {self.codec!r}; available: {', '.join(sorted(CODECS))}")

    @property
    def peers(self) -> list[PeerPlan]:
        return [PeerPlan(name=f"peer{h * self.gpus_per_host + g}", host=host, gpu=g,
                         rank=h * self.gpus_per_host + g, port=self.port_base + g)
                for h, host in enumerate(self.hosts) for g in range(self.gpus_per_host)]

    @property
    def seed(self) -> str:
        return self.peers[0].advertise

    @property
    def size(self) -> int:
        return len(self.hosts) * self.gpus_per_host


def _toml_str(value: str) -> str:
    return json.dumps(value)  # a JSON string is a valid TOML basic string for these values


def render_manifest(plan: SwarmPlan, peer: PeerPlan) -> str:
    seeds = [] if peer.advertise == plan.seed else [plan.seed]
    return (
        f"# Peer {peer.rank} of {plan.size}: {peer.host} GPU {peer.gpu}. {MARK}\n"
        f"name = {_toml_str(peer.name)}\n"
        f"listen = {_toml_str(peer.listen)}\n"
        f"advertise = {_toml_str(peer.advertise)}\n"
        f"device = {_toml_str(f'cuda:{peer.gpu}')}\n"
        f"seeds = [{', '.join(_toml_str(s) for s in seeds)}]\n"
        f"rank = {peer.rank}\n"
    )


def render_config(plan: SwarmPlan) -> str:
    return f"""# Swarm of {plan.size} peers ({len(plan.hosts)} hosts x {plan.gpus_per_host} GPUs), written by swarmnet init.
# Based on configs/quickstart.toml; every key is documented in swarmnet/config.py.

[run]
dir = "runs/swarm"
seed = 0
peers = {plan.size}

[task]
spec = "swarmnet.tasks.digits:task"

[train]
batch_size = 32
epochs = 30
lr = 0.05
momentum = 0.9
schedule = "cosine"
metrics_every = 10

[algorithm]
name = "swarmsgd"
local_steps = 2

[codec]
name = {_toml_str(plan.codec)}

[network]
# Wait for most of the swarm before the first step, then keep serving a little after the budget.
min_peers = {max(0, min(plan.size - 1, (plan.size * 3) // 4))}
linger = 10.0
"""


def render_procfile(plan: SwarmPlan) -> str:
    """The first host's peers; each is told how many share the host, which its exchange's CPU
    budget divides the cores by (docs/operations.md), as `swarmnet up` and Slurm tell theirs."""
    lines = [f"# Peers of {plan.hosts[0]} (run `honcho start` there, from this directory). Written by swarmnet init."]
    for peer in plan.peers:
        if peer.host == plan.hosts[0]:
            lines.append(f"{peer.name}: exec env PYTHONUNBUFFERED=1 {LOCAL_PEERS_VARIABLE}={plan.gpus_per_host} "
                         f"{PROCFILE_TUNABLES} swarmnet peer --config {CONFIG_PATH} --peer peers/{peer.name}.toml")
    return "\n".join(lines) + "\n"


def render_slurm(plan: SwarmPlan) -> str:
    g = plan.gpus_per_host
    return f"""#!/bin/bash
# {counted(plan.size, 'swarmnet peer')}: one per GPU, {g} per node. Submit from this directory: sbatch {SLURM_PATH}
# Each peer's rank is SLURM_PROCID (given, so that a RANK exported in the submitting shell
# cannot stand in), its GPU SLURM_LOCALID (device auto).
#SBATCH --job-name=swarmnet
#SBATCH --nodes={len(plan.hosts)}
#SBATCH --ntasks-per-node={g}
#SBATCH --gpus-per-node={g}
#SBATCH --cpus-per-task=4
#SBATCH --output=swarmnet-%j.out
set -euo pipefail

PORT_BASE=${{PORT_BASE:-{plan.port_base}}}  # two jobs on one node need two: sbatch --export=ALL,PORT_BASE=N
SEED_HOST=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | sed -n 1p)  # reads all: no SIGPIPE under pipefail
export PORT_BASE SEED_HOST PYTHONUNBUFFERED=1
export GLIBC_TUNABLES="${{GLIBC_TUNABLES:-{GLIBC_TUNABLES}}}"

# srun inherits --cpus-per-task from sbatch no more (Slurm 22.05+): each peer's compute and
# exchange threads would share one core.
srun --kill-on-bad-exit=0 --cpus-per-task="$SLURM_CPUS_PER_TASK" bash -c 'exec swarmnet peer --config {CONFIG_PATH} \\
    --name "peer$SLURM_PROCID" --rank "$SLURM_PROCID" \\
    --listen "tcp://0.0.0.0:$((PORT_BASE + SLURM_LOCALID))" \\
    --advertise "tcp://$(hostname):$((PORT_BASE + SLURM_LOCALID))" \\
    --seed "tcp://$SEED_HOST:$PORT_BASE" \\
    --device auto --run-dir "runs/swarm-$SLURM_JOB_ID"'
"""


def render_kubernetes(plan: SwarmPlan) -> str:
    config = "\n".join(f"    {line}" if line else "" for line in render_config(plan).splitlines())
    port = plan.port_base
    return f"""# {counted(plan.size, 'swarmnet peer')} as an Indexed Job, one GPU per pod. Apply with: kubectl apply -f {KUBERNETES_PATH}
# Pod N (JOB_COMPLETION_INDEX) is named swarmnet-N; with the headless Service its DNS name is
# swarmnet-N.swarmnet. Pod swarmnet-0 is the seed and each pod's index is its rank. A peer that
# ends its budget completes; one that fails restarts in its pod and resumes from its checkpoint
# under /data (an emptyDir: it lives as long as the pod; mount a PersistentVolumeClaim there to
# keep the results). The config below is a copy of configs/swarm.toml made by swarmnet init.
# Set the image to one with swarmnet installed.
apiVersion: v1
kind: ConfigMap
metadata:
  name: swarmnet-config
data:
  swarm.toml: |
{config}
---
apiVersion: v1
kind: Service
metadata:
  name: swarmnet
spec:
  clusterIP: None
  publishNotReadyAddresses: true
  selector:
    app: swarmnet
  ports:
    - name: swarm
      port: {port}
---
apiVersion: batch/v1
kind: Job
metadata:
  name: swarmnet
spec:
  completionMode: Indexed
  completions: {plan.size}
  parallelism: {plan.size}
  backoffLimit: {6 * plan.size}  # every peer's restarts together; reaching it ends every pod of the Job
  template:
    metadata:
      labels:
        app: swarmnet
    spec:
      subdomain: swarmnet
      restartPolicy: OnFailure
      containers:
        - name: peer
          image: swarmnet:latest
          ports:
            - containerPort: {port}
              name: swarm
          env:
            - name: PYTHONUNBUFFERED
              value: "1"
            - name: GLIBC_TUNABLES
              value: "{GLIBC_TUNABLES}"
          command: ["bash", "-c"]
          args:
            - >-
              exec swarmnet peer --config /etc/swarmnet/swarm.toml
              --name "swarmnet-$JOB_COMPLETION_INDEX" --rank "$JOB_COMPLETION_INDEX"
              --listen "tcp://0.0.0.0:{port}"
              --advertise "tcp://swarmnet-$JOB_COMPLETION_INDEX.swarmnet:{port}"
              --seed "tcp://swarmnet-0.swarmnet:{port}"
              --device cuda:0 --run-dir /data/runs
              --set run.stopped_exit_code=143
          resources:  # requests: without them the pods are the first evicted under pressure
            requests:
              cpu: "2"  # the training thread, and the exchange, serving and gossip beside it
              memory: 8Gi  # a few copies of the model and the task's data: size to yours
            limits:
              nvidia.com/gpu: 1
          volumeMounts:
            - name: config
              mountPath: /etc/swarmnet
            - name: data
              mountPath: /data
      volumes:
        - name: config
          configMap:
            name: swarmnet-config
        - name: data
          emptyDir: {{}}
"""


def render_all(plan: SwarmPlan) -> dict[str, str]:
    """Relative path -> file text, for every file ``swarmnet init`` writes."""
    files = {f"peers/{p.name}.toml": render_manifest(plan, p) for p in plan.peers}
    files[CONFIG_PATH] = render_config(plan)
    files["Procfile"] = render_procfile(plan)
    files[SLURM_PATH] = render_slurm(plan)
    files[KUBERNETES_PATH] = render_kubernetes(plan)
    return files


def write_bootstrap(plan: SwarmPlan, out: Path, *, force: bool = False) -> list[Path]:
    """Write every file under ``out``. Raises ConfigError, before writing anything, when a file
    already exists and ``force`` is false; with ``force``, manifests an earlier init wrote for
    peers this plan does not have are removed. Returns the paths written."""
    files = {out / rel: text for rel, text in render_all(plan).items()}
    existing = [p for p in files if p.exists()]
    if existing and not force:
        shown = ", ".join(str(p) for p in existing[:5]) + (" ..." if len(existing) > 5 else "")
        raise ConfigError(f"{len(existing)} file(s) already exist ({shown}); pass --force to overwrite")
    for path, text in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        if path.suffix == ".sbatch":
            path.chmod(0o755)
    for stale in sorted((out / "peers").glob("*.toml")):  # an earlier plan's, which `up --manifests` would start
        if stale not in files and MARK in stale.read_text(errors="replace").split("\n", 1)[0]:
            stale.unlink()
    return list(files)
