"""Modules: ``InterleavedGroupConv`` (owns a chain's weights, runs the fused op) and
``ChannelGather`` (an index permutation / CondenseNet index layer as a plain module).

``InterleavedGroupConv.from_modules`` builds the fused module from the plain modules of an
unfused chain (grouped 1x1 ``nn.Conv2d``, ``nn.ChannelShuffle``, ``ChannelGather``) and adopts
their parameters; ``InterleavedGroupConv.unfuse`` goes back. Both share parameters, never copy.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import nn

from ._chain import interleave_index
from .functional import interleaved_group_conv
from .spec import ChainSpec


class ChannelGather(nn.Module):
    """``out[:, j] = x[:, index[j]]``: ``x.index_select(1, index)`` as a module.

    Used for explicit channel permutations and for CondenseNet's index layer (entries may
    repeat, any length). ``index`` is an int64 buffer.
    """

    def __init__(self, index):
        super().__init__()
        if isinstance(index, (list, tuple)):
            index = torch.tensor(index, dtype=torch.int64)
        if not isinstance(index, torch.Tensor):
            raise TypeError(f"index must be a 1-D integer tensor, got {type(index).__name__}")
        if index.is_floating_point() or index.is_complex() or index.dtype == torch.bool:
            raise TypeError(f"index must be an integer tensor, got dtype {index.dtype}")
        if index.dim() != 1 or index.numel() == 0:
            raise ValueError(f"index must be a non-empty 1-D tensor, got shape {tuple(index.shape)}")
        self.register_buffer("index", index.detach().to(torch.int64).clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.index_select(1, self.index)

    def extra_repr(self) -> str:
        return f"len={self.index.numel()}"


def _shuffle_groups_of(index: torch.Tensor) -> Optional[int]:
    """``g`` if ``index`` is the gather index of ``nn.ChannelShuffle(g)`` (``1 < g < C``)."""
    C = int(index.numel())
    for g in range(2, C):
        if C % g == 0 and torch.equal(index.cpu(), interleave_index(C, g)):
            return g
    return None


def _as_index(index, what: str) -> torch.Tensor:
    if isinstance(index, (list, tuple)):
        index = torch.tensor(index, dtype=torch.int64)
    if not isinstance(index, torch.Tensor):
        raise TypeError(f"{what} must be None or a 1-D integer tensor, got {type(index).__name__}")
    if index.is_floating_point() or index.is_complex() or index.dtype == torch.bool:
        raise TypeError(f"{what} must be an integer tensor, got dtype {index.dtype}")
    if index.dim() != 1 or index.numel() == 0:
        raise ValueError(f"{what} must be a non-empty 1-D tensor, got shape {tuple(index.shape)}")
    return index.detach().to(torch.int64)


class InterleavedGroupConv(nn.Module):
    """A chain of grouped 1x1 convolutions and permutations, run as one fused operator.

    Args:
        spec: the :class:`ChainSpec` (channels, groups, permutations).
        bias: add a learnable bias after every layer (``True``), none (``False``), or a list of
            bools, one per layer.
        input_index: optional 1-D integer index of the input's channels gathered before layer 1
            (``h_0[:, j] = x[:, input_index[j]]``, CondenseNet's index layer); its length must
            be ``spec.channels[0]``; entries may repeat; ``x`` may have any number of channels
            larger than every entry.
        backend: passed to :func:`igc_kernels.interleaved_group_conv`.

    Parameters: ``weights[l]`` of conv layout ``(C_l, C_{l-1} / G_l, 1, 1)``, initialised as
    ``nn.Conv2d`` does (Kaiming-uniform with ``a = sqrt(5)``), and ``biases[l]`` of shape
    ``(C_l,)`` (``biases`` is ``None`` without bias; an entry is ``None`` for a layer without
    one). Explicit index permutations are buffers ``perm_l``; the input index is the buffer
    ``input_index`` (``None`` when absent).
    """

    def __init__(self, spec: ChainSpec, bias=False, *, input_index=None, backend: str = "auto",
                 device=None, dtype=None):
        super().__init__()
        if not isinstance(spec, ChainSpec):
            raise TypeError(f"spec must be a ChainSpec, got {type(spec).__name__}")
        L = spec.num_layers
        if isinstance(bias, bool):
            has_bias = [bias] * L
        else:
            has_bias = [bool(b) for b in bias]
            if len(has_bias) != L:
                raise ValueError(f"bias must be a bool or one bool per layer ({L}), got {len(has_bias)}")
        kw = {"device": device, "dtype": dtype}
        weights = [nn.Parameter(torch.empty(c, k, 1, 1, **kw)) for c, k in spec.weight_shapes()]
        biases = [nn.Parameter(torch.empty(c, **kw)) if b else None
                  for c, b in zip(spec.channels[1:], has_bias)]
        self._setup(spec, weights, biases, input_index, backend, device)
        self.reset_parameters()

    def _setup(self, spec, weights, biases, input_index, backend, device=None) -> None:
        self.spec = spec
        self.backend = backend
        self.conv_dims = None  # set by from_modules: 2 for Conv2d (unbatched inputs allowed)
        self.weights = nn.ParameterList(weights)
        self.biases = nn.ParameterList(biases) if any(b is not None for b in biases) else None
        if input_index is not None:
            input_index = _as_index(input_index, "input_index")
            if input_index.numel() != spec.channels[0]:
                raise ValueError(
                    f"input_index has length {input_index.numel()}, but the chain's first width "
                    f"is C_0 = spec.channels[0] = {spec.channels[0]}")
            if int(input_index.min()) < 0:
                raise ValueError(f"input_index entries must be >= 0, got min {int(input_index.min())}")
            dev = device if device is not None else weights[0].device
            input_index = input_index.to(dev).clone()
        self.register_buffer("input_index", input_index)
        self._perm_names = []
        for l, p in enumerate(spec.permutations):
            if isinstance(p, torch.Tensor):
                name = f"perm_{l}"
                dev = device if device is not None else weights[0].device
                self.register_buffer(name, p.detach().to(device=dev, dtype=torch.int64).clone())
                self._perm_names.append(name)
            else:
                self._perm_names.append(p)

    def reset_parameters(self) -> None:
        for l, w in enumerate(self.weights):
            nn.init.kaiming_uniform_(w, a=math.sqrt(5))
            if self.biases is not None and self.biases[l] is not None:
                fan_in = w.shape[1]
                bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0
                nn.init.uniform_(self.biases[l], -bound, bound)

    def permutations(self) -> list:
        out = []
        for p in self._perm_names:
            if p is None or p == "interleave":
                out.append(p)
            else:
                out.append(getattr(self, p))
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.conv_dims is not None and x.dim() == self.conv_dims + 1:
            return self.forward(x.unsqueeze(0)).squeeze(0)  # unbatched, as nn.Conv2d accepts
        biases = None if self.biases is None else list(self.biases)
        kw = {} if self.input_index is None else {"input_index": self.input_index}
        return interleaved_group_conv(x, list(self.weights), list(self.spec.groups),
                                      self.permutations(), biases, backend=self.backend, **kw)

    def dense_matrix(self) -> torch.Tensor:
        """The composed ``(C_L, C_0)`` matrix (``C_0`` = the chain's first width, after the
        input index when there is one)."""
        # the permutation buffers, not self.spec's tensors: load_state_dict may have replaced them
        spec = ChainSpec(self.spec.channels, self.spec.groups, self.permutations())
        return spec.dense_matrix(list(self.weights))

    # --- conversion from and to plain modules -------------------------------------------------
    @classmethod
    def from_modules(cls, modules: Sequence[nn.Module], *, backend: str = "auto") -> "InterleavedGroupConv":
        """The fused module equivalent to running ``modules`` one after the other.

        ``modules``: optional leading ``ChannelGather`` / ``nn.ChannelShuffle`` (they become
        the input index), then one or more grouped 1x1 ``nn.Conv2d`` (stride 1, no padding,
        dilation 1, bias or not), each followed by any number of ``nn.ChannelShuffle`` /
        ``ChannelGather`` permutations (composed into one; a shuffle whose group count is the
        conv's is the operator's ``"interleave"``, any other becomes an index permutation).

        The result adopts the convolutions' ``weight`` and ``bias`` Parameters (the same
        objects: no copy, no device or dtype change). Raises ``ValueError`` / ``TypeError``
        naming the module's position when ``modules`` is not such a chain.
        """
        ops = []
        for i, m in enumerate(modules):
            if isinstance(m, nn.Conv2d) and type(m) is nn.Conv2d:
                problem = conv_problem(m)
                if problem:
                    raise ValueError(f"modules[{i}]: {problem}")
                ops.append(("conv", m.weight, m.bias, m.groups))
            elif type(m) is nn.ChannelShuffle:
                ops.append(("shuffle", int(m.groups)))
            elif type(m) is ChannelGather:
                ops.append(("gather", m.index))
            else:
                raise TypeError(
                    f"modules[{i}]: {type(m).__name__} is not part of a fusable chain (expected "
                    f"nn.Conv2d 1x1, nn.ChannelShuffle or igc_kernels.ChannelGather)")
        return cls.from_ops(ops, backend=backend)

    @classmethod
    def from_ops(cls, ops: list, *, backend: str = "auto", where=None) -> "InterleavedGroupConv":
        """``from_modules`` on a list of ``("conv", weight, bias, groups)``, ``("shuffle", g)``
        and ``("gather", index)`` tuples (what ``igc_kernels.convert`` collects from module
        trees and torch.fx graphs). ``where(i)`` names the i-th op in error messages."""
        where = where or (lambda i: f"modules[{i}]")
        first = next((i for i, op in enumerate(ops) if op[0] == "conv"), None)
        if first is None:
            raise ValueError("the chain has no 1x1 convolution")
        W0 = ops[first][1]
        # leading shuffles and gathers -> the input index (processed from the conv backwards,
        # since a shuffle's channel count is known only from what follows it)
        input_index = None
        count = int(ops[first][1].shape[1]) * int(ops[first][3])  # conv 1's in_channels
        lead = []
        for i in range(first - 1, -1, -1):
            op = ops[i]
            if op[0] == "gather":
                if count is not None and op[1].numel() != count:
                    raise ValueError(f"{where(i)}: gathers {op[1].numel()} channels, but {count} "
                                     f"are needed by what follows")
                lead.append(op[1].to(W0.device))
                count = None
            else:  # shuffle
                if count is None:
                    raise ValueError(f"{where(i)}: a channel shuffle before an index gather at the "
                                     f"start of a chain has no known channel count")
                if count % op[1]:
                    raise ValueError(f"{where(i)}: {count} channels are not divisible by "
                                     f"shuffle groups {op[1]}")
                lead.append(interleave_index(count, op[1], W0.device))
        for idx in lead:  # applied in forward order: the last collected comes first
            input_index = idx if input_index is None else input_index[idx]
        if (input_index is not None and all(op[0] == "shuffle" for op in ops[:first])
                and torch.equal(input_index, torch.arange(count, device=input_index.device))):
            input_index = None  # shuffles that are the identity (1 group, or groups of one)

        channels = [int(W0.shape[1]) * int(ops[first][3])]
        groups, perms, weights, biases = [], [], [], []
        layer_perm = None  # composed gather index after the current layer (None: identity)
        only_shuffle = None  # the single shuffle's groups if the layer has exactly one op

        def close_layer():
            if not groups:
                return
            C, G = channels[-1], groups[-1]
            if layer_perm is None:
                perms.append(None)
            elif only_shuffle is not None and only_shuffle == G:
                perms.append("interleave")
            elif torch.equal(layer_perm, torch.arange(C, device=layer_perm.device)):
                perms.append(None)
            else:
                perms.append(layer_perm)

        n_ops_in_layer = 0
        for i in range(first, len(ops)):
            op = ops[i]
            if op[0] == "conv":
                close_layer()
                _, W, b, G = op
                c_in = int(W.shape[1]) * int(G)
                if c_in != channels[-1]:
                    raise ValueError(f"{where(i)}: in_channels {c_in} does not match the {channels[-1]} "
                                     f"channels that reach it")
                if W.dtype != W0.dtype or W.device != W0.device:
                    raise ValueError(f"{where(i)}: weight is {W.dtype} on {W.device}, the chain's first "
                                     f"is {W0.dtype} on {W0.device}")
                weights.append(W)
                biases.append(b)
                groups.append(int(G))
                channels.append(int(W.shape[0]))
                layer_perm, only_shuffle, n_ops_in_layer = None, None, 0
                continue
            C = channels[-1]
            if op[0] == "shuffle":
                g = op[1]
                if C % g:
                    raise ValueError(f"{where(i)}: {C} channels are not divisible by shuffle groups {g}")
                idx = interleave_index(C, g, W0.device)
            else:
                idx = op[1].to(W0.device)
                if idx.numel() != C or not torch.equal(
                        torch.sort(idx).values, torch.arange(C, device=idx.device)):
                    raise ValueError(f"{where(i)}: the gather after a convolution must be a "
                                     f"permutation of its {C} channels")
            n_ops_in_layer += 1
            only_shuffle = op[1] if (op[0] == "shuffle" and n_ops_in_layer == 1) else None
            layer_perm = idx if layer_perm is None else layer_perm[idx]
        close_layer()

        spec = ChainSpec(channels, groups, perms)
        obj = cls.__new__(cls)
        nn.Module.__init__(obj)
        obj._setup(spec, weights, biases, input_index, backend)
        obj.conv_dims = 2
        return obj

    def unfuse(self) -> nn.Sequential:
        """The plain modules of this chain: ``nn.Sequential`` of ``nn.Conv2d`` (1x1, grouped),
        ``nn.ChannelShuffle`` and ``ChannelGather`` (the input index first, when there is one).

        The convolutions use this module's Parameters (shared, not copied); index buffers are
        copied. A permutation or input index that is a channel shuffle becomes
        ``nn.ChannelShuffle``. The result computes the same function on 4-D inputs.
        """
        mods = []
        if self.input_index is not None:
            g = _shuffle_groups_of(self.input_index)
            mods.append(nn.ChannelShuffle(g) if g is not None else ChannelGather(self.input_index))
        perms = self.permutations()
        for l, G in enumerate(self.spec.groups):
            w = self.weights[l]
            b = None if self.biases is None else self.biases[l]
            c_in, c_out = self.spec.channels[l], self.spec.channels[l + 1]
            conv = nn.Conv2d(c_in, c_out, 1, groups=G, bias=b is not None, device="meta")
            conv.weight = w
            conv.bias = b
            mods.append(conv)
            p = perms[l]
            if p == "interleave":
                if 1 < G < c_out:
                    mods.append(nn.ChannelShuffle(G))
            elif isinstance(p, torch.Tensor):
                g = _shuffle_groups_of(p)
                mods.append(nn.ChannelShuffle(g) if g is not None else ChannelGather(p))
        return nn.Sequential(*mods)

    def extra_repr(self) -> str:
        if self.biases is None:
            bias = "False"
        elif all(b is not None for b in self.biases):
            bias = "True"
        else:
            bias = str([b is not None for b in self.biases])
        s = (f"channels={list(self.spec.channels)}, groups={list(self.spec.groups)}, "
             f"bias={bias}, backend={self.backend!r}")
        if self.input_index is not None:
            s += f", input_index=(len {self.input_index.numel()})"
        return s


def conv_problem(m: nn.Module) -> str:
    """Why ``m`` is not a fusable 1x1 convolution ("" when it is)."""
    if type(m) is not nn.Conv2d:
        return f"{type(m).__name__} is not nn.Conv2d"
    if tuple(m.kernel_size) != (1, 1):
        return f"kernel_size {tuple(m.kernel_size)} is not (1, 1)"
    if tuple(m.stride) != (1, 1):
        return f"stride {tuple(m.stride)} is not 1"
    if m.padding not in ("valid", (0, 0)) and tuple(m.padding) != (0, 0):
        return f"padding {m.padding} is not 0"
    if tuple(m.dilation) != (1, 1):
        return f"dilation {tuple(m.dilation)} is not 1"
    if m.transposed:
        return "transposed convolution"
    if m.weight.dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        return f"weight dtype {m.weight.dtype} is not supported"
    return ""
