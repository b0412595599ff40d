"""pytest configuration of the igc_kernels test suite.

* Tests of the fused CPU kernel use the backend named by ``igc_test_utils.FUSED`` ("cpu"). The
  compiled extension is always built in CI, so those tests FAIL when ``igc_kernels._C`` is
  missing; nothing is skipped because of a missing build. (``IGC_TEST_FUSED_BACKEND=reference``
  points them at the reference chain to check the tests themselves without a build.)
* Hypothesis runs a modest, derandomized number of examples so the suite stays fast and
  reproducible; ``IGC_HYPOTHESIS_EXAMPLES`` raises it for a longer local run.
* Without a GPU, ``TRITON_INTERPRET=1`` is set before anything imports Triton kernels, so the
  Triton backend's tests run through Triton's interpreter on CPU tensors.
* Every test starts from the same torch seed and leaves the default dtype, thread count and
  backend scope as it found them.
* ``IGC_NVCC_CACHE`` (unless set) names a directory of this session, removed at its end, where
  tools/cuda_compile.py keeps its nvcc compiles: the nvcc tests' sm_90 compile then also serves
  the static reports that test_gpu_static.py builds in subprocesses.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import warnings

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

# Without a GPU the Triton backend's tests run its kernels on CPU tensors through Triton's
# interpreter. Triton reads TRITON_INTERPRET when a kernel is decorated (when
# igc_kernels.triton_kernels is first imported), so it is set here, before anything imports it.
# With a GPU the kernels are compiled as usual (run with TRITON_INTERPRET=1 to interpret them).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

with warnings.catch_warnings():
    # The package warns once at import when an optional part (the extension, Triton) is missing;
    # test_import.py checks that warning in a clean subprocess.
    warnings.simplefilter("ignore")
    import igc_kernels  # noqa: F401

from hypothesis import HealthCheck, settings  # noqa: E402

settings.register_profile(
    "igc",
    max_examples=int(os.environ.get("IGC_HYPOTHESIS_EXAMPLES", "40")),
    deadline=None,
    derandomize=True,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile("igc")


# (subprocesses inherit it)
_NVCC_CACHE = None
if "IGC_NVCC_CACHE" not in os.environ:
    _NVCC_CACHE = os.environ["IGC_NVCC_CACHE"] = tempfile.mkdtemp(prefix="igc-nvcc-")


def pytest_sessionfinish(session, exitstatus):
    if _NVCC_CACHE is not None:
        shutil.rmtree(_NVCC_CACHE, ignore_errors=True)


@pytest.fixture(autouse=True)
def _isolate_global_state():
    torch.manual_seed(0)
    dtype = torch.get_default_dtype()
    threads = torch.get_num_threads()
    from igc_kernels import backends

    scope = backends.scope_stack()
    yield
    torch.set_default_dtype(dtype)
    torch.set_num_threads(threads)
    assert backends.scope_stack() == scope, "a test leaked a use_backend() scope"
    assert backends._TRACED.name == (scope[-1] if scope else "auto")


@pytest.fixture
def igc_ops():
    """``torch.ops.igc`` with the compiled extension loaded; fails (never skips) without it."""
    from igc_test_utils import require_extension

    require_extension()
    return torch.ops.igc


@pytest.fixture
def no_tf32():
    """TF32 off for matmuls and cuDNN during a test (fp32 comparisons on GPUs), then restored;
    the GPU test files use it for every test."""
    prev = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = prev
