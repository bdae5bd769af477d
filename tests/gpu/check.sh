#!/usr/bin/env bash
# The CUDA path's proof on a GPU machine, in one command: the tests of tests/gpu, the codecs'
# throughput on the GPU, and the step rate of peers sharing the GPU with exchange on against off.
#
#   tests/gpu/check.sh [PYTHON] [OUT_DIR]        defaults: python3, runs/gpu
#
# OUT_DIR receives versions.txt, tests.log and each benchmark's log and JSON. `make gpu-check`
# runs it with the project's virtual environment. On a node that has torch but reaches no
# package index, set SWARMNET_WHEELS to a folder of the wheels it lacks (`make gpu-wheels`
# fetches pyzmq's, the one dependency a typical torch image lacks): they are installed into a
# temporary folder beside the system's packages, and the checkout itself is used in place.
# The exit status is 1 when a step failed; each step runs whatever the ones before it gave.
set -uo pipefail
python=${1:-python3}
out=${2:-runs/gpu}
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
mkdir -p "$out" && out=$(cd "$out" && pwd)
cd "$root" || exit 1
export PYTHONUNBUFFERED=1
if [ -n "${SWARMNET_WHEELS:-}" ]; then
    site=$(mktemp -d)
    "$python" -m pip install -q --no-index --no-deps --no-compile --target "$site" "$SWARMNET_WHEELS"/*.whl || exit 1
    export PYTHONPATH="$root:$site${PYTHONPATH:+:$PYTHONPATH}"
fi

status=0
step() {  # step NAME COMMAND...: run it, its output to the terminal and OUT_DIR/NAME.log
    echo "== $1: ${*:2}"
    "${@:2}" 2>&1 | tee "$out/$1.log" || { echo "== $1 failed"; status=1; }
}
step versions "$python" -c 'import sys, torch, zmq
print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda, "pyzmq", zmq.__version__)
print("gpus", [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] or "none")'
step tests "$python" -m pytest -p no:cacheprovider tests/gpu -v -rs
step bench-codecs "$python" -m swarmnet bench codecs --device cuda --json "$out/bench-codecs.json"
step bench-exchange "$python" -m swarmnet bench exchange --device cuda:0 --peers 4 --quick --rounds 1 \
    --json "$out/bench-exchange.json"
exit $status
