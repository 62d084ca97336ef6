# Two commands: `make quickstart` and `make test`. Both create .venv if it is missing and install
# the project with the pinned, tested set in constraints.txt.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PYTEST_ARGS ?=
# Where torch comes from. Empty: pip's own index (on this project's CI machine a CPU build on local
# disk; on an ordinary Linux x86_64 machine PyPI's torch, a CUDA build of several GB). Set it to
# PyTorch's CPU index for a CPU-only machine (make TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu test)
# or to a CUDA index (.../whl/cu128): torch alone is installed from there first, the rest from the
# usual index, so the two indexes never compete for the same package.
TORCH_INDEX_URL ?=

.PHONY: quickstart test install install-dev lint clean device-bundle

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# Stamp files so a second `make` does not reinstall; they depend on what defines the install.
$(VENV)/.installed: $(BIN)/python pyproject.toml constraints.txt
	$(if $(TORCH_INDEX_URL),$(BIN)/python -m pip install --disable-pip-version-check -q --index-url $(TORCH_INDEX_URL) "$$(grep -E '^torch==' constraints.txt)")
	$(BIN)/python -m pip install --disable-pip-version-check -q -c constraints.txt -e .
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	$(BIN)/python -m pip install --disable-pip-version-check -q -c constraints.txt -e '.[dev]'
	touch $@

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

quickstart: install
	$(BIN)/aigc quickstart

test: install-dev
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: install-dev
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

clean:
	rm -rf $(VENV) .pytest_cache

# The bundle for the GPU machine (platform/device/README.md): what its Python lacks, pruned, xz,
# split under 64 MiB a call, into build/device-bundle. Its Python (3.12) is not ours (3.11): the
# distributions with compiled extensions come from cp312 wheels, fetched into DEVICE_WHEELS.
DEVICE_TARGET ?= platform/device/target-h200.json
DEVICE_WHEELS ?= build/device-wheels
device-bundle: install
	$(BIN)/python platform/device/build_bundle.py --target $(DEVICE_TARGET) --wheels $(DEVICE_WHEELS) --fetch-wheels
