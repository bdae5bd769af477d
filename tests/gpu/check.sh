#!/usr/bin/env bash
# The CUDA path's proof on a GPU machine, in one command: the tests of tests/gpu, the codecs'
# throughput on the GPU, and the step rate of peers sharing the GPU with exchange on against off.
#
#   tests/gpu/check.sh [PYTHON] [OUT_DIR]        defaults: python3, runs/gpu
#
# OUT_DIR receives one log per step (versions.log, tests.log, bench-*.log) and each benchmark's
# JSON. `make gpu-check` runs it with the project's virtual environment. On a node that has torch
# but reaches no package index, set SWARMNET_WHEELS to a folder of the wheels it lacks (`make
# gpu-wheels` fetches them; pyzmq's by default): they are installed into a temporary folder beside
# the system's packages, and the checkout itself is used in place. The first step stops the
# script, naming what is missing, where torch sees no GPU or a dependency does not import; after
# it, each step runs whatever the ones before gave, and the exit status is 1 when one failed.
set -uo pipefail
absolute() { [[ $1 == */* ]] && echo "$(cd "$(dirname "$1")" && pwd)/$(basename "$1")" || echo "$1"; }
python=$(absolute "${1:-python3}")
mkdir -p "${2:-runs/gpu}" || exit 1
out=$(cd "${2:-runs/gpu}" && pwd)
wheels=${SWARMNET_WHEELS:+$(absolute "$SWARMNET_WHEELS")}
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$root" || exit 1
export PYTHONUNBUFFERED=1
if [ -n "$wheels" ]; then
    site=$(mktemp -d)
    trap 'rm -rf "$site"' EXIT
    # By name from the folder, so that pip takes the wheel that fits this Python where it holds several.
    names=$(cd "$wheels" && ls -- *.whl | sed 's/-.*//' | sort -u)
    # shellcheck disable=SC2086  # one argument per name
    "$python" -m pip install -q --no-index --no-deps --no-compile --target "$site" --find-links "$wheels" $names || exit 1
    export PYTHONPATH="$root:$site${PYTHONPATH:+:$PYTHONPATH}"
fi

status=0
step() {  # step NAME COMMAND...: run it, its output to the terminal and OUT_DIR/NAME.log
    local command="${*:2}"
    echo "== $1: ${command:0:160}"
    "${@:2}" 2>&1 | tee "$out/$1.log" || { echo "== $1 failed"; status=1; }
}
step versions "$python" -c '
import importlib, sys
missing = []
for name in ("torch", "zmq", "msgpack", "xxhash", "numba", "uvloop", "typer", "rich", "sklearn", "joblib",
             "matplotlib", "pytest", "pytest_timeout"):
    try:
        importlib.import_module(name)
    except ImportError as exc:
        missing.append(f"{name} ({exc})")
if missing:
    sys.exit("missing: " + ", ".join(missing) + "; fetch their wheels with make gpu-wheels GPU_WHEELS=...")
import torch, zmq
print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda, "pyzmq", zmq.__version__)
if not torch.cuda.is_available():
    sys.exit(f"torch sees no CUDA device (torch.version.cuda = {torch.version.cuda}: None is a CPU build)")
print("gpus", [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())])'
[ $status = 0 ] || exit 1
step tests "$python" -m pytest -p no:cacheprovider tests/gpu -v -rs
step bench-codecs "$python" -m swarmnet bench codecs --device cuda --json "$out/bench-codecs.json"
step bench-exchange "$python" -m swarmnet bench exchange --device cuda:0 --peers 4 --quick --rounds 1 \
    --json "$out/bench-exchange.json"
exit $status
