"""What a backend declares, and the reasons it gives when it cannot run an input.

A backend is one file in this package defining a subclass of :class:`Backend` and an instance
named ``BACKEND``; ``backends/__init__.py`` lists the files (one line each). The dispatcher
asks every backend, in ``priority`` order, for :meth:`Backend.reasons`; the first with none
runs the input.
"""

from __future__ import annotations

import torch

from .._chain import Chain

ALL_FLOAT = (torch.float32, torch.float16, torch.bfloat16, torch.float64)

@torch.compiler.assume_constant_result
def _availability(name: str) -> tuple:
    """The reasons backend ``name`` cannot run anything in this process. Its checks (imports,
    the extension's attributes, the CUDA driver) are not traceable by Dynamo; marked as a
    constant of the process, it runs eagerly even when the first call comes while
    torch.compile traces the caller."""
    from . import BACKENDS  # the registry (backends/__init__.py imports this module first)

    be = BACKENDS[name]
    if be._cached is None:
        be._cached = list(be.availability_reasons())
    return tuple(be._cached)


class Backend:
    """One implementation of the operator.

    Declared by a subclass: ``name``; ``summary`` (one line); ``priority`` (``backend="auto"``
    tries lower numbers first); ``dtypes``; ``deterministic`` (in words); ``device_note``
    (shown with a device refusal). Implemented by a subclass: :meth:`devices`,
    :meth:`availability_reasons`, :meth:`limit_reasons` (the backend's own limits: the chain it
    receives is already validated) and :meth:`run`.
    """

    name: str = ""
    summary: str = ""
    priority: int = 100
    dtypes: tuple = ALL_FLOAT
    deterministic: str = ""
    device_note: str = ""
    # Whether run() takes chains with spatial layers, activations or a residual add.
    runs_blocks: bool = False

    def __init__(self):
        self._cached = None

    # --- declared by the backend ------------------------------------------------------------
    @property
    def devices(self) -> tuple:
        """Device types this backend runs on (in this process)."""
        return ("cpu",)

    def availability_reasons(self) -> list:
        """Reasons this backend cannot run anything in this process (empty: usable)."""
        return []

    def limit_reasons(self, x: torch.Tensor, chain: Chain) -> list:
        """Reasons this backend cannot run this (valid) chain on ``x``, beyond device and dtype."""
        return []

    def run(self, x: torch.Tensor, chain: Chain) -> torch.Tensor:
        raise NotImplementedError

    # --- derived ----------------------------------------------------------------------------
    def unavailable_reasons(self) -> list:
        """:meth:`availability_reasons`, computed once (what was built and what the process can
        use do not change)."""
        return list(_availability(self.name))

    def reasons(self, x: torch.Tensor, chain: Chain) -> list:
        """Every reason this backend cannot run ``x`` through ``chain`` (empty: it can)."""
        out = self.unavailable_reasons()
        if x.device.type not in self.devices:
            out.append(f"x is on {x.device.type}; this backend runs on {', '.join(self.devices)}"
                       + (f" ({self.device_note})" if self.device_note else ""))
        if x.dtype not in self.dtypes:
            names = ", ".join(str(d).replace("torch.", "") for d in self.dtypes)
            out.append(f"dtype {x.dtype} is not supported (supported: {names})")
        if not chain.is_plain and not self.runs_blocks:
            what = [w for w, has in (("spatial layers", chain.spatial_layers()),
                                     ("activations", any(chain.activations)),
                                     ("a residual add", chain.residual)) if has]
            out.append(f"this backend runs chains of grouped 1x1 layers only, not "
                       f"{' or '.join(what)} (the cpu and reference backends run them)")
        elif not self.unavailable_reasons():
            out.extend(self.limit_reasons(x, chain))
        return out

    def __repr__(self) -> str:
        return f"Backend({self.name!r})"


def run_op_family(family, x: torch.Tensor, chain: Chain) -> torch.Tensor:
    """Run a validated chain through a differentiable op family (``_autograd.Family``)."""
    from .._ops import op_biases

    return family.forward(x, chain.weights, op_biases(chain.biases, x), list(chain.groups),
                          list(chain.shuffles), chain.perms, chain.input_index)
