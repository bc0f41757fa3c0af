# The README's two commands: `make run` (the main job) and `make test`.
# Both create .venv and install everything on first use; afterwards they start at once.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build of torch is taken from the machine's wheel cache when it has one.
TORCH ?= torch==2.13.0
ARGS ?=
PYTEST_ARGS ?=

.PHONY: run test setup lint

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# The plain editable install users type: hatchling makes it a .pth line naming the checkout,
# so Hydra finds the sweeper plugin from any directory.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[dev,dashboard]"
	touch $@

setup: $(VENV)/.installed

# The main job is the default sweep; running it again resumes (or does nothing once done).
run: $(VENV)/.installed
	$(BIN)/python -m lora_sweep -m $(ARGS)

test: $(VENV)/.installed
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# What CI runs before the tests: lint, formatting and types.
lint: $(VENV)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
