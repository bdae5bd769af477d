# Two entry points for a fresh machine: `make quickstart` (a local 4-peer swarm on the bundled
# digits task) and `make test` (the test suite). Both create .venv on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# A GPU machine gets the CUDA build; a CPU machine the CPU build, from a local wheel where pip's
# find-links hold one, else from PyTorch's CPU index.
TORCH_PIN ?= torch==2.13.0
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu

.PHONY: quickstart test gpu-check venv clean

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
	mkdir -p runs/gpu
	$(BIN)/python -m pytest tests/gpu -v -rs
	$(BIN)/swarmnet bench codecs --device cuda --json runs/gpu/bench-codecs.json
	$(BIN)/swarmnet bench exchange --device cuda:0 --peers 4 --quick --rounds 1 --json runs/gpu/bench-exchange.json

clean:
	rm -rf $(VENV) runs
