# Two commands for a new user: `make run` and `make test`. Everything else is a step of those.
PYTHON ?= $(shell command -v python3.11 || command -v python3.12 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
COMPAT := .compat-1.6.3
OLD    := .compat-old-stack
UNAME  := $(shell uname -s)
DEMO   := .cache/demo

.PHONY: setup run test lint browser bench soak proofs clean

setup: $(STAMP)

# The hub declares the MLX stack it is tested with (pyproject.toml); mlx-openai-server
# 1.8.1 is laid over it without its own pins (mlx-lm<0.32, mlx-vlm<0.5), which the
# adapters in mlx_hub/engine/patches make unnecessary.
# Linux: MLX's CPU build and the CPU torch first. torchvision goes: PyPI's build is
# for CUDA torch and breaks transformers' imports beside the CPU torch.
UPSTREAM := mlx-openai-server==1.8.1

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
ifneq ($(UNAME),Darwin)
	$(BIN)/pip install torch==2.13.0 "mlx[cpu]>=0.32.4,<0.33"
endif
	$(BIN)/pip install -e ".[test]"
	$(BIN)/pip install --no-deps $(UPSTREAM)
ifneq ($(UNAME),Darwin)
	-$(BIN)/pip uninstall -y -q torchvision
endif
	touch $(STAMP)

# The 1.6.3 handler package alone, laid in front of site-packages for the compat run.
$(COMPAT)/.installed: $(STAMP)
	rm -rf $(COMPAT)
	$(BIN)/pip install -q --no-deps --target $(COMPAT) mlx-openai-server==1.6.3
	touch $@

# Upstream's own pins (mlx-lm 0.31, mlx-vlm 0.4 and the fastapi/starlette they run with),
# laid in front of site-packages: what a user who keeps upstream's pins runs.
$(OLD)/.installed: $(STAMP)
	rm -rf $(OLD)
	$(BIN)/pip install -q --no-deps --target $(OLD) mlx-lm==0.31.3 mlx-vlm==0.4.4 fastapi==0.129.2 starlette==0.52.1
	touch $@

run: setup
	$(BIN)/python -m mlx_hub.cli.demo --cache $(DEMO)

# Debian's chromium for the dashboard tests (never a browser download). Where it
# cannot be installed those tests skip and say why; the rest of the suite runs.
browser:
ifneq ($(UNAME),Darwin)
	@command -v chromium >/dev/null 2>&1 || \
	  ( $(if $(filter 0,$(shell id -u)),,sudo -n) apt-get update -qq && \
	    $(if $(filter 0,$(shell id -u)),,sudo -n) apt-get install -y -qq chromium ) >/dev/null 2>&1 || \
	  echo "note: Debian chromium could not be installed; the dashboard browser tests will be skipped"
endif

lint: setup
	$(BIN)/ruff check mlx_hub tests benchmarks tools
	$(BIN)/ruff format --check mlx_hub tests benchmarks tools

# Three workers (pytest-xdist) on a 2-core machine: much of a test's time is a
# client waiting on a port or a daemon starting, so a third worker fills the gaps
# (measured on one quiet 2-core machine: the whole suite 18.4 min with 2 workers,
# 16.2 min with 3; both green; 4 workers measured slower, 17.8 min against 16.9: past three
# the suite is bound by its two cores). loadfile keeps each test module on one worker:
# several share a module-scoped daemon or server pair that serves their tests in order.
# TEST_WORKERS=0 runs in one process (for debugging with -s or pdb).
TEST_WORKERS ?= 3

# The whole suite on the newest stack; then the fast and equivalence tiers on upstream's
# pins, and the compat tests on upstream 1.6.3 over those pins.
test: setup $(COMPAT)/.installed $(OLD)/.installed lint browser
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile --durations=15
	HF_HUB_OFFLINE=1 PYTHONPATH=$(OLD) MLX_HUB_EXPECT_STACK=old \
	  $(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile tests/test_fast.py tests/equivalence
	HF_HUB_OFFLINE=1 PYTHONPATH=$(COMPAT):$(OLD) MLX_HUB_EXPECT_UPSTREAM=1.6.3 MLX_HUB_EXPECT_STACK=old \
	  $(BIN)/python -m pytest -q -m compat

# The reliability suite at full length (CI runs it with a 15 s soak).
soak: setup
	HF_HUB_OFFLINE=1 MLX_HUB_SOAK_SECONDS=60 $(BIN)/python -m pytest -q -s -m reliability tests/reliability

# Each run-time patch of another library is still needed: its test fails with the patch switched off.
proofs: setup
	HF_HUB_OFFLINE=1 $(BIN)/python tools/patch_proofs.py

# Speed and memory against a process per model and bare mlx-lm; see benchmarks/README.md.
bench: setup
	$(BIN)/pip install -q matplotlib
	HF_HUB_OFFLINE=1 $(BIN)/python -m benchmarks $(BENCH_ARGS)

clean:
	rm -rf $(VENV) $(COMPAT) $(OLD) .cache .pytest_cache build *.egg-info
