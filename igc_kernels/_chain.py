"""Validation and normalisation of the operator's arguments.

Every public entry point funnels its arguments through :func:`normalize`, which raises a
``ValueError`` / ``TypeError`` naming the argument, the layer (1-based, as in the design's
``W_l``) and the offending value *before* any computation, and returns a :class:`Chain`: the
canonical form that the backends consume.

Canonical form
--------------
* ``weights[l]`` is a 2-D view ``(C_l, C_{l-1} / G_l)`` of the user's weight (conv-layout weights
  ``(C_l, n_l, 1, ..., 1)`` are flattened by a view, so gradients flow back to the original).
* ``shuffles[l] > 0`` means "channel shuffle with that many groups after layer l" (the design's
  ``"interleave"``); ``0`` means "``perms[l]`` if it is a tensor, else identity". A shuffle that
  is the identity (1 group, or groups of one channel) is stored as ``0``.
* ``perms[l]`` is an int64 gather index of length ``C_l`` or ``None``.
* ``input_index`` is an int64 gather index applied to ``x``'s channels before layer 1
  (``h_0[:, j] = x[:, input_index[j]]``; entries may repeat) or ``None``. ``channels[0]`` is
  ``C_0``, the chain's first width (the index's length when one is given); ``in_channels`` is
  ``x``'s channel count.
* Block fields (see :func:`igc_kernels.interleaved_group_conv`): ``kernel_sizes[l]`` is 1 for
  a pointwise layer (2-D weight) or the odd ``k`` of a ``k x k`` spatial layer (weight kept
  4-D, ``(C_l, n_l, k, k)``); ``strides[l]`` is 1 or 2 (2 only on spatial layers);
  ``activations[l]`` is a code of :data:`ACTIVATIONS`; ``residual`` adds ``x`` to the output.
  A chain without any of them is *plain*: what every backend runs, with gradients.
"""

from __future__ import annotations

import numbers
import sys
from dataclasses import dataclass

import torch

# Activation after a layer (after its bias, before its permutation): name -> the ops' code.
ACTIVATIONS = {None: 0, "relu": 1, "relu6": 2, "hardswish": 3}
# Spatial layers: odd square kernels up to this size (padding k // 2), stride 1 or 2.
MAX_KERNEL_SIZE = 7

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_DTYPE_NAMES = "float32, float16, bfloat16, float64"


@dataclass
class Chain:
    """The validated, canonical description of one call of the operator."""

    channels: tuple  # C_0 .. C_L
    groups: tuple  # G_1 .. G_L
    weights: list  # 2-D (C_l, n_l) tensors
    biases: list  # (C_l,) tensors or None
    shuffles: list  # ints, see module docstring
    perms: list  # int64 index tensors or None
    input_index: object = None  # int64 gather index of x's channels, or None
    in_channels: int = 0  # channels of x (C_0 unless input_index is given)
    kernel_sizes: tuple = ()  # per layer, 1 (pointwise) or odd k; () = all pointwise
    strides: tuple = ()  # per layer, 1 or 2; () = all 1
    activations: tuple = ()  # per layer, codes of ACTIVATIONS; () = none
    residual: bool = False  # y = chain(x) + x

    @property
    def num_layers(self) -> int:
        return len(self.groups)

    @property
    def is_plain(self) -> bool:
        """A chain of grouped 1x1 layers without activations or residual add (what every
        backend runs, with gradients)."""
        return (all(k == 1 for k in self.kernel_sizes) and all(s == 1 for s in self.strides)
                and not any(self.activations) and not self.residual)

    def spatial_layers(self) -> list:
        """1-based numbers of the layers with a ``k x k`` kernel, ``k > 1``."""
        return [l + 1 for l, k in enumerate(self.kernel_sizes) if k > 1]


def is_int(v) -> bool:
    """An integer that is not a bool: Python ints and numpy integers (as torch accepts them;
    numpy's bool is not an ``Integral``)."""
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def has_bias(b: torch.Tensor) -> bool:
    """Whether an entry of the ops' ``biases`` argument is a bias: the ops take ``biases``
    empty or with one entry per layer, ``(0,)``-shaped for "no bias" (a ``Tensor?[]`` holding
    ``None`` would be one opaque argument to torch.library's autograd)."""
    return not (b.dim() == 1 and b.shape[0] == 0)


def _is_ndarray(v) -> bool:
    np = sys.modules.get("numpy")
    return np is not None and isinstance(v, np.ndarray)


def interleave_index(channels: int, groups: int, device=None) -> torch.Tensor:
    """Gather index of the channel shuffle with ``groups`` groups (``nn.ChannelShuffle``).

    ``perm[k * groups + g] = g * (channels // groups) + k``. On the CPU unless ``device`` is
    given (also inside a ``with torch.device(...)`` block: index values are structure, kept on
    the host so that modules built on the meta device still know them).
    """
    if not (is_int(channels) and is_int(groups)) or channels <= 0 or groups <= 0:
        raise ValueError(f"interleave_index: channels and groups must be positive ints, got "
                         f"channels={channels!r}, groups={groups!r}")
    if channels % groups:
        raise ValueError(f"interleave_index: channels = {channels} is not divisible by groups = "
                         f"{groups}")
    m = int(channels) // int(groups)
    dev = "cpu" if device is None else device
    return torch.arange(int(channels), device=dev).view(int(groups), m).t().reshape(-1)


def as_index_tensor(index, what: str) -> torch.Tensor:
    """A 1-D int64 index from a tensor (its device kept), a numpy array or a sequence of ints
    (on the CPU). Raises ``TypeError`` / ``ValueError`` naming ``what``; does not read values."""
    if isinstance(index, (list, tuple)):
        if not all(is_int(v) for v in index):
            raise TypeError(f"{what} given as a sequence must hold ints")
        index = torch.tensor([int(v) for v in index], dtype=torch.int64, device="cpu")
    elif _is_ndarray(index):
        if index.dtype.kind not in "iu":
            raise TypeError(f"{what} must hold integers, got a numpy array of dtype {index.dtype}")
        index = torch.from_numpy(index.astype("int64", copy=True))
    if not isinstance(index, torch.Tensor):
        raise TypeError(f"{what} must be a 1-D integer tensor or a sequence of ints, got "
                        f"{type(index).__name__}")
    if index.is_floating_point() or index.is_complex() or index.dtype == torch.bool:
        raise TypeError(f"{what} must be an integer tensor, got dtype {index.dtype}")
    if index.dim() != 1 or index.numel() == 0:
        raise ValueError(f"{what} must be a non-empty 1-D tensor, got shape {tuple(index.shape)}")
    return index.detach().to(torch.int64)


def _shape(t) -> str:
    return "(" + ", ".join(str(int(s)) for s in t.shape) + ")" if t.dim() != 1 else f"({int(t.shape[0])},)"


def _is_compiling() -> bool:
    try:
        return torch.compiler.is_compiling()
    except AttributeError:  # pragma: no cover - very old torch
        return False


def _host_readable(t: torch.Tensor) -> bool:
    """A plain CPU tensor outside tracing: its values can be read now, cheaply."""
    return type(t) is torch.Tensor and t.device.type == "cpu" and not _is_compiling()


# Up to this many entries an index is checked through a Python list, which is cheaper than four
# torch reductions (measured: docs/benchmarks.md, "Per-call cost").
_SMALL_INDEX = 256


def check_index_values(p: torch.Tensor, length: int, layer, what: str, unique=True) -> None:
    """Raise unless every entry of the 1-D index ``p`` lies in ``[0, length)`` (and, with
    ``unique``, each appears once: a permutation).

    Checked on every call; nothing is cached (a cache keyed by tensor identity would keep user
    tensors alive, and would miss an index changed in place through ``.data`` or ``.numpy()``).
    A plain CPU tensor is checked on the host with a precise message (``ValueError``). A GPU
    tensor, or any tensor while ``torch.compile`` / ``torch.export`` traces, is checked by
    ``torch._assert_async``: no device synchronisation, traceable, and a ``RuntimeError`` (on a
    GPU a device-side assert) when the index is invalid. Meta tensors have no values: nothing is
    checked. The kernels clamp index entries anyway, so no backend reads or writes outside its
    tensors whatever the values.
    """
    where = f"layer {layer}: {what}" if layer is not None else what
    if p.device.type == "meta" or p.numel() == 0:
        return
    if not _host_readable(p):
        pi = p.to(torch.int64)
        ok = ((pi >= 0) & (pi < length)).all()
        msg = f"{where} entries must lie in [0, {length})"
        if unique:
            counts = torch.zeros(length, dtype=torch.int64, device=p.device).index_add_(
                0, pi.clamp(0, length - 1), torch.ones_like(pi))
            ok = ok & (counts == 1).all()
            msg += f" and form a permutation of 0..{length - 1}"
        torch._assert_async(ok, msg)
        return
    if p.numel() <= _SMALL_INDEX:  # a Python list is the cheapest way to look at a few values
        v = p.tolist()
        lo, hi = min(v), max(v)
    else:
        lo, hi = int(p.min()), int(p.max())
    if lo < 0 or hi >= length:
        raise ValueError(f"{where} entries must lie in [0, {length}), got min {lo} and max {hi}")
    if unique:
        if p.numel() <= _SMALL_INDEX and len(set(v)) == len(v):
            return
        counts = torch.bincount(p.detach().reshape(-1).to(torch.int64), minlength=length)
        if int(counts.max()) > 1:
            dup = int(torch.nonzero(counts > 1)[0, 0])
            raise ValueError(
                f"{where} has duplicate entries ({dup} appears "
                f"{int(counts[dup])} times); it must be a permutation of 0..{length - 1}"
            )


def normalize_permutation(p, layer: int, channels: int, groups: int, device, check_values=True):
    """Return ``(shuffle, perm)`` for one entry of ``permutations`` (see module docstring)."""
    if p is None:
        return 0, None
    if isinstance(p, str):
        if p != "interleave":
            raise ValueError(
                f"layer {layer}: unknown permutation {p!r}; expected None, 'interleave' or a "
                f"1-D integer index tensor of length C_{layer} = {channels}"
            )
        is_identity = groups <= 1 or groups >= channels
        return (0 if is_identity else groups), None
    if isinstance(p, (list, tuple)) or _is_ndarray(p):
        p = as_index_tensor(p, f"layer {layer}: permutation").to(device)
    if not isinstance(p, torch.Tensor):
        raise TypeError(
            f"layer {layer}: permutation must be None, 'interleave' or an index tensor, "
            f"got {type(p).__name__}"
        )
    if p.is_floating_point() or p.is_complex() or p.dtype == torch.bool:
        raise TypeError(
            f"layer {layer}: permutation must be an integer tensor, got dtype {p.dtype}"
        )
    if p.dim() != 1 or p.shape[0] != channels:
        raise ValueError(
            f"layer {layer}: permutation has shape {_shape(p)}, expected a 1-D index of "
            f"length C_{layer} = {channels}"
        )
    if p.device != device:
        raise ValueError(
            f"layer {layer}: permutation is on {p.device} but x is on {device}; "
            f"all tensors must be on the same device"
        )
    if check_values:
        check_index_values(p, channels, layer, "permutation")
    if p.dtype != torch.int64:
        p = p.to(torch.int64)
    return 0, p


def normalize_input_index(idx, in_channels: int, device, check_values=True):
    """Validate ``input_index`` against ``x``'s ``in_channels``; return it as int64 (or None).

    The rules of explicit permutations, except that entries may repeat and any length >= 1 is
    allowed: a 1-D integer tensor (or a sequence of ints) on ``x``'s device with every entry in
    ``[0, in_channels)``.
    """
    if idx is None:
        return None
    if isinstance(idx, (list, tuple)) or _is_ndarray(idx):
        idx = as_index_tensor(idx, "input_index").to(device)
    if not isinstance(idx, torch.Tensor):
        raise TypeError(
            f"input_index must be None or a 1-D integer index tensor, got {type(idx).__name__}")
    if idx.is_floating_point() or idx.is_complex() or idx.dtype == torch.bool:
        raise TypeError(f"input_index must be an integer tensor, got dtype {idx.dtype}")
    if idx.dim() != 1 or idx.shape[0] == 0:
        raise ValueError(
            f"input_index has shape {_shape(idx)}, expected a non-empty 1-D index of x's "
            f"channels (x has {in_channels})")
    if idx.device != device:
        raise ValueError(
            f"input_index is on {idx.device} but x is on {device}; "
            f"all tensors must be on the same device")
    if check_values:
        check_index_values(idx, in_channels, None, "input_index", unique=False)
    if idx.dtype != torch.int64:
        idx = idx.to(torch.int64)
    return idx


def _check_x(x) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.layout != torch.strided:
        raise TypeError(f"x must be a dense (strided) tensor, got layout {x.layout}; convert it "
                        f"with .to_dense()")
    if x.dim() < 2 or x.dim() > 5:
        raise ValueError(
            f"x must have shape (N, C) or (N, C, *spatial) with 1 to 3 spatial dims, "
            f"got shape {tuple(x.shape)}"
        )
    if x.shape[1] == 0:
        raise ValueError(f"x has 0 channels (shape {tuple(x.shape)})")
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"x has dtype {x.dtype}; supported dtypes are {_DTYPE_NAMES}")


def _as_list(v, name: str) -> list:
    if isinstance(v, (list, tuple)):
        return list(v)
    raise TypeError(f"{name} must be a list or tuple with one entry per layer, got {type(v).__name__}")


def _check_lengths(lengths: dict) -> None:
    if len(set(lengths.values())) != 1:
        got = ", ".join(f"{len_} {name}" for name, len_ in lengths.items())
        names = ", ".join(lengths)
        raise ValueError(f"{names} must have one entry per layer; got {got}")


def _check_layer(layer: int, G, W, b, c_in: int, x: torch.Tensor, has_index: bool) -> tuple:
    """Check layer ``layer``'s groups, weight and bias (``None``: no bias) against the ``c_in``
    channels that reach it and ``x``'s dtype and device; return ``(G, W as 2-D, c_out)``."""
    device, dtype = x.device, x.dtype
    if not is_int(G):
        raise TypeError(f"layer {layer}: groups must be an int, got {type(G).__name__} {G!r}")
    G = int(G)
    if G <= 0:
        raise ValueError(f"layer {layer}: groups must be a positive integer, got {G}")
    if not isinstance(W, torch.Tensor):
        raise TypeError(f"layer {layer}: weight must be a torch.Tensor, got {type(W).__name__}")
    k = 1
    if W.dim() == 4 and W.shape[2] == W.shape[3] and W.shape[2] > 1:
        k = int(W.shape[2])
        if k % 2 == 0 or k > MAX_KERNEL_SIZE:
            raise ValueError(f"layer {layer}: weight has shape {_shape(W)}: a spatial layer's "
                             f"kernel must be k x k with k odd, 3 <= k <= {MAX_KERNEL_SIZE} "
                             f"(padding k // 2)")
        if x.dim() != 4:
            raise ValueError(f"layer {layer}: a {k}x{k} spatial layer needs x of shape "
                             f"(N, C, H, W), got shape {tuple(x.shape)}")
    elif W.dim() < 2 or any(s != 1 for s in W.shape[2:]):
        raise ValueError(
            f"layer {layer}: weight has shape {_shape(W)}; a grouped 1x1 convolution weight "
            f"must be (C_{layer}, C_{layer - 1} / groups) or "
            f"(C_{layer}, C_{layer - 1} / groups, 1, ..., 1), and a spatial layer's "
            f"(C_{layer}, C_{layer - 1} / groups, k, k) with k odd")
    if c_in % G != 0:
        where = f"C_{layer - 1}"
        if layer == 1:
            where = "input_index's length" if has_index else "x's channel count"
        raise ValueError(f"layer {layer}: in_channels C_{layer - 1} = {c_in} ({where}) must be "
                         f"divisible by groups = {G}")
    n = c_in // G
    c_out = int(W.shape[0])
    if int(W.shape[1]) != n or c_out == 0:
        if layer == 1 and c_out > 0 and int(W.shape[1]) * G != c_in:
            what = f"input_index selects {c_in} channels" if has_index \
                else f"x has {c_in} channels"
            raise ValueError(
                f"{what}, but layer 1 expects C_0 = weight.shape[1] * groups = "
                f"{int(W.shape[1])} * {G} = {int(W.shape[1]) * G} (weight shape {_shape(W)})")
        raise ValueError(f"layer {layer}: weight has shape {_shape(W)}, expected (C_{layer}, "
                         f"C_{layer - 1} / groups) = ({c_out if c_out else 'C_' + str(layer)}, "
                         f"{n})")
    if c_out % G != 0:
        raise ValueError(f"layer {layer}: out_channels C_{layer} = {c_out} (weight.shape[0]) "
                         f"must be divisible by groups = {G}")
    if W.dtype != dtype:
        raise TypeError(f"layer {layer}: weight has dtype {W.dtype} but x has dtype {dtype}; "
                        f"they must match (or run under torch.autocast)")
    if W.device != device:
        raise ValueError(f"layer {layer}: weight is on {W.device} but x is on {device}; all "
                         f"tensors must be on the same device")
    if b is not None:
        if not isinstance(b, torch.Tensor):
            raise TypeError(f"layer {layer}: bias must be a tensor or None, got "
                            f"{type(b).__name__}")
        if b.dim() != 1 or int(b.shape[0]) != c_out:
            raise ValueError(f"layer {layer}: bias has shape {_shape(b)}, expected ({c_out},)")
        if b.dtype != dtype:
            raise TypeError(f"layer {layer}: bias has dtype {b.dtype} but x has dtype {dtype}")
        if b.device != device:
            raise ValueError(f"layer {layer}: bias is on {b.device} but x is on {device}; all "
                             f"tensors must be on the same device")
    if k > 1:
        return G, W, c_out, k
    return G, (W.flatten(1) if W.dim() > 2 else W), c_out, 1


def _activation_code(a, layer: int) -> int:
    if a is not None and not isinstance(a, str):
        raise TypeError(f"layer {layer}: activation must be None or one of 'relu', 'relu6', "
                        f"'hardswish', got {type(a).__name__}")
    if a not in ACTIVATIONS:
        raise ValueError(f"layer {layer}: unknown activation {a!r}; expected None, 'relu', "
                         f"'relu6' or 'hardswish'")
    return ACTIVATIONS[a]


def _block_fields(x, chain: Chain, strides, activations, residual) -> Chain:
    """Validate and attach the block fields (strides, activations, residual) to ``chain``."""
    L = chain.num_layers
    ks = chain.kernel_sizes
    if strides is not None:
        strides = _as_list(strides, "strides")
        if len(strides) != L:
            raise ValueError(f"strides must have one entry per layer ({L}), got {len(strides)}")
        for l, s in enumerate(strides, start=1):
            if not is_int(s) or int(s) not in (1, 2):
                raise ValueError(f"layer {l}: stride must be 1 or 2, got {s!r}")
            if int(s) != 1 and ks[l - 1] == 1:
                raise ValueError(f"layer {l}: stride {s} on a pointwise (1x1) layer; only "
                                 f"spatial (k x k) layers take a stride")
        chain.strides = tuple(int(s) for s in strides)
    else:
        chain.strides = (1,) * L
    if activations is not None:
        activations = _as_list(activations, "activations")
        if len(activations) != L:
            raise ValueError(f"activations must have one entry per layer ({L}), got "
                             f"{len(activations)}")
        chain.activations = tuple(_activation_code(a, l)
                                  for l, a in enumerate(activations, start=1))
    else:
        chain.activations = (0,) * L
    if not isinstance(residual, bool):
        raise TypeError(f"residual must be a bool, got {type(residual).__name__}")
    if residual:
        if chain.channels[-1] != chain.in_channels:
            raise ValueError(f"residual=True adds x to the output: x has {chain.in_channels} "
                             f"channels but the last layer has C_{L} = {chain.channels[-1]}")
        if any(s != 1 for s in chain.strides):
            raise ValueError(f"residual=True needs the output's spatial size to equal x's; "
                             f"layer {1 + [s != 1 for s in chain.strides].index(True)} has "
                             f"stride 2")
    chain.residual = residual
    return chain


def strided_spatial(spatial, strides) -> list:
    """Spatial sizes after layers of these strides (padding ``k // 2`` keeps ``ceil(H / s)``
    rows per stride-``s`` layer; 0 stays 0)."""
    sp = list(spatial)
    for s in strides:
        sp = [(d - 1) // s + 1 for d in sp]
    return sp



def normalize(x, weights, groups, permutations=None, biases=None, *, input_index=None,
              check_values=True, strides=None, activations=None, residual=False) -> Chain:
    """Validate the operator's arguments against ``x``; return the canonical :class:`Chain`."""
    _check_x(x)
    weights = _as_list(weights, "weights")
    groups = _as_list(groups, "groups")
    if len(weights) == 0:
        raise ValueError("weights is empty: the chain needs at least one layer")
    L = len(weights)
    lengths = {"weights": L, "groups": len(groups)}
    if permutations is not None:
        permutations = _as_list(permutations, "permutations")
        lengths["permutations"] = len(permutations)
    if biases is not None:
        biases = _as_list(biases, "biases")
        lengths["biases"] = len(biases)
    _check_lengths(lengths)
    if permutations is None:
        permutations = ["interleave"] * (L - 1) + [None]
    if biases is None:
        biases = [None] * L

    in_channels = int(x.shape[1])
    input_index = normalize_input_index(input_index, in_channels, x.device, check_values)
    channels = [in_channels if input_index is None else int(input_index.shape[0])]
    gs, w2d, shuffles, perms, ks = [], [], [], [], []
    for i in range(L):
        G, W, c_out, k = _check_layer(i + 1, groups[i], weights[i], biases[i], channels[-1], x,
                                      input_index is not None)
        s, p = normalize_permutation(permutations[i], i + 1, c_out, G, x.device, check_values)
        channels.append(c_out)
        gs.append(G)
        w2d.append(W)
        shuffles.append(s)
        perms.append(p)
        ks.append(k)
    chain = Chain(tuple(channels), tuple(gs), w2d, list(biases), shuffles, perms, input_index,
                  in_channels, kernel_sizes=tuple(ks))
    return _block_fields(x, chain, strides, activations, residual)


def validate_op_args(x, weights, biases, groups, shuffles, perms, input_index=None,
                     grad_y=None) -> Chain:
    """The ops' own arguments (``torch.ops.igc*.chain_forward`` / ``chain_backward``: 2-D
    weights, ``biases`` empty or with ``(0,)`` for "no bias", ``shuffles`` as ints, ``perms``
    tensors or ``None``) checked with the same rules and messages as :func:`normalize`, for
    direct calls of the ops registered in Python; index values are checked too (see
    :func:`check_index_values`). Returns the :class:`Chain`. (The C++ ops have ``check_chain``
    in csrc/chain_args.h.)"""
    _check_x(x)
    L = len(weights)
    if L == 0:
        raise ValueError("weights is empty: the chain needs at least one layer")
    lengths = {"weights": L, "groups": len(groups), "shuffles": len(shuffles),
               "perms": len(perms)}
    if len(biases):
        lengths["biases"] = len(biases)
    _check_lengths(lengths)
    in_channels = int(x.shape[1])
    input_index = normalize_input_index(input_index, in_channels, x.device)
    channels = [in_channels if input_index is None else int(input_index.shape[0])]
    gs, w2d, bs, perm_out = [], [], [], []
    for i in range(L):
        layer = i + 1
        b = biases[i] if len(biases) and has_bias(biases[i]) else None
        if isinstance(weights[i], torch.Tensor) and weights[i].dim() != 2:
            raise ValueError(f"layer {layer}: weight must be 2-D (C_{layer}, C_{layer - 1} / "
                             f"groups), got shape {_shape(weights[i])}")
        G, W, c_out, _ = _check_layer(layer, groups[i], weights[i], b, channels[-1], x,
                                      input_index is not None)
        s = shuffles[i]
        if not is_int(s) or s < 0 or (s > 0 and c_out % s):
            raise ValueError(f"layer {layer}: shuffles = {s} must be 0 or divide C_{layer} = "
                             f"{c_out}")
        p = perms[i]
        if s > 0 and p is not None:
            raise ValueError(f"layer {layer}: give either a shuffle or an explicit permutation, "
                             f"not both")
        if p is not None:
            _, p = normalize_permutation(p, layer, c_out, G, x.device)
        channels.append(c_out)
        gs.append(G)
        w2d.append(W)
        bs.append(b)
        perm_out.append(p)
    if grad_y is not None:
        want = (x.shape[0], channels[-1], *x.shape[2:])
        if not isinstance(grad_y, torch.Tensor) or tuple(grad_y.shape) != tuple(want):
            raise ValueError(f"grad_y has shape {tuple(getattr(grad_y, 'shape', ()))}, expected "
                             f"{tuple(want)} (x's shape with C_L channels)")
        if grad_y.dtype != x.dtype or grad_y.device != x.device:
            raise TypeError(f"grad_y is {grad_y.dtype} on {grad_y.device}, x is {x.dtype} on "
                            f"{x.device}; they must match")
    return Chain(tuple(channels), tuple(gs), w2d, bs, [int(s) for s in shuffles], perm_out,
                 input_index, in_channels)


def out_is_channels_last(x: torch.Tensor) -> bool:
    """Whether outputs shaped like ``x`` are laid out channels-last (C innermost).

    The rule, shared by every backend and the fake kernels: an input that is not contiguous
    and whose channel stride is smaller than every stride of a non-trivial spatial dim gives
    channels-last outputs; everything else gives contiguous outputs.
    """
    if x.dim() < 3 or x.is_contiguous():
        return False
    sp = [x.stride(d) for d in range(2, x.dim()) if x.shape[d] > 1]
    if not sp:
        return False
    return x.stride(1) < min(sp)


def empty_like_layout(x: torch.Tensor, channels: int, dtype=None, spatial=None) -> torch.Tensor:
    """An uninitialised ``(N, channels, *spatial)`` tensor in the memory format of ``x``
    (``spatial``: x's spatial sizes unless given)."""
    dtype = x.dtype if dtype is None else dtype
    spatial = tuple(x.shape[2:]) if spatial is None else tuple(spatial)
    if out_is_channels_last(x):
        shape = (x.shape[0], *spatial, channels)
        return torch.empty(shape, dtype=dtype, device=x.device).movedim(-1, 1)
    return torch.empty((x.shape[0], channels, *spatial), dtype=dtype, device=x.device)


def to_layout_of(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``y`` (shaped like ``x`` up to channels and, after strided layers, spatial sizes) in the
    memory format :func:`empty_like_layout` gives for ``x``."""
    if out_is_channels_last(x):
        if y.movedim(1, -1).is_contiguous():
            return y
        out = empty_like_layout(x, y.shape[1], y.dtype, spatial=y.shape[2:])
        out.copy_(y)
        return out
    return y.contiguous()

