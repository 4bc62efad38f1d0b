# Prism — two commands on a fresh machine:
#   make serve   install everything into .venv and serve the embedded default on http://127.0.0.1:8000
#   make test    install the same environment and run the whole suite (what .ci/run calls)

PY ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.prism-installed
SYSTEM_PACKAGES := libvulkan1 libomp5 fonts-dejavu-core chromium

# Ray 2.60 on one machine: keep the cluster on loopback, no usage reporting; never reach a model hub.
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER := 0
export RAY_DISABLE_USAGE_STATS := 1
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: serve test install system-deps lint unit integration e2e cluster check-config train-intent loadtest loadtest-1000 \
	plan-gpu train-builtin frontier chaos screenshot clean

$(STAMP): requirements.txt pyproject.toml
	$(MAKE) system-deps
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements.txt
	$(BIN)/python -m pip install --quiet --no-deps -e .
	$(BIN)/python -m pip check
	$(BIN)/python -m engines.minilm_onnx
	touch $@

install: $(STAMP)

# Real-ESRGAN (ncnn) needs the Vulkan loader and OpenMP; the typography stage uses DejaVu fonts.
system-deps:
	@missing=""; for p in $(SYSTEM_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  sudo=$$([ "$$(id -u)" -eq 0 ] || echo sudo); \
	  echo "installing Debian packages:$$missing"; \
	  $$sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$sudo apt-get install -y -qq $$missing; \
	fi

serve: install check-config
	$(BIN)/serve run serve_config.yaml

check-config: install
	$(BIN)/python -m graph.config serve_config.yaml serve_config.gpu.yaml serve_config.hybrid.yaml

# Tests run shuffled (pytest-randomly) in an order fixed by SEED, so a run is reproducible; `make test SEED=7` tries
# another order. Unit tests go first in their own process (two workers, no Ray: a failure stops `make` before any Ray
# starts), then one Ray Serve session for the integration suite, then the two-node cluster, then `serve run` as a user.
SEED ?= 1
PYTEST := $(BIN)/python -m pytest -p randomly --randomly-seed=$(SEED)

test: install lint
	$(PYTEST) tests/unit -n 2
	$(PYTEST) tests/integration --durations=25
	$(PYTEST) tests/cluster
	$(PYTEST) tests/e2e

lint: install
	$(BIN)/ruff check .

unit: install
	$(PYTEST) tests/unit -n 2

integration: install
	$(PYTEST) tests/integration --durations=25

e2e: install
	$(PYTEST) tests/e2e

# Two Ray nodes on loopback (one with logical GPUs): placement, losing the GPU node, getting it back.
cluster: install
	$(PYTEST) tests/cluster

# Load tests (bounded, loopback only): start Prism on the simulated profile if it is not up, run Locust
# headless, check loadtests/targets.yaml, stop what was started. Exit non-zero on a missed target.
loadtest: install
	$(BIN)/python loadtests/run.py

loadtest-1000: install
	$(BIN)/python loadtests/run.py --users 1000 --spawn-rate 100 --run-time 90 --profile sim1000

# How Ray will pack the GPU profile at max scale on a node shape (exit 1 if co-located models do not fit).
plan-gpu: install
	$(BIN)/python -m graph.placement serve_config.gpu.yaml --gpus-per-node 8 --gpu-memory-gb 80 --nodes 2

# Retrain the intent head on data/intent/train.jsonl (seconds); commits engines/assets/intent_head.npz.
train-intent: install
	$(BIN)/python -m engines.intent train

# Kills replicas, the Serve controller and the proxy under load (needs port 8000 free); figures in RESULTS.md.
chaos: install
	$(BIN)/python -m loadtests.chaos

# The README's playground screenshot, taken by the browser test against the real graph.
screenshot: install
	PRISM_SCREENSHOT_DIR=docs $(BIN)/python -m pytest tests/integration/test_playground.py -k generate

# Trains the built-in models (engines/builtin_models/) from seed 0; ~20 min each on 2 CPU cores.
train-builtin: install
	$(BIN)/python -m training.builtin

# Adherence-vs-latency frontier and sample grid of the built-in models (benchmarks/builtin_*.png).
frontier: install
	$(BIN)/python -m benchmarks.builtin_frontier

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
