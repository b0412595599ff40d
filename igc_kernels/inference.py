"""``optimize_for_inference``: an eval-only copy of a model with its BatchNorms folded away.

Every eval-mode BatchNorm (``nn.BatchNorm1d/2d/3d`` with running statistics) whose input comes
from a convolution (``nn.Conv1d/2d/3d``, any groups, stride, padding or dilation) or from a
fused chain (:class:`~igc_kernels.InterleavedGroupConv`), possibly through channel shuffles
(``nn.ChannelShuffle``, :class:`~igc_kernels.ChannelGather` with a permutation,
``F.channel_shuffle``), and is that producer's only consumer, is folded into the producer:

* a convolution's output channel ``o`` is scaled by ``s[o] = gamma[o] / sqrt(var[o] + eps)``
  and gets the bias ``s[o] (b[o] - mean[o]) + beta[o]``;
* a chain's last layer is scaled the same way, row by row through its last permutation
  (``y[:, j] = u[:, perm[j]]``, so row ``perm[j]`` takes channel ``j``'s scale), and that
  layer gets a bias;
* a shuffle between the two moves the BatchNorm's parameters to the producer's channel order
  (``nn.Identity`` modules between them, which ``convert`` leaves behind, are skipped).

The model is traced with ``torch.fx`` (torch's modules and the fused chain stay leaves); a
module that cannot be traced is left as it is and its children are tried one by one. What
changed becomes a ``torch.fx.GraphModule`` of the same class name. The original model is never
modified. The fold is exact in real arithmetic; in floating point the outputs equal the
original eval model's within rounding (the tests compare them in float64 and float32).
"""

from __future__ import annotations

import copy
from typing import Optional

import torch
from torch import nn

from ._chain import interleave_index
from .convert import _SHUFFLE_FNS, _has_hooks, _module_op
from .modules import ChannelGather, InterleavedGroupConv

__all__ = ["optimize_for_inference"]

_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


class _Tracer(torch.fx.Tracer):
    """torch's own modules and the fused chain are leaves (their parameters stay theirs)."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, (InterleavedGroupConv, ChannelGather)) or super().is_leaf_module(
            m, qualname)


def optimize_for_inference(model: nn.Module) -> nn.Module:
    """An eval-only copy of ``model`` whose eval-mode BatchNorms are folded into the
    convolution or fused chain in front of them (see the module docstring for the rules).

    ``model`` must be in eval mode (``model.eval()``): the fold uses the running statistics,
    which is what an eval-mode BatchNorm computes with. The returned model is in eval mode,
    computes the same function within floating-point rounding, and has no parameters shared
    with ``model``; ``model`` itself is untouched. Training the result is not supported (its
    BatchNorms are gone)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"optimize_for_inference expects an nn.Module, got {type(model).__name__}")
    training = [n or type(model).__name__ for n, m in model.named_modules() if m.training]
    if training:
        raise ValueError(
            "optimize_for_inference folds BatchNorm running statistics and needs an eval-mode "
            f"model; call model.eval() first (in training mode: {', '.join(training[:3])}"
            + (", ..." if len(training) > 3 else "") + ")")
    out = copy.deepcopy(model)
    out = _fold_module(out)
    return out.eval()


def _fold_module(module: nn.Module) -> nn.Module:
    """``module`` with its foldable BatchNorms folded (traced whole when it can be, else its
    children one by one)."""
    if isinstance(module, (InterleavedGroupConv, ChannelGather)) or not list(module.children()):
        return module
    try:
        graph = _Tracer().trace(module)
    except Exception:  # not traceable (data-dependent control flow, ...): try the children
        graph = None
    if graph is None:
        for name, child in list(module.named_children()):
            setattr(module, name, _fold_module(child))
        return module
    if not _fold_graph(module, graph):
        return module
    return torch.fx.GraphModule(module, graph, class_name=type(module).__name__)


def _shuffle_index(root: nn.Module, node):
    """For a channel-permutation node (a shuffle or a permuting gather, the ops ``convert``
    recognises), a function of the channel count C giving its gather index
    (``y[:, j] = x[:, idx[j]]``, None when C does not fit); else None."""
    if node.op == "call_module":
        op = _module_op(root.get_submodule(node.target))
        if op is None or op[0] == "conv":
            return None
        if op[0] == "shuffle":
            return lambda c, g=op[1]: interleave_index(c, g)
        idx = op[1]
        if not torch.equal(torch.sort(idx).values, torch.arange(idx.numel())):
            return None  # a gather that is not a permutation
        return lambda c: idx if c == idx.numel() else None
    if node.op == "call_function" and node.target in _SHUFFLE_FNS:
        g = node.args[1] if len(node.args) > 1 else node.kwargs.get("groups")
        if isinstance(g, int):
            return lambda c: interleave_index(c, g)
    return None


def _bn_affine(bn) -> Optional[tuple]:
    """(scale, shift) of an eval-mode BatchNorm, float64, or None when it has no running
    statistics (it normalises with the batch's own even in eval mode)."""
    if bn.running_mean is None or bn.running_var is None or _has_hooks(bn):
        return None
    var = bn.running_var.detach().double().cpu()
    mean = bn.running_mean.detach().double().cpu()
    scale = torch.rsqrt(var + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight.detach().double().cpu()
    shift = -mean * scale
    if bn.bias is not None:
        shift = shift + bn.bias.detach().double().cpu()
    return scale, shift


def _fold_graph(root: nn.Module, graph) -> bool:
    changed = False
    for node in list(graph.nodes):
        if node.op != "call_module" or not isinstance(root.get_submodule(node.target), _BN):
            continue
        bn = root.get_submodule(node.target)
        affine = _bn_affine(bn)
        if affine is None or len(node.args) != 1 or node.kwargs:
            continue
        # walk back through single-use shuffles to the producer
        src, shuffles = node.args[0], []
        while isinstance(src, torch.fx.Node) and len(src.users) == 1:
            if src.op == "call_module" and type(root.get_submodule(src.target)) is nn.Identity:
                src = src.args[0]  # e.g. what convert leaves in place of fused modules
                continue
            idx = _shuffle_index(root, src)
            if idx is None:
                break
            shuffles.append(idx)
            src = src.args[0]
        if not (isinstance(src, torch.fx.Node) and src.op == "call_module"
                and len(src.users) == 1):
            continue
        producer = root.get_submodule(src.target)
        if _has_hooks(producer) or not isinstance(producer, _CONV + (InterleavedGroupConv,)):
            continue
        C = int(affine[0].numel())
        scale, shift = affine
        # BN(P_k ... P_1 v): channel j of the BN's input is channel perm[j] of v, so v's channel
        # perm[j] takes scale[j]: move the parameters back through each shuffle
        ok = True
        for make in reversed(shuffles):
            perm = make(C)
            if perm is None:
                ok = False
                break
            inv = torch.empty_like(perm)
            inv[perm] = torch.arange(C)
            scale, shift = scale[inv], shift[inv]
        if not ok:
            continue
        folded = (_fold_conv(producer, scale, shift) if isinstance(producer, _CONV)
                  else _fold_chain(producer, scale, shift))
        if folded is None:
            continue
        root.set_submodule(src.target, folded)
        node.replace_all_uses_with(node.args[0])
        graph.erase_node(node)
        changed = True
    if changed:
        graph.lint()
    return changed


def _fold_conv(conv, scale, shift) -> Optional[nn.Module]:
    if conv.out_channels != scale.numel():
        return None
    w = conv.weight.detach()
    new = copy.deepcopy(conv)
    shape = (-1,) + (1,) * (w.dim() - 1)
    scale, shift = scale.to(w.device), shift.to(w.device)
    b = conv.bias.detach().double() if conv.bias is not None else torch.zeros_like(scale)
    new.weight = nn.Parameter((w.double() * scale.view(shape)).to(w.dtype))
    new.bias = nn.Parameter((b * scale + shift).to(w.dtype))
    return new


def _fold_chain(chain: InterleavedGroupConv, scale, shift) -> Optional[nn.Module]:
    """The chain with ``y -> scale * y + shift`` folded into its last layer."""
    spec = chain.spec
    L = spec.num_layers
    C = spec.channels[-1]
    if C != scale.numel():
        return None
    last = chain.permutations()[-1]
    if last is None:
        perm = torch.arange(C)
    elif isinstance(last, str):  # "interleave": the shuffle with the last layer's groups
        perm = interleave_index(C, spec.groups[-1])
    else:
        perm = last.detach().cpu().long()
    # y[:, j] = u[:, perm[j]]: row perm[j] of the last layer takes channel j's scale and shift
    row_scale = torch.empty_like(scale)
    row_shift = torch.empty_like(shift)
    row_scale[perm] = scale
    row_shift[perm] = shift
    new = copy.deepcopy(chain)
    w = new.weights[L - 1]
    dev = w.device
    b_old = (chain.biases[L - 1].detach().double()
             if chain.biases is not None and chain.biases[L - 1] is not None
             else torch.zeros(C, dtype=torch.float64))
    rs, rt = row_scale.to(dev), row_shift.to(dev)
    with torch.no_grad():
        w.copy_((w.double() * rs.view((-1,) + (1,) * (w.dim() - 1))).to(w.dtype))
    bias = nn.Parameter((b_old.to(dev) * rs + rt).to(w.dtype))
    biases = [None] * L if new.biases is None else list(new.biases)
    biases[L - 1] = bias
    new.biases = nn.ParameterList(biases)
    return new
