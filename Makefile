# Fedge: the two commands a user needs are `make demo` and `make test`.
# Everything they need is installed here, into .venv, on first use.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_VERSION ?= 2.13.0
# Extra pip arguments for torch, e.g. TORCH_PIP_ARGS="--index-url <your CPU wheel index>".
TORCH_PIP_ARGS ?=
STAMP := $(VENV)/.fedge-installed
PYTEST_ARGS ?=
# Python's own bytecode cache, even where the environment turns it off: the tests start
# some hundred interpreters (agents, coordinators, pytest workers), and each would compile
# the project again and pytest rewrite every test module's asserts (15 s a collection).
unexport PYTHONDONTWRITEBYTECODE
# Workers for the tests (pytest-xdist), integration tests included: each starts its own
# broker on free ports. The few that assert a wall-clock limit (online within 2 s, ...;
# marked `wallclock`) run after them, alone and in order, on an otherwise idle machine.
PYTEST_WORKERS ?= 2

.PHONY: help setup broker demo-broker test test-fast test-integration lint demo bench dist clean

help:
	@echo "make demo   - set everything up and run the product tour"
	@echo "make test   - set everything up, lint, type-check and run the tests"
	@echo "make lint   - ruff + mypy --strict"
	@echo "make bench  - run the benchmarks in bench/"
	@echo "make dist   - build the wheel and the .deb packages into dist/"

$(STAMP): pyproject.toml setup.py cloud_coordinator/_fold.c
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' || \
	  { echo "Fedge needs Python >= 3.11 (found: $$($(PYTHON) --version 2>&1)). Set PYTHON=/path/to/python3.11."; exit 1; }
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@# The coordinator's optional C kernel needs a compiler and the Python headers.
	@if ! { $(HAVE_CC); } && $(CAN_APT); then echo "Installing gcc and python3-dev with apt-get"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq gcc python3-dev \
	  >/dev/null || echo "apt-get failed; fedge is installed without its C kernel"; fi
	$(BIN)/python -m pip install -q --upgrade pip
	@# torch first and pinned: a bare requirement would pull a multi-GB CUDA build.
	$(BIN)/python -m pip install -q $(TORCH_PIP_ARGS) "torch==$(TORCH_VERSION)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	@$(BIN)/python -c 'from cloud_coordinator import checked_sums as c; c.kernel_built() or print( \
	  "note: the C kernel cloud_coordinator._fold was not built (needs a C compiler with OpenMP" \
	  " and the Python headers); FedAvg on the CPU uses torch alone, two passes per update.")'
	@touch $@

setup: $(STAMP) broker

# Mosquitto is a real dependency of the integration tests; the demo falls back to the
# embedded amqtt broker without it.
HAVE_MOSQUITTO = command -v mosquitto >/dev/null 2>&1 || test -x /usr/sbin/mosquitto
HAVE_CC = command -v cc >/dev/null 2>&1 && test -f "$$($(BIN)/python -c \
	'import sysconfig; print(sysconfig.get_paths()["include"])')/Python.h"
CAN_APT = [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1
APT_MOSQUITTO = echo "Installing Mosquitto with apt-get"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mosquitto >/dev/null

broker:
	@if $(HAVE_MOSQUITTO); then :; \
	elif $(CAN_APT); then $(APT_MOSQUITTO); \
	else \
	  echo "Mosquitto is missing. Install it (Debian/Ubuntu: sudo apt-get install mosquitto) and run make again."; \
	  exit 1; \
	fi

demo-broker:
	@if $(HAVE_MOSQUITTO); then :; \
	elif $(CAN_APT); then $(APT_MOSQUITTO) || echo "apt-get failed; the demo uses the embedded amqtt broker"; \
	else echo "Mosquitto not installed; the demo uses the embedded amqtt broker (MQTT 3.1.1)."; \
	fi

lint: $(STAMP)
	$(BIN)/ruff check agent cloud_coordinator protocols tests bench
	$(BIN)/ruff format --check agent cloud_coordinator protocols tests bench
	$(BIN)/mypy agent cloud_coordinator protocols bench

test: setup lint
	$(BIN)/pytest -m "not wallclock" -n $(PYTEST_WORKERS) --dist worksteal $(PYTEST_ARGS)
	$(BIN)/pytest -m wallclock $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(BIN)/pytest -m "not integration and not slow and not wallclock" -n $(PYTEST_WORKERS) $(PYTEST_ARGS)

test-integration: setup
	$(BIN)/pytest -m "integration and not wallclock" -n $(PYTEST_WORKERS) --dist worksteal $(PYTEST_ARGS)
	$(BIN)/pytest -m "integration and wallclock" $(PYTEST_ARGS)

demo: $(STAMP) demo-broker
	$(BIN)/fedge-coordinator demo $(DEMO_ARGS)

bench: setup
	$(BIN)/python -m bench.codec
	$(BIN)/python -m bench.compression
	$(BIN)/python -m bench.aggregate
	$(BIN)/python -m bench.round
	$(BIN)/python -m bench.byzantine
	$(BIN)/python -m bench.async_rounds
	$(BIN)/python -m bench.gpu_aggregate
	$(BIN)/python -m bench.inference
	$(BIN)/python -m bench.hot_swap
	$(BIN)/python -m bench.micro_batching

# The sdist, the wheel with the coordinator's C kernel (this platform) and the pure wheel
# (any platform: the agent's), then the .deb packages built from them.
dist: $(STAMP)
	rm -rf dist
	$(BIN)/python -m build --wheel --sdist --outdir dist .
	FEDGE_PURE=1 $(BIN)/python -m build --wheel --outdir dist .
	bash packaging/build-deb.sh dist

clean:
	rm -rf $(VENV) dist build *.egg-info .mypy_cache .ruff_cache .pytest_cache
