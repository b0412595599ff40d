# Two commands a user needs: `make test` and `make bench`. Both install what they need and are
# idempotent: torch is installed only when missing (pinned to a CPU build so a CPU-only machine
# does not download CUDA packages), and the extension is rebuilt only when its sources change.
# Offline machines that already have torch (and triton, pytest, hypothesis) install nothing.
PY ?= python3
TORCH_PIN ?= torch==2.13.0
STAMP := build/.igc-ext-stamp
EXT_SOURCES := $(shell find csrc -type f 2>/dev/null) setup.py pyproject.toml

.PHONY: install deps test bench bench-pytest gpu-static info clean

deps:
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install "$(TORCH_PIN)"
	@$(PY) -c "import setuptools.command.bdist_wheel" 2>/dev/null || $(PY) -c "import wheel" 2>/dev/null || \
		$(PY) -m pip install wheel
	@$(PY) -c "import pytest, hypothesis" 2>/dev/null || $(PY) -m pip install pytest hypothesis
	@$(PY) -c "import triton" 2>/dev/null || $(PY) -m pip install triton || \
		echo "triton could not be installed: the 'triton' backend will be unavailable"

$(STAMP): $(EXT_SOURCES)
	MAX_JOBS=$${MAX_JOBS:-2} $(PY) -m pip install --no-build-isolation --no-deps -e .
	@mkdir -p build && touch $@

install: deps
	@$(PY) -c "import igc_kernels._C" 2>/dev/null || rm -f $(STAMP)
	@$(MAKE) --no-print-directory $(STAMP)

# Two steps: the fast suite (what a developer runs: pytest -m "not slow"), then the slow groups
# (nvcc compile + CUDA emulation, multi-process DDP, the end-to-end benchmark smoke run).
test: install
	$(PY) -m pytest tests -q -m "not slow"
	$(PY) -m pytest tests -q -m slow

bench: install
	$(PY) benchmarks/bench.py

bench-pytest: install
	@$(PY) -c "import pytest_benchmark" 2>/dev/null || $(PY) -m pip install pytest-benchmark
	$(PY) -m pytest benchmarks/test_bench_cpu.py --benchmark-only -q

# Static GPU report of the Triton kernels (compiled for sm_90 and sm_80 without a GPU): registers,
# spills, shared memory, occupancy and SASS classes per kernel and configuration.
gpu-static: install
	env -u TRITON_INTERPRET $(PY) tools/gpu_static.py --all-configs \
		--json benchmarks/out/gpu-static.json

info: install
	$(PY) -m igc_kernels.info

clean:
	rm -rf build igc_kernels/_C*.so *.egg-info
