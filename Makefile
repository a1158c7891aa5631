# `make run` and `make test` set up everything they need; a second call skips what is done.
VENV      := .venv
STAMP     := $(VENV)/.installed
UV        := $(shell command -v uv 2>/dev/null || echo python3 -m uv)
FMNIST    := /usr/share/datasets/fashion-mnist
PYTEST    ?= -q

.PHONY: setup data run test test-slow bench clean

setup: $(STAMP)

# Bytecode is compiled at install: where PYTHONDONTWRITEBYTECODE is set (as on these machines)
# Python would otherwise recompile torch and flwr on every start, ~half of a run's start-up.
$(STAMP): pyproject.toml Makefile
	@python3 -m uv --version >/dev/null 2>&1 || command -v uv >/dev/null 2>&1 || python3 -m pip install --quiet uv
	$(UV) venv --quiet --allow-existing --python python3 $(VENV)
	$(UV) pip install --quiet --compile-bytecode --python $(VENV)/bin/python -e ".[dev]"
	@touch $@

# Real FashionMNIST from Debian's dataset-fashion-mnist package, when apt can install it.
data:
	@if [ -f $(FMNIST)/train-images-idx3-ubyte.gz ]; then :; \
	elif command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	  echo "installing dataset-fashion-mnist"; \
	  (apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 || \
	   (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist >/dev/null)) || \
	  echo "warning: could not install dataset-fashion-mnist"; \
	else \
	  echo "FashionMNIST not in $(FMNIST): run 'sudo apt-get install dataset-fashion-mnist' or set dataset.root"; \
	fi

run: setup data
	$(VENV)/bin/fedcomp

test: setup data
	$(VENV)/bin/pytest $(PYTEST)

test-slow: setup data
	$(VENV)/bin/pytest -q -m slow

bench: setup data
	$(VENV)/bin/python benchmarks/overhead.py
	$(VENV)/bin/python benchmarks/codecs.py
	$(VENV)/bin/python benchmarks/pool_messages.py

clean:
	rm -rf outputs multirun .pytest_cache
