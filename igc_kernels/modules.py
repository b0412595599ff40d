"""Modules: ``InterleavedGroupConv`` (owns a chain's weights, runs the fused op) and
``ChannelGather`` (an index permutation / CondenseNet index layer as a plain module).

``InterleavedGroupConv.from_modules`` builds the fused module from the plain modules of an
unfused chain (grouped 1x1 ``nn.Conv2d``, ``nn.ChannelShuffle``, ``ChannelGather``) and adopts
their parameters; ``InterleavedGroupConv.unfuse`` goes back. Both share parameters, never copy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ._chain import as_index_tensor, interleave_index
from .functional import interleaved_group_conv
from .spec import ChainSpec


def host_copy(index: torch.Tensor) -> Optional[torch.Tensor]:
    """A CPU int64 copy of an index's values (``None`` for a meta tensor: it has none)."""
    if index.device.type == "meta":
        return None
    return index.detach().to("cpu", torch.int64).clone()


class _IndexBuffers:
    """Index buffers (permutations, input indices) that survive deferred initialisation.

    A module built on the meta device (``with torch.device("meta"):``) and then given memory
    with ``to_empty`` has uninitialised buffers; for index buffers, whose values are structure
    rather than learned, the module keeps a host copy of the values it was built with (or last
    loaded with ``load_state_dict``) and ``reset_parameters`` writes them back."""

    def _init_index_buffers(self) -> None:
        self._index_host = {}
        self.register_load_state_dict_post_hook(_refresh_host_copies)

    def _register_index(self, name: str, index: Optional[torch.Tensor], device=None) -> None:
        if index is None:
            self.register_buffer(name, None)
            return
        self._index_host[name] = host_copy(index)
        dev = device if device is not None else index.device
        self.register_buffer(name, index.detach().to(device=dev, dtype=torch.int64).clone())

    def index_values(self, name: str) -> torch.Tensor:
        """The CPU int64 values of index buffer ``name`` (for a meta buffer: those it was built
        with). Raises if they are unknown (built from a meta tensor)."""
        buf = getattr(self, name)
        if buf.device.type != "meta":
            return buf.detach().to("cpu", torch.int64)
        host = self._index_host.get(name)
        if host is None:
            raise ValueError(f"{type(self).__name__}.{name} was built from a meta tensor, so "
                             f"its values are unknown; give index values as a CPU tensor or a "
                             f"list (they are kept on the host), or load them with "
                             f"load_state_dict")
        return host

    def _reset_index_buffers(self) -> None:
        with torch.no_grad():
            for name, host in self._index_host.items():
                buf = getattr(self, name)
                if buf is None or buf.device.type == "meta":
                    continue
                if host is None:
                    raise RuntimeError(
                        f"{type(self).__name__}.{name} was built from a meta tensor, so "
                        f"reset_parameters cannot restore its values after to_empty(); give "
                        f"index values as a CPU tensor or a list, or load them with "
                        f"load_state_dict instead of calling reset_parameters")
                buf.copy_(host)


def _refresh_host_copies(module, incompatible_keys) -> None:
    """After ``load_state_dict``: the loaded index values become the ones ``reset_parameters``
    restores."""
    for name in module._index_host:
        buf = getattr(module, name)
        if buf is not None and buf.device.type != "meta":
            module._index_host[name] = host_copy(buf)


class ChannelGather(_IndexBuffers, nn.Module):
    """``out[:, j] = x[:, index[j]]``: ``x.index_select(1, index)`` as a module.

    Used for explicit channel permutations and for CondenseNet's index layer (entries may
    repeat, any length). ``index`` is an int64 buffer (on ``device``, else the given tensor's
    device, else the default device); its values are also kept on the host, so the module
    survives deferred initialisation (meta construction, ``to_empty``, ``reset_parameters``).
    """

    def __init__(self, index, device=None):
        super().__init__()
        self._init_index_buffers()
        given_tensor = isinstance(index, torch.Tensor)
        index = as_index_tensor(index, "index")
        if device is None and not given_tensor:
            device = torch.get_default_device()
        self._register_index("index", index, device)

    def reset_parameters(self) -> None:
        """Restore the index values (after ``to_empty``); there are no parameters."""
        self._reset_index_buffers()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.index_select(1, self.index)

    def extra_repr(self) -> str:
        return f"len={self.index.numel()}"


def _shuffle_groups_of(index: torch.Tensor) -> Optional[int]:
    """``g`` if ``index`` (CPU values) is the gather index of ``nn.ChannelShuffle(g)``
    (``1 < g < C``)."""
    C = int(index.numel())
    for g in range(2, C):
        if C % g == 0 and torch.equal(index, interleave_index(C, g)):
            return g
    return None


class InterleavedGroupConv(_IndexBuffers, nn.Module):
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
        self._init_index_buffers()
        self.spec = spec
        self.backend = backend
        self.conv_dims = None  # set by from_modules: 2 for Conv2d (unbatched inputs allowed)
        self.weights = nn.ParameterList(weights)
        self.biases = nn.ParameterList(biases) if any(b is not None for b in biases) else None
        dev = device if device is not None else weights[0].device
        if input_index is not None:
            input_index = as_index_tensor(input_index, "input_index")
            if input_index.numel() != spec.channels[0]:
                raise ValueError(
                    f"input_index has length {input_index.numel()}, but the chain's first width "
                    f"is C_0 = spec.channels[0] = {spec.channels[0]}")
            if input_index.device.type != "meta" and int(input_index.min()) < 0:
                raise ValueError(f"input_index entries must be >= 0, got min "
                                 f"{int(input_index.min())}")
        self._register_index("input_index", input_index, dev)
        self._perm_names = []
        for l, p in enumerate(spec.permutations):
            if isinstance(p, torch.Tensor):
                name = f"perm_{l}"
                self._register_index(name, p, dev)
                self._perm_names.append(name)
            else:
                self._perm_names.append(p)

    def reset_parameters(self) -> None:
        """Initialise the weights and biases as ``nn.Conv2d`` does, and restore the index
        buffers' values (after ``to_empty``; see :class:`ChannelGather`)."""
        self._reset_index_buffers()
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

    def __prepare_scriptable__(self):
        """Called by ``torch.jit.script``: refuse with a clear message (see the functional)."""
        from .functional import _JIT_UNSUPPORTED

        raise TypeError(_JIT_UNSUPPORTED)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.conv_dims is not None and isinstance(x, torch.Tensor):
            # built from nn.Conv2d modules: accept exactly what they accept
            if x.dim() == self.conv_dims + 1:
                return self._replay(x)  # unbatched: the original modules' own semantics
            if x.dim() != self.conv_dims + 2:
                raise ValueError(f"Expected 3D (unbatched) or 4D (batched) input to conv2d, but "
                                 f"got input of size: {list(x.shape)}")
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
        objects: no copy, no device or dtype change) and computes what ``modules`` compute for
        every input they accept: batched ``(N, C, H, W)`` through the fused operator, unbatched
        ``(C, H, W)`` by replaying the modules' own operations (on a 3-D tensor
        ``nn.ChannelShuffle`` and ``ChannelGather`` act on dim 1, as the originals do). Works
        on the meta device (index values are kept on the host). Raises ``ValueError`` /
        ``TypeError`` naming the module's position when ``modules`` is not such a chain.
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
                ops.append(("gather", m.index_values("index")))
            else:
                raise TypeError(
                    f"modules[{i}]: {type(m).__name__} is not part of a fusable chain (expected "
                    f"nn.Conv2d 1x1, nn.ChannelShuffle or igc_kernels.ChannelGather)")
        return cls.from_ops(ops, backend=backend)

    @classmethod
    def from_ops(cls, ops: list, *, backend: str = "auto", where=None,
                 keys=None) -> "InterleavedGroupConv":
        """``from_modules`` on a list of ``("conv", weight, bias, groups)``, ``("shuffle", g)``
        and ``("gather", index)`` tuples (what ``igc_kernels.convert`` collects from module
        trees and torch.fx graphs; gather indices are read on the host). ``where(i)`` names
        the i-th op in error messages. ``keys[i]``: the state-dict keys the i-th op's tensors
        had in the original model (``(weight_key, bias_key)`` for a convolution, the index's key
        or ``None`` for a gather), recorded for :func:`igc_kernels.convert`'s checkpoint
        compatibility."""
        where = where or (lambda i: f"modules[{i}]")
        c = compose_ops(ops, where)
        W0 = c.weights[0]
        spec = ChainSpec(c.channels, c.groups, c.perms)
        obj = cls.__new__(cls)
        nn.Module.__init__(obj)
        obj._setup(spec, c.weights, c.biases, c.input_index, backend)
        obj.conv_dims = 2
        # the original operations, for unbatched inputs and for checkpoint keys
        source, layer = [], 0
        for i, op in enumerate(ops):
            if op[0] == "conv":
                source.append(("conv", layer))
                layer += 1
            elif op[0] == "shuffle":
                source.append(("shuffle", int(op[1])))
            else:
                name = f"source_index_{i}"
                obj._index_host[name] = op[1].detach().to("cpu", torch.int64).clone()
                obj.register_buffer(name, op[1].detach().to(W0.device, torch.int64).clone(),
                                    persistent=False)
                source.append(("gather", name))
        obj._source_ops = source
        obj._source_keys = list(keys) if keys is not None else None
        return obj

    def _replay(self, x: torch.Tensor) -> torch.Tensor:
        """The original modules' operations one by one (``from_modules`` / ``convert``)."""
        h = x
        for kind, arg in self._source_ops:
            if kind == "conv":
                w = self.weights[arg]
                b = None if self.biases is None else self.biases[arg]
                h = F.conv2d(h, w.reshape(w.shape[0], w.shape[1], 1, 1), b,
                             groups=self.spec.groups[arg])
            elif kind == "shuffle":
                h = F.channel_shuffle(h, arg)
            else:
                h = h.index_select(1, wrap_negative(getattr(self, arg), h.shape[1]))
        return h

    def source_index_values(self) -> list:
        """CPU values of the original gathers' indices, in the order of the original ops."""
        return [self.index_values(arg) for kind, arg in self._source_ops if kind == "gather"]

    def recompose(self, gathers: list) -> tuple:
        """``(input_index, perms)`` (CPU tensors or ``None``/``"interleave"``) that the original
        ops give with the gather indices ``gathers`` (in op order) and this module's weights."""
        it = iter(gathers)
        ops = []
        for kind, arg in self._source_ops:
            if kind == "conv":
                b = None if self.biases is None else self.biases[arg]
                ops.append(("conv", self.weights[arg], b, self.spec.groups[arg]))
            elif kind == "shuffle":
                ops.append(("shuffle", arg))
            else:
                ops.append(("gather", next(it)))
        c = compose_ops(ops, lambda i: f"op {i}")
        return c.input_index, c.perms

    def unfuse(self) -> nn.Sequential:
        """The plain modules of this chain: ``nn.Sequential`` of ``nn.Conv2d`` (1x1, grouped),
        ``nn.ChannelShuffle`` and ``ChannelGather`` (the input index first, when there is one).

        The convolutions use this module's Parameters (shared, not copied); index buffers are
        copied. A permutation or input index that is a channel shuffle becomes
        ``nn.ChannelShuffle``. The result computes the same function on 4-D inputs.
        """
        mods = []
        if self.input_index is not None:
            values = self.index_values("input_index")
            g = _shuffle_groups_of(values)
            mods.append(nn.ChannelShuffle(g) if g is not None
                        else ChannelGather(values, device=self.input_index.device))
        for l, G in enumerate(self.spec.groups):
            w = self.weights[l]
            b = None if self.biases is None else self.biases[l]
            c_in, c_out = self.spec.channels[l], self.spec.channels[l + 1]
            conv = nn.Conv2d(c_in, c_out, 1, groups=G, bias=b is not None, device="meta")
            conv.weight = w
            conv.bias = b
            mods.append(conv)
            p = self._perm_names[l]
            if p == "interleave":
                if 1 < G < c_out:
                    mods.append(nn.ChannelShuffle(G))
            elif p is not None:
                values = self.index_values(p)
                g = _shuffle_groups_of(values)
                mods.append(nn.ChannelShuffle(g) if g is not None
                            else ChannelGather(values, device=getattr(self, p).device))
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


@dataclass
class Composed:
    """A chain of plain ops composed into the operator's arguments (CPU index tensors)."""

    channels: list
    groups: list
    perms: list  # None, "interleave" or a CPU int64 gather index per layer
    weights: list
    biases: list
    input_index: Optional[torch.Tensor]


def wrap_negative(idx: torch.Tensor, size: int) -> torch.Tensor:
    """Entries ``-size <= i < 0`` as ``i + size`` (Python indexing, ``x[:, idx]``); others kept."""
    return torch.where((idx < 0) & (idx >= -size), idx + size, idx)


def _host_index(t: torch.Tensor, where: str) -> torch.Tensor:
    if t.device.type == "meta":
        raise ValueError(f"{where}: the index is a meta tensor, whose values are unknown")
    return t.detach().to("cpu", torch.int64)


def compose_ops(ops: list, where) -> Composed:
    """Compose ``("conv", W, b, G)`` / ``("shuffle", g)`` / ``("gather", index)`` ops into a
    chain: leading shuffles and gathers become the input index, the shuffles and gathers after
    a convolution one permutation (an ``"interleave"`` when it is the single shuffle with the
    convolution's groups). Index arithmetic runs on the host."""
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
            idx = _host_index(op[1], where(i))
            if count is not None and idx.numel() != count:
                raise ValueError(f"{where(i)}: gathers {idx.numel()} channels, but {count} "
                                 f"are needed by what follows")
            if idx.numel() and int(idx.min()) < 0:
                raise ValueError(f"{where(i)}: index entries must be >= 0, got min "
                                 f"{int(idx.min())}")
            lead.append(idx)
            count = None
        else:  # shuffle
            if count is None:
                raise ValueError(f"{where(i)}: a channel shuffle before an index gather at the "
                                 f"start of a chain has no known channel count")
            if count % op[1]:
                raise ValueError(f"{where(i)}: {count} channels are not divisible by "
                                 f"shuffle groups {op[1]}")
            lead.append(interleave_index(count, op[1]))
    for idx in lead:  # applied in forward order: the last collected comes first
        input_index = idx if input_index is None else input_index[idx]
    if (input_index is not None and all(op[0] == "shuffle" for op in ops[:first])
            and torch.equal(input_index, torch.arange(count, device="cpu"))):
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
        elif torch.equal(layer_perm, torch.arange(C, device="cpu")):
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
                raise ValueError(f"{where(i)}: in_channels {c_in} does not match the "
                                 f"{channels[-1]} channels that reach it")
            if W.dtype != W0.dtype or W.device != W0.device:
                raise ValueError(f"{where(i)}: weight is {W.dtype} on {W.device}, the chain's "
                                 f"first is {W0.dtype} on {W0.device}")
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
                raise ValueError(f"{where(i)}: {C} channels are not divisible by shuffle "
                                 f"groups {g}")
            idx = interleave_index(C, g)
        else:
            idx = wrap_negative(_host_index(op[1], where(i)), C)
            if idx.numel() != C or not torch.equal(torch.sort(idx).values,
                                                   torch.arange(C, device="cpu")):
                raise ValueError(f"{where(i)}: the gather after a convolution must be a "
                                 f"permutation of its {C} channels")
        n_ops_in_layer += 1
        only_shuffle = op[1] if (op[0] == "shuffle" and n_ops_in_layer == 1) else None
        layer_perm = idx if layer_perm is None else layer_perm[idx]
    close_layer()
    return Composed(channels, groups, perms, weights, biases, input_index)


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
