# Two commands a user needs: `make test` and `make bench`. Both install what they need and are
# idempotent: torch is installed only when missing (pinned to a CPU build so a CPU-only machine
# does not download CUDA packages), and the extension is rebuilt only when its sources change.
# Offline machines that already have torch (and triton, pytest, hypothesis) install nothing.
PY ?= python3
TORCH_PIN ?= torch==2.13.0
# The GPU machine's Triton, installed beside the main one for compile-only checks (sm_90 cubins
# built without a GPU: tests/test_gpu_static.py, make gpu-static).
TRITON_ALT_PIN ?= triton==3.6.0
# Test dependencies of the ONNX export (tests/test_onnx.py)
ONNX_PINS ?= onnx==1.23.2 onnxscript==0.7.2 onnxruntime==1.32.0
# Benchmark plots and progress bars (benchmarks/plot.py)
PLOT_PINS ?= matplotlib==3.11.2 tqdm==4.70.1
TRITON_ALT := build/triton-3.6.0
STAMP := build/.igc-ext-stamp
EXT_SOURCES := $(shell find csrc -type f 2>/dev/null) setup.py pyproject.toml

.PHONY: install deps test bench bench-pytest gpu-static info clean

deps:
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install "$(TORCH_PIN)"
	@$(PY) -c "import setuptools.command.bdist_wheel" 2>/dev/null || $(PY) -c "import wheel" 2>/dev/null || \
		$(PY) -m pip install wheel
	@$(PY) -c "import pytest, hypothesis" 2>/dev/null || $(PY) -m pip install pytest hypothesis
	@$(PY) -c "import xdist" 2>/dev/null || $(PY) -m pip install -q pytest-xdist || \
		echo "pytest-xdist could not be installed: make test will run the tests in one process"
	@$(PY) -c "import triton" 2>/dev/null || $(PY) -m pip install triton || \
		echo "triton could not be installed: the 'triton' backend will be unavailable"
	@$(PY) -c "import matplotlib, tqdm" 2>/dev/null || $(PY) -m pip install -q $(PLOT_PINS) || \
		echo "$(PLOT_PINS) could not be installed: benchmarks will write no plots or progress bars"
	@$(PY) -c "import onnx, onnxscript, onnxruntime" 2>/dev/null || $(PY) -m pip install -q \
		$(ONNX_PINS) || echo "$(ONNX_PINS) could not be installed: the ONNX export tests will be skipped"
	@test -d $(TRITON_ALT)/triton || $(PY) -m pip install -q --no-deps --target $(TRITON_ALT) \
		"$(TRITON_ALT_PIN)" || echo "$(TRITON_ALT_PIN) could not be installed into \
		$(TRITON_ALT): the compile checks with the GPU machine's Triton will be skipped"

$(STAMP): $(EXT_SOURCES)
	MAX_JOBS=$${MAX_JOBS:-2} $(PY) -m pip install --no-build-isolation --no-deps -e .
	@mkdir -p build && touch $@

install: deps
	@$(PY) -c "import igc_kernels._C" 2>/dev/null || rm -f $(STAMP)
	@$(MAKE) --no-print-directory $(STAMP)

# Two steps: the fast suite (what a developer runs: pytest -m "not slow"), then the slow groups
# (nvcc compile + CUDA emulation, multi-process DDP, the end-to-end benchmark smoke run). With
# pytest-xdist, the slow step runs in TEST_JOBS processes (tests sharing a module fixture on
# one, marked xdist_group): its compilers run one process each, so two workers use both cores
# of a 2-core machine. The fast step stays in one process: torch's threads already use the
# cores there (on 2 cores, two workers took 7.5 minutes against 5 for one).
TEST_JOBS ?= 2
XDIST = $$($(PY) -c "import xdist" 2>/dev/null && echo "-n $(TEST_JOBS) --dist loadgroup")
test: install
	$(PY) -m pytest tests -q -m "not slow"
	$(PY) -m pytest tests -q -m slow $(XDIST)

bench: install
	$(PY) benchmarks/bench.py

bench-pytest: install
	@$(PY) -c "import pytest_benchmark" 2>/dev/null || $(PY) -m pip install pytest-benchmark
	$(PY) -m pytest benchmarks/test_bench_cpu.py --benchmark-only -q

# Static GPU report (compiled for sm_90 / sm_80 without a GPU): registers, spills, shared memory,
# occupancy and SASS classes per kernel and configuration, for the Triton kernels with the CI's
# Triton and with the GPU machine's, and the CUDA kernels; then the performance model's
# predictions (H200) from it. Takes long (every configuration): GPU_STATIC_ARGS narrows it.
GPU_STATIC_ARGS ?= --all-configs --archs 90,80
gpu-static: install
	env -u TRITON_INTERPRET $(PY) tools/gpu_static.py --cuda $(GPU_STATIC_ARGS) \
		--json benchmarks/out/gpu-static.json
	test ! -d $(TRITON_ALT)/triton || env -u TRITON_INTERPRET PYTHONPATH=$(TRITON_ALT) \
		$(PY) tools/gpu_static.py $(GPU_STATIC_ARGS) --json benchmarks/out/gpu-static-triton-3.6.0.json
	$(PY) tools/perf_model.py benchmarks/out/gpu-static.json \
		--json benchmarks/out/predicted-h200.json --markdown benchmarks/out/predicted-h200.md

info: install
	$(PY) -m igc_kernels.info

clean:
	rm -rf build igc_kernels/_C*.so *.egg-info
