# The only layer that knows about ../shared: offline copies of the data and tiktoken's cache.
SHARED ?= $(abspath ../shared)
PYTHON ?= python3
ifneq ($(wildcard $(SHARED)/data),)
export MINIGPT_DATA_DIR ?= $(SHARED)/data
endif
ifneq ($(wildcard $(SHARED)/tiktoken-cache),)
export TIKTOKEN_CACHE_DIR ?= $(SHARED)/tiktoken-cache
endif

.PHONY: install train test test-slow test-repro lint

# Torch first, pinned: on this CPU-only machine kind that is the CPU build already on disk,
# where a bare `torch` requirement would pull a multi-GB CUDA build.
install:
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install -q torch==2.13.0
	$(PYTHON) -m pip install -q -e '.[dev]'

train: install
	$(PYTHON) -m minigpt.train $(ARGS)

test: install
	$(PYTHON) -m pytest -q $(ARGS)

test-slow: install
	$(PYTHON) -m pytest -q -m slow $(ARGS)

test-repro: install
	$(PYTHON) -m pytest -q -m repro $(ARGS)

lint:
	$(PYTHON) -m ruff check minigpt tests scripts
