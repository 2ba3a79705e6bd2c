# The README's two commands: `make run` and `make test`. Both create .venv on a fresh
# machine (Python 3.11: bpy 4.5 exists for it only) and install everything needed.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
CONFIG ?= configs/demo.yaml

.PHONY: install run test test-fast lint bench clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# constraints.txt pins the whole resolved tree (re-check it when changing a pin).
	$(BIN)/pip install --quiet -c constraints.txt -e '.[dev]'
	# Kubric's declared deps pull Beam, GCS clients and tfds: install it without them;
	# pyproject.toml declares the runtime subset it needs.
	$(BIN)/pip install --quiet --no-deps kubric-nightly==2023.12.27
	touch $(STAMP)

# ensure_postgres.sh: PostgreSQL's server binaries for the Prefect-on-PostgreSQL test,
# installed where missing and possible (otherwise one line says that test skips).
install: $(STAMP)
	@scripts/ensure_postgres.sh

run: install
	$(BIN)/pvit pipeline $(CONFIG)

test: install
	$(BIN)/pytest -q -ra

test-fast: install
	$(BIN)/pytest -q -m "not slow and not blender"

lint: install
	$(BIN)/ruff check generation training flows tests benchmarks
	$(BIN)/hadolint docker/*.Dockerfile

bench: install
	$(BIN)/python benchmarks/render.py

clean:
	rm -rf $(VENV) data runs out
