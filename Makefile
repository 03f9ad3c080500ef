# The only layer that knows about ../shared: offline copies of the data and tiktoken's cache.
SHARED ?= $(abspath ../shared)
PYTHON ?= python3
ifneq ($(wildcard $(SHARED)/data),)
export MINIGPT_DATA_DIR ?= $(SHARED)/data
endif
ifneq ($(wildcard $(SHARED)/tiktoken-cache),)
export TIKTOKEN_CACHE_DIR ?= $(SHARED)/tiktoken-cache
endif

.PHONY: torch install install-test train test test-slow test-repro lint

# Torch first, pinned: on this CPU-only machine kind that is the CPU build already on disk,
# where a bare `torch` requirement would pull a multi-GB CUDA build.
torch:
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install -q torch==2.13.0

# What the main job needs: the runtime dependencies only.
install: torch
	$(PYTHON) -m pip install -q -e .

# The test extras: pytest, ruff, transformers (parity tests), tensorflow (OpenAI's format).
install-test: torch
	$(PYTHON) -m pip install -q -e '.[test]'

train: install
	$(PYTHON) -m minigpt.train $(ARGS)

test: install-test
	$(PYTHON) -m pytest -q $(ARGS)

test-slow: install-test
	$(PYTHON) -m pytest -q -m slow $(ARGS)

test-repro: install-test
	$(PYTHON) -m pytest -q -m repro $(ARGS)

lint: install-test
	$(PYTHON) -m ruff check minigpt tests scripts
