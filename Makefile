# Two entry points for a fresh machine: `make quickstart` (a local 4-peer swarm on the bundled
# digits task) and `make test` (the test suite). Both create .venv on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# A GPU machine gets the CUDA build; a CPU machine the CPU build, from a local wheel where pip's
# find-links hold one, else from PyTorch's CPU index.
TORCH_PIN ?= torch==2.13.0
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu

.PHONY: quickstart test gpu-check gpu-wheels venv clean

$(BIN)/swarmnet: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# Where a GPU answers, a local cache's CPU-only wheel (2.13.0+cpu ranks above PyPI's 2.13.0,
	# the CUDA build for Linux) must not be taken. Where none answers and no local wheel is found,
	# PyPI's Linux build would be the CUDA one (several GB): the CPU index's ranks above it the same way.
	if nvidia-smi -L >/dev/null 2>&1; then \
		PIP_FIND_LINKS= $(BIN)/python -m pip install -q "$(TORCH_PIN)"; \
	elif $(BIN)/python -m pip install -q --dry-run --no-deps --no-index "$(TORCH_PIN)" >/dev/null 2>&1; then \
		$(BIN)/python -m pip install -q "$(TORCH_PIN)"; \
	else \
		$(BIN)/python -m pip install -q --extra-index-url $(TORCH_CPU_INDEX) "$(TORCH_PIN)"; \
	fi
	$(BIN)/python -m pip install -q -e ".[test]"
	# UCX bindings are optional: where they cannot be installed the UCX tests skip with the reason.
	$(BIN)/python -m pip install -q -e ".[ucx]" || echo "swarmnet: UCX bindings not installed; UCX transport tests will be skipped"
	touch $@

venv: $(BIN)/swarmnet

quickstart: venv
	$(BIN)/swarmnet up --config configs/quickstart.toml --summary runs/quickstart/summary.json

test: venv
	$(BIN)/python -m pytest

# On a GPU machine: the CUDA path's tests, then codec throughput and the step rate of 4 peers
# sharing GPU 0 with the exchange on and off (docs/operations.md, GPUs), into runs/gpu/.
gpu-check: venv
	tests/gpu/check.sh $(BIN)/python runs/gpu

# For a GPU node with torch but no package index: the wheels its image may lack (GPU_WHEELS),
# for its Python and platform, into .whl/; there, `SWARMNET_WHEELS=.whl tests/gpu/check.sh`.
GPU_PYTHON_VERSION ?= 3.12
GPU_PLATFORMS ?= manylinux_2_28_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64
GPU_WHEELS ?= pyzmq==27.3.0 setproctitle==1.3.8
gpu-wheels:
	$(PYTHON) -m pip download -q --no-deps --only-binary=:all: --implementation cp \
		--python-version $(GPU_PYTHON_VERSION) $(addprefix --platform ,$(GPU_PLATFORMS)) -d .whl $(GPU_WHEELS)

clean:
	rm -rf $(VENV) runs
