"""Pairing the parameters of a fused model with those of its unfused twin."""

from __future__ import annotations

from torch import nn

from ..modules import InterleavedGroupConv


def parameter_pairs(fused: nn.Module, unfused: nn.Module) -> list:
    """``(name, p_fused, p_unfused)`` for every parameter of ``fused``, matched to the
    parameter of ``unfused`` that plays its role.

    ``unfused`` must have ``fused``'s structure with every :class:`InterleavedGroupConv`
    replaced by its plain modules (what ``fused=False`` builds and what
    :func:`igc_kernels.unfuse` returns): the fused ``weights[l]`` / ``biases[l]`` pair with the
    ``l``-th convolution's ``weight`` / ``bias``; every other parameter pairs by name.
    """
    out = []
    u_mods = dict(unfused.named_modules())
    u_params = dict(unfused.named_parameters())
    seen = set()
    for name, m in fused.named_modules():
        if not isinstance(m, InterleavedGroupConv):
            continue
        seen.add(name)
        plain = u_mods.get(name)
        if plain is None:
            raise KeyError(f"the unfused model has no module {name!r}")
        convs = [c for c in plain.modules() if isinstance(c, nn.Conv2d)]
        if len(convs) != m.spec.num_layers:
            raise ValueError(f"{name}: {m.spec.num_layers} fused layers but {len(convs)} convolutions")
        for l, conv in enumerate(convs):
            out.append((f"{name}.weights.{l}", m.weights[l], conv.weight))
            if m.biases is not None and m.biases[l] is not None:
                out.append((f"{name}.biases.{l}", m.biases[l], conv.bias))
    for name, p in fused.named_parameters():
        if any(name.startswith(s + ".") for s in seen):
            continue
        if name not in u_params:
            raise KeyError(f"the unfused model has no parameter {name!r}")
        out.append((name, p, u_params[name]))
    return out
