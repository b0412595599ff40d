"""Import behaviour: with the extension (as in CI) and, in a subprocess, without it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import torch

import igc_kernels as igc
from igc_kernels import _loader
from igc_test_utils import require_extension

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_extension_is_built():
    """CI always builds igc_kernels._C: its absence is a failure, not a skip."""
    require_extension()
    assert hasattr(torch.ops.igc, "chain_forward") and hasattr(torch.ops.igc, "chain_backward")
    assert "cpu" in igc.available_backends()
    assert isinstance(_loader.ext_build_info().get("BUILT_WITH_CUDA"), int)


def test_import_in_a_fresh_interpreter_loads_the_extension():
    """``import igc_kernels`` as the first import (torch not yet loaded) finds the extension."""
    code = "import igc_kernels, json; print(json.dumps(igc_kernels.available_backends()))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert "cpu" in json.loads(out.stdout.strip().splitlines()[-1]), out.stderr


_BLOCKED = textwrap.dedent("""
    import importlib.abc, json, sys, warnings

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "igc_kernels._C":
                raise ImportError("blocked by the test")
            return None

    sys.meta_path.insert(0, Block())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        import igc_kernels as igc
    import torch

    out = {"warnings": [str(w.message) for w in caught
                        if "igc_kernels" in str(w.message)],
           "available": igc.available_backends()}
    x = torch.randn(2, 8, 3)
    ws = [torch.randn(8, 4), torch.randn(8, 2)]
    out["auto_shape"] = list(igc.interleaved_group_conv(x, ws, [2, 4]).shape)
    out["reference_equal"] = bool(torch.equal(
        igc.interleaved_group_conv(x, ws, [2, 4], backend="reference"),
        igc.reference.interleaved_group_conv(x, ws, [2, 4])))
    try:
        igc.interleaved_group_conv(x, ws, [2, 4], backend="cpu")
        out["cpu_error"] = None
    except igc.BackendUnavailableError as e:
        out["cpu_error"] = str(e)
    m = igc.InterleavedGroupConv(igc.ChainSpec.igcv2(16, 4))
    out["module_shape"] = list(m(torch.randn(1, 16, 2, 2)).shape)
    print(json.dumps(out))
""")


def test_import_without_extension_warns_and_reference_works():
    # without the interpreter flag the suite sets for the Triton tests (on a CPU-only machine
    # Triton then cannot run either, and "reference" is all that is left)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", _BLOCKED], cwd=ROOT, capture_output=True,
                         text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr
    res = json.loads(out.stdout.strip().splitlines()[-1])
    # one warning, naming what is missing and what still works
    assert len(res["warnings"]) == 1, res["warnings"]
    msg = res["warnings"][0]
    assert "igc_kernels._C" in msg and "'cpu'" in msg and "'reference' backend works" in msg
    assert res["available"] == (["triton", "reference"] if torch.cuda.is_available()
                                else ["reference"])
    assert res["auto_shape"] == [2, 8, 3]  # "auto" falls back to the reference chain
    assert res["reference_equal"]
    assert res["cpu_error"] is not None
    assert "backend 'cpu' cannot run this input" in res["cpu_error"]
    assert "igc_kernels._C is not available" in res["cpu_error"]
    assert "pip install --no-build-isolation -e ." in res["cpu_error"]
    assert res["module_shape"] == [1, 16, 2, 2]


def test_info_command():
    out = subprocess.run([sys.executable, "-m", "igc_kernels.info"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert "igc_kernels._C: built" in text, text
    lines = {ln.split()[0]: ln for ln in text.splitlines() if ln.startswith("  ") and ln.split()}
    assert "usable" in lines.get("cpu", ""), text
    assert "usable" in lines.get("reference", ""), text
    assert "unavailable" in lines.get("cuda", "unavailable") or torch.cuda.is_available()


_IN_PLACE = textwrap.dedent("""
    import os, sys
    # no installed copy of the package: only the source tree, as with PYTHONPATH=<repo>
    sys.meta_path[:] = [f for f in sys.meta_path
                        if "editable" not in str(getattr(f, "__module__", ""))]
    sys.path.insert(0, sys.argv[1])
    os.environ["TRITON_INTERPRET"] = "1"
    import igc_kernels
    from igc_kernels.triton_kernels import chain
    from igc_kernels import backends
    root = os.path.realpath(sys.argv[1])
    assert os.path.realpath(igc_kernels.__file__).startswith(root), igc_kernels.__file__
    assert os.path.realpath(chain.__file__) == os.path.join(root, "triton_kernels", "chain.py")
    print("ok", backends.AUTO_ORDER)
""")


def test_source_tree_imports_in_place():
    """``igc_kernels.triton_kernels`` (the top-level triton_kernels/ folder) imports from the
    source tree without an install: igc_kernels/triton_kernels is a link to it."""
    out = subprocess.run([sys.executable, "-c", _IN_PLACE, ROOT], cwd="/", capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.startswith("ok"), out.stdout + out.stderr
