"""``python -m igc_kernels.info``: versions, what was built, and which backends are usable."""

from __future__ import annotations

import platform
import sys


def report() -> str:
    import torch

    import igc_kernels as igc
    from igc_kernels import _loader
    from igc_kernels.backends import AUTO_ORDER, BACKENDS

    lines = ["igc_kernels " + igc.__version__]
    lines.append(f"python {platform.python_version()}  torch {torch.__version__}  "
                 f"(CUDA {torch.version.cuda or 'none'})")
    try:
        import triton

        lines.append(f"triton {triton.__version__}")
        lines.append("triton kernels: "
                     + __import__("igc_kernels.triton_kernels", fromlist=["facts"]).facts())
    except ImportError:
        lines.append("triton: not installed")
    lines.append(f"threads: {torch.get_num_threads()}  cuda devices: "
                 f"{torch.cuda.device_count() if torch.cuda.is_available() else 0}")
    if _loader.ext_loaded():
        info = _loader.ext_build_info()
        lines.append("extension igc_kernels._C: built; " + ", ".join(
            f"{k.lower()}={v}" for k, v in sorted(info.items())))
    else:
        lines.append("extension igc_kernels._C: " + _loader.ext_missing_reason())
    lines.append("backends (auto tries them in this order: " + ", ".join(AUTO_ORDER) + "):")
    for name in AUTO_ORDER:
        be = BACKENDS[name]
        reasons = be.unavailable_reasons()
        state = "usable" if not reasons else "unavailable: " + "; ".join(reasons)
        dtypes = ", ".join(str(d).replace("torch.", "") for d in be.dtypes)
        lines.append(f"  {name:<10} {state}")
        devices = ", ".join(be.devices) + (f" ({be.device_note})" if be.device_note else "")
        lines.append(f"  {'':<10} {be.summary}; devices: {devices}; dtypes: {dtypes}; "
                     f"{be.deterministic}")
    return "\n".join(lines)


def main() -> int:
    print(report())
    return 0


if __name__ == "__main__":
    sys.exit(main())
