"""``optimize_for_inference``: an eval-only copy of a model with its BatchNorms folded away and
each block run as one call of the operator.

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

Then every run of single-use layers becomes one :class:`FusedBlock` (one call of
:func:`~igc_kernels.interleaved_group_conv`, one pass over memory on the CPU):

* layers: fused chains, 1x1 ``nn.Conv2d`` (any groups) and depth-wise ``k x k`` ``nn.Conv2d``
  (one input per group, any channel multiplier) with ``k`` odd <= 7, padding ``k // 2``,
  stride 1 or 2 and no dilation (grouped and dense ``k x k`` convolutions stay with oneDNN);
* after a layer: ReLU / ReLU6 (also ``Hardtanh(0, 6)`` and ``clamp(0, 6)``) / Hardswish (one per
  layer), channel shuffles and permuting gathers (composed into the layer's permutation),
  ``nn.Identity``;
* ``x + block(x)`` ends the block as its residual add (stride 1, same widths).

A block holds at most one spatial layer: between two of them the run is cut where the fewest
channels pass (for an inverted residual network: after the reduction, so the expanded tensor
never goes through memory). A lone module with nothing to fuse is left as it is.

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
from torch.utils._python_dispatch import _get_current_dispatch_mode

import operator

import torch.nn.functional as F

from . import _loader
from ._autograd import _needs_autograd
from ._chain import ACTIVATIONS, MAX_KERNEL_SIZE, interleave_index, normalize_permutation
from ._ops import op_biases
from .backends import scope_stack
from .convert import _SHUFFLE_FNS, _has_hooks, _module_op
from .functional import interleaved_group_conv
from .modules import ChannelGather, InterleavedGroupConv

__all__ = ["optimize_for_inference", "FusedBlock"]

_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


class _Tracer(torch.fx.Tracer):
    """torch's own modules and the fused chain are leaves (their parameters stay theirs)."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, (InterleavedGroupConv, ChannelGather, FusedBlock)) or \
            super().is_leaf_module(m, qualname)


_DIRECT_BACKENDS = ("auto", "cpu")


class FusedBlock(nn.Module):
    """A whole block as one call of the operator (what :func:`optimize_for_inference` puts in
    place of a run of fused layers): ``L`` layers, each pointwise or spatial, with optional
    bias, activation and permutation, and an optional residual add of the input (see
    :func:`igc_kernels.interleaved_group_conv`). Inference only: the weights are buffers.

    Args:
        weights: ``L`` tensors, ``(C_l, C_{l-1} / G_l)`` (pointwise) or
            ``(C_l, C_{l-1} / G_l, k, k)`` (spatial).
        groups, permutations, biases, strides, activations, residual, input_index: as the
            operator's arguments (permutations: ``None``, ``"interleave"`` or index tensors).
    """

    def __init__(self, weights, groups, permutations, biases, strides, activations,
                 residual=False, input_index=None, backend: str = "auto"):
        super().__init__()
        L = len(weights)
        self.groups = [int(g) for g in groups]
        self.strides = [int(s) for s in strides]
        self.activations = list(activations)
        self.residual = bool(residual)
        self.backend = backend
        self._perms = []  # None, "interleave" or the name of an index buffer
        self._shuffles = []  # the ops' shuffle groups of each "interleave" (else 0)
        for l in range(L):
            self.register_buffer(f"weight_{l}", weights[l].detach().clone())
            b = biases[l]
            self.register_buffer(f"bias_{l}", None if b is None else b.detach().clone())
            p = permutations[l]
            if isinstance(p, torch.Tensor):
                self.register_buffer(f"perm_{l}", p.detach().to(torch.int64).clone())
                p = f"perm_{l}"
            self._perms.append(p)
            self._shuffles.append(normalize_permutation(
                p, l + 1, int(weights[l].shape[0]), self.groups[l], None)[0]
                if p == "interleave" else 0)
        self.register_buffer("input_index", None if input_index is None
                             else input_index.detach().to(torch.int64).clone())
        self._direct_cache = None  # _static_args
        self._packed = None  # _packed_weights

    @property
    def num_layers(self) -> int:
        return len(self.groups)

    def _static_args(self):
        """The ``igc::block_forward`` arguments other than ``x`` for the direct call, built
        once and rebuilt when a buffer is replaced (``.to()``, assignment; an in-place change
        keeps the objects and needs nothing): building them took most of a call's Python time.
        """
        bufs = self._buffers  # plain dict lookups: nn.Module.__getattr__ costs more
        key = tuple(map(id, bufs.values()))
        cached = self._direct_cache
        if cached is not None and cached[0] == key:  # the cache holds the keyed tensors alive
            return cached[1]
        L = len(self.groups)
        ws = [bufs[f"weight_{l}"] for l in range(L)]
        bs = [bufs[f"bias_{l}"] for l in range(L)]
        biases = [] if all(b is None for b in bs) else [
            ws[0].new_empty((0,)) if b is None else b for b in bs]
        perms = [None if p is None or p == "interleave" else bufs[p] for p in self._perms]
        static = (ws, biases, list(self.groups), list(self._shuffles), perms, list(self.strides),
                  [ACTIVATIONS[a] for a in self.activations], self.residual, bufs["input_index"])
        self._direct_cache = (key, static)
        self._packed = None
        return static

    def _packed_weights(self, ws, biases):
        """The weights packed for the CPU kernel's channels-last tiles (``cpu_block_pack``),
        made at the first channels-last call and made again when a weight or bias has changed
        since: their version counters, which every in-place operation advances
        (``load_state_dict``, ``copy_``), are compared at each call. Writes that bypass them
        (through ``.data`` or raw memory) are not seen. None for inference tensors, which have
        no version counter: the kernel then takes its other tiles."""
        try:
            versions = tuple(t._version for t in ws) + tuple(t._version for t in biases)
        except RuntimeError:
            return None
        cached = self._packed
        if cached is not None and cached[0] == versions:
            return cached[1]
        packed = _loader.ext().cpu_block_pack(ws, biases, self.groups)
        self._packed = (versions, packed)
        return packed

    def __getstate__(self):
        state = super().__getstate__()
        state["_direct_cache"] = None
        state["_packed"] = None
        return state

    def _direct_args(self, x):
        """The ``igc::block_forward`` arguments when ``x`` can go straight to the CPU kernel
        (which validates every argument itself, index values included), else None: the
        checks of the functional path, and the dispatcher's boxing of the arguments, cost more
        than the kernel at batch 1. Not with autograd, tracing, autocast, tensor subclasses or
        torch function / dispatch modes, which must see the op."""
        if (type(x) is not torch.Tensor or x.device.type != "cpu" or x.dim() != 4
                or self.backend not in _DIRECT_BACKENDS
                or _needs_autograd(x, (), ())
                or torch.compiler.is_compiling() or torch.is_autocast_enabled("cpu")
                or torch._C._is_torch_function_mode_enabled()
                or _get_current_dispatch_mode() is not None
                or not _loader.ext_loaded()
                or any(n not in _DIRECT_BACKENDS for n in scope_stack())):
            return None
        static = self._static_args()
        ws = static[0]
        if x.dtype != ws[0].dtype or sum(w.dim() == 4 for w in ws) > 1:
            return None
        if x.dtype == torch.float32 and x.stride(1) == 1 and x.shape[1] > 1:
            packed = self._packed_weights(ws, static[1])
            if packed is not None:
                return (x, *static, packed)
        return (x, *static)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        args = self._direct_args(x)
        if args is not None:
            return _loader.ext().cpu_block_forward(*args)
        L = self.num_layers
        perms = [p if p is None or p == "interleave" else getattr(self, p) for p in self._perms]
        return interleaved_group_conv(
            x, [getattr(self, f"weight_{l}") for l in range(L)], self.groups, perms,
            [getattr(self, f"bias_{l}") for l in range(L)], input_index=self.input_index,
            strides=self.strides, activations=self.activations, residual=self.residual,
            backend=self.backend)

    def extra_repr(self) -> str:
        layers = []
        for l in range(self.num_layers):
            w = getattr(self, f"weight_{l}")
            k = f"{w.shape[2]}x{w.shape[3]}" if w.dim() == 4 else "1x1"
            desc = f"{k} {w.shape[1] * self.groups[l]}->{w.shape[0]} g={self.groups[l]}"
            if self.strides[l] != 1:
                desc += f" s={self.strides[l]}"
            if getattr(self, f"bias_{l}") is not None:
                desc += " +b"
            if self.activations[l]:
                desc += f" {self.activations[l]}"
            if self._perms[l] is not None:
                desc += " perm"
            layers.append(desc)
        return "; ".join(layers) + (", residual" if self.residual else "")


def optimize_for_inference(model: nn.Module) -> nn.Module:
    """An eval-only copy of ``model`` whose eval-mode BatchNorms are folded into the
    convolution or fused chain in front of them (see the module docstring for the rules).

    ``model`` must be in eval mode (``model.eval()``): the fold uses the running statistics,
    which is what an eval-mode BatchNorm computes with. The returned model is in eval mode,
    computes the same function within floating-point rounding, and has no parameters shared
    with ``model``; ``model`` itself is untouched. Training the result is not supported (its
    BatchNorms are gone; the fused blocks hold their weights as buffers, the other parameters
    have ``requires_grad=False``, and a call that needs gradients through a spatial layer
    raises)."""
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
    for p in out.parameters():  # inference only: a plain call (grad mode on) records nothing
        p.requires_grad_(False)
    return out.eval()


def _fold_module(module: nn.Module) -> nn.Module:
    """``module`` with its foldable BatchNorms folded (traced whole when it can be, else its
    children one by one)."""
    if isinstance(module, (InterleavedGroupConv, ChannelGather, FusedBlock)) or \
            not list(module.children()):
        return module
    try:
        graph = _Tracer().trace(module)
    except Exception:  # not traceable (data-dependent control flow, ...): try the children
        graph = None
    if graph is None:
        for name, child in list(module.named_children()):
            setattr(module, name, _fold_module(child))
        return module
    folded = _fold_graph(module, graph)
    fused = _fuse_blocks(module, graph)
    if not (folded or fused):
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


# --- fusing runs of layers into blocks --------------------------------------------------------
# A spatial convolution joins a block when each of its groups has at most this many inputs:
# depth-wise ones (any channel multiplier), which the block kernel computes 16 channels per
# vector. Grouped and dense k x k convolutions stay with oneDNN, faster at them (IGCV3Net's
# 3 -> 32 stem, its ReLU6 and the first 1x1 layer at 224x224, batch 1, 2 threads: 1.6 ms as one
# block on the kernel's tap-by-tap path, 0.6 ms as unfused PyTorch ops).
_MAX_SPATIAL_GROUP_INPUTS = 1
_ACT_MODULES = {nn.ReLU: "relu", nn.ReLU6: "relu6", nn.Hardswish: "hardswish"}
_ACT_FNS = {F.relu: "relu", torch.relu: "relu", torch.relu_: "relu", F.relu6: "relu6",
            F.hardswish: "hardswish"}
_ADD_FNS = {operator.add, torch.add, operator.iadd}


def _activation(root: nn.Module, node) -> Optional[str]:
    """The activation a node applies to its first argument, or None."""
    if node.op == "call_module":
        m = root.get_submodule(node.target)
        if _has_hooks(m):
            return None
        if type(m) in _ACT_MODULES:
            return _ACT_MODULES[type(m)]
        if type(m) is nn.Hardtanh and m.min_val == 0.0 and m.max_val == 6.0:
            return "relu6"
        return None
    if node.op == "call_function" and node.target in _ACT_FNS:
        extra = [a for a in list(node.args[1:]) + list(node.kwargs.values())
                 if isinstance(a, torch.fx.Node)]
        return None if extra else _ACT_FNS[node.target]
    if node.op == "call_method" and node.target in ("relu", "relu_") and len(node.args) == 1:
        return "relu"
    clamp = (node.op == "call_function" and node.target is torch.clamp) or (
        node.op == "call_method" and node.target in ("clamp", "clamp_"))
    if clamp:  # clamp(x, 0, 6) is relu6
        lo = node.args[1] if len(node.args) > 1 else node.kwargs.get("min")
        hi = node.args[2] if len(node.args) > 2 else node.kwargs.get("max")
        if (type(lo) in (int, float) and type(hi) in (int, float) and lo == 0 and hi == 6
                and len(node.args) + len(node.kwargs) == 3):
            return "relu6"
    return None


def _layers_of(root: nn.Module, node) -> Optional[tuple]:
    """``(layers, input_index)`` of a convolution or fused-chain node that can join a block
    (each layer a dict: w, b, g, k, s, act, perm), or None."""
    if node.op != "call_module" or len(node.args) != 1 or node.kwargs:
        return None
    m = root.get_submodule(node.target)
    if _has_hooks(m):
        return None
    if type(m) is nn.Conv2d:
        if m.dilation != (1, 1) or m.padding_mode != "zeros" or isinstance(m.padding, str):
            return None
        kh, kw = m.kernel_size
        w, b = m.weight.detach(), None if m.bias is None else m.bias.detach()
        if (kh, kw) == (1, 1):
            if m.stride != (1, 1) or m.padding != (0, 0):
                return None
            return [dict(w=w.flatten(1), b=b, g=m.groups, k=1, s=1, act=None, perm=None)], None
        s = m.stride[0]
        if (kh != kw or kh % 2 == 0 or kh > MAX_KERNEL_SIZE or m.padding != (kh // 2, kh // 2)
                or m.stride != (s, s) or s not in (1, 2)
                or m.in_channels // m.groups > _MAX_SPATIAL_GROUP_INPUTS):
            return None
        return [dict(w=w, b=b, g=m.groups, k=kh, s=s, act=None, perm=None)], None
    if isinstance(m, InterleavedGroupConv):
        spec = m.spec
        layers = []
        for l, p in enumerate(m.permutations()):
            C = spec.channels[l + 1]
            if isinstance(p, str):
                p = interleave_index(C, spec.groups[l])
            elif isinstance(p, torch.Tensor):
                p = p.detach().cpu().long()
            b = None if m.biases is None or m.biases[l] is None else m.biases[l].detach()
            layers.append(dict(w=m.weights[l].detach().flatten(1), b=b, g=spec.groups[l], k=1,
                               s=1, act=None, perm=p))
        return layers, m.input_index
    return None


def _compose(perm, shuffle) -> torch.Tensor:
    """The gather index of ``shuffle`` applied after ``perm`` (None: identity)."""
    return shuffle if perm is None else perm[shuffle]


def _walk(root, start, first):
    """The run of single-use nodes from the layer node ``start`` (``first``: its
    :func:`_layers_of`): ``(groups, input_index, residual)``: ``groups`` a list of
    ``(node_list, layers)``, one per layer node with the activations and shuffles that follow
    it; ``input_index`` that of ``start``; ``residual`` the add node of ``start``'s input, or
    None."""
    src = start.args[0]
    groups = [([start], first[0])]
    input_index = first[1]
    cur, residual = start, None
    while len(cur.users) == 1:
        u = next(iter(cur.users))
        last = groups[-1][1][-1]
        if not u.args or u.args[0] is not cur:
            if (u.op == "call_function" and u.target in _ADD_FNS and len(u.args) == 2
                    and not u.kwargs and u.args[1] is cur and u.args[0] is src):
                residual = u  # src + block
            break
        if u.op == "call_module" and type(root.get_submodule(u.target)) is nn.Identity:
            groups[-1][0].append(u)
        elif (got := _layers_of(root, u)) is not None:
            if got[1] is not None:  # an input index mid-block is not a permutation
                break
            groups.append(([u], got[0]))
        elif (act := _activation(root, u)) is not None:
            if last["act"] is not None:
                break
            last["act"] = act
            groups[-1][0].append(u)
        elif (make := _shuffle_index(root, u)) is not None:
            idx = make(int(last["w"].shape[0]))
            if idx is None:
                break
            last["perm"] = _compose(last["perm"], idx.cpu().long())
            groups[-1][0].append(u)
        elif (u.op == "call_function" and u.target in _ADD_FNS and len(u.args) == 2
              and not u.kwargs and u.args[1] is src):
            residual = u  # block + src
            break
        else:
            break
        cur = u
    return groups, input_index, residual


def _cuts(groups) -> list:
    """Start indices (into ``groups``) of the blocks: at most one spatial layer per block; between
    two spatial layers the cut goes where the fewest channels pass (the latest such place)."""
    spatial = [i for i, (_, layers) in enumerate(groups) if any(L["k"] > 1 for L in layers)]
    starts = [0]
    for a, b in zip(spatial, spatial[1:]):
        best = min(range(a + 1, b + 1), key=lambda j: (groups[j - 1][1][-1]["w"].shape[0], -j))
        starts.append(best)
    return starts


def _fuse_blocks(root: nn.Module, graph) -> bool:
    """Replace every run of layers, activations, shuffles and a residual add that forms a block
    (at most one spatial layer) by one :class:`FusedBlock`."""
    changed = False
    done = set()
    for node in list(graph.nodes):
        if node in done or node.op != "call_module":
            continue
        first = _layers_of(root, node)
        if first is None or not isinstance(node.args[0], torch.fx.Node):
            continue
        groups, input_index, residual = _walk(root, node, first)
        for nodes, _ in groups:
            done.update(nodes)
        starts = _cuts(groups) + [len(groups)]
        blocks = [groups[a:b] for a, b in zip(starts, starts[1:])]
        for i, block in enumerate(blocks):
            nodes = [n for ns, _ in block for n in ns]
            layers = [L for _, ls in block for L in ls]
            res = None
            if residual is not None and len(blocks) == 1:
                c_in = layers[0]["w"].shape[1] * layers[0]["g"] if input_index is None \
                    else None
                if (c_in is not None and c_in == layers[-1]["w"].shape[0]
                        and all(L["s"] == 1 for L in layers)):
                    res = residual
            if res is None and len(nodes) == 1:
                continue  # a lone module: nothing to fuse
            if res is not None:
                nodes.append(res)
            changed = True
            _replace(root, graph, nodes, layers, input_index if i == 0 else None, res is not None)
    if changed:
        graph.lint()
    return changed


def _replace(root, graph, nodes, layers, input_index, residual) -> None:
    block = FusedBlock([L["w"] for L in layers], [L["g"] for L in layers],
                       [L["perm"] for L in layers], [L["b"] for L in layers],
                       [L["s"] for L in layers], [L["act"] for L in layers], residual,
                       input_index)
    k = 0
    while hasattr(root, f"igc_block_{k}"):
        k += 1
    name = f"igc_block_{k}"
    root.add_module(name, block)
    with graph.inserting_after(nodes[-1]):
        new = graph.call_module(name, (nodes[0].args[0],))
    nodes[-1].replace_all_uses_with(new)
    for n in reversed(nodes):
        graph.erase_node(n)
