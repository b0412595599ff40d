"""``convert``: swap the fused operator into an existing model; ``unfuse``: the way back.

What is fused
-------------
A *chain* is: optional leading index gathers / channel shuffles (they become the operator's
input index), then one or more 1x1 ``nn.Conv2d`` (stride 1, no padding, dilation 1, bias or
not, any groups), each followed by any number of permutations (channel shuffles, or index
gathers that are permutations; consecutive ones are composed). A shuffle whose group count is
the preceding convolution's is the operator's ``"interleave"``; any other becomes an index
permutation. A chain is fused when one of its convolutions is grouped and it has two or more
convolutions, a permutation or an input index (a lone grouped 1x1 convolution followed by a
shuffle is fused too; chains of dense 1x1 convolutions alone are left alone).

Where chains are found
----------------------
1. Module trees: consecutive children of every ``nn.Sequential`` (``nn.Conv2d``,
   ``nn.ChannelShuffle``, :class:`igc_kernels.ChannelGather`). The first module of a chain is
   replaced (``setattr`` on the parent) by the fused :class:`InterleavedGroupConv`, the others
   by ``nn.Identity`` so the other children keep their names.
2. Functional forwards (torch.fx): every other module whose class is not one of torch's own is
   traced with its children kept as leaves. In its graph a chain is a path of single-use nodes:
   ``self.conv(x)`` of a 1x1 ``nn.Conv2d`` child or ``F.conv2d(x, self.weight, ...)``;
   ``F.channel_shuffle`` / ``torch.channel_shuffle`` / an ``nn.ChannelShuffle`` child;
   ``torch.index_select(x, 1, idx)`` / ``x.index_select(1, idx)`` / ``x[:, idx]`` with an index
   tensor held by the module. A module whose graph changed is replaced by a
   ``torch.fx.GraphModule`` of the same class name (its forward, its children and the
   attributes the graph uses); modules that cannot be traced are left as they are.

The walk is post-order (children first). ``filter_fn(module, name)`` (``name`` the qualified
name in the model) is asked about every module that would join a chain (for a functional
``F.conv2d`` the owning module and the weight's qualified name); ``False`` keeps that module out.
Modules with hooks are never fused. The fused modules adopt the original Parameters: with
``inplace=True`` they are the model's own objects (optimizer state stays valid); with
``inplace=False`` (default) the model is deep-copied first and the original is untouched.
"""

from __future__ import annotations

import copy
import operator
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .modules import ChannelGather, InterleavedGroupConv, conv_problem

__all__ = ["convert", "unfuse"]

FilterFn = Optional[Callable[[nn.Module, str], bool]]


def _has_hooks(m: nn.Module) -> bool:
    return bool(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks
                or getattr(m, "_backward_pre_hooks", None))


def _module_op(m: nn.Module):
    """The op tuple of a module that can join a chain, or None."""
    if _has_hooks(m):
        return None
    if type(m) is nn.Conv2d:
        return None if conv_problem(m) else ("conv", m.weight, m.bias, int(m.groups))
    if type(m) is nn.ChannelShuffle:
        return ("shuffle", int(m.groups))
    if type(m) is ChannelGather:
        return ("gather", m.index)
    return None


def _is_permutation(idx: torch.Tensor, n: int) -> bool:
    return idx.numel() == n and torch.equal(torch.sort(idx.detach().to(torch.int64)).values,
                                            torch.arange(n, device=idx.device))


def _split_runs(ops: list) -> list:
    """Maximal valid chains in a sequence of op tuples (None = something else).

    Returns ``(start, stop)`` index ranges into ``ops``; every range is a chain that
    ``InterleavedGroupConv.from_ops`` accepts and that is worth fusing.
    """
    runs = []
    i, n = 0, len(ops)
    while i < n:
        if ops[i] is None or ops[i][0] != "conv":
            i += 1
            continue
        conv = ops[i]
        # leading gathers / shuffles (walk back; a shuffle needs a known channel count)
        start, count = i, int(conv[1].shape[1]) * conv[3]
        j = i - 1
        prev_stop = runs[-1][1] if runs else 0
        while j >= prev_stop and ops[j] is not None and ops[j][0] in ("gather", "shuffle"):
            if ops[j][0] == "gather":
                if count is not None and ops[j][1].numel() != count:
                    break
                count = None
            else:
                if count is None or count % ops[j][1]:
                    break
            start = j
            j -= 1
        # layers
        C, dtype, device = int(conv[1].shape[0]), conv[1].dtype, conv[1].device
        convs, grouped, extra = 1, conv[3] > 1, start < i
        k = i + 1
        while k < n and ops[k] is not None:
            op = ops[k]
            if op[0] == "conv":
                W = op[1]
                if (int(W.shape[1]) * op[3] != C or W.dtype != dtype or W.device != device):
                    break
                C = int(W.shape[0])
                convs += 1
                grouped = grouped or op[3] > 1
            elif op[0] == "shuffle":
                if C % op[1]:
                    break
                extra = True
            else:
                if not _is_permutation(op[1], C):
                    break
                extra = True
            k += 1
        # trailing leading-style ops that belong to the next chain stay out: a gather that is
        # not a permutation already stopped the loop above
        if grouped and (convs >= 2 or extra):
            runs.append((start, k))
            i = k
        else:
            i += 1
    return runs


# ---------------------------------------------------------------------------------------------
# Module trees
# ---------------------------------------------------------------------------------------------
def _convert_sequential(seq: nn.Sequential, prefix: str, filter_fn: FilterFn, backend: str) -> int:
    names = list(seq._modules.keys())
    mods = [seq._modules[k] for k in names]
    ops = []
    for name, m in zip(names, mods):
        op = _module_op(m) if m is not None else None
        if op is not None and filter_fn is not None and not filter_fn(m, prefix + name):
            op = None
        ops.append(op)
    count = 0
    for start, stop in _split_runs(ops):
        fused = InterleavedGroupConv.from_ops(
            ops[start:stop], backend=backend,
            where=lambda t, s=start: f"{prefix}{names[s + t]}")
        setattr(seq, names[start], fused)
        for t in range(start + 1, stop):
            setattr(seq, names[t], nn.Identity())
        count += 1
    return count


def _is_torch_module(m: nn.Module) -> bool:
    mod = type(m).__module__ or ""
    return mod.startswith("torch.") and not mod.startswith("torch.fx")


def _walk(module: nn.Module, prefix: str, filter_fn: FilterFn, backend: str, functional: bool,
          stats: dict) -> nn.Module:
    """Convert ``module``'s subtree (children first); return the module that replaces it."""
    if isinstance(module, InterleavedGroupConv):
        return module
    for name, child in list(module._modules.items()):
        if child is None:
            continue
        new = _walk(child, f"{prefix}{name}.", filter_fn, backend, functional, stats)
        if new is not child:
            setattr(module, name, new)
    if isinstance(module, nn.Sequential) and type(module).forward is nn.Sequential.forward:
        stats["chains"] += _convert_sequential(module, prefix, filter_fn, backend)
        return module
    if functional and (not _is_torch_module(module) or isinstance(module, torch.fx.GraphModule)):
        new = _convert_fx(module, prefix, filter_fn, backend, stats)
        if new is not None:
            return new
    return module


# ---------------------------------------------------------------------------------------------
# torch.fx
# ---------------------------------------------------------------------------------------------
class _ChildrenAsLeaves(torch.fx.Tracer):
    """Trace one module's own forward: every submodule call stays a ``call_module`` node."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return True


def _get_attr(root: nn.Module, target: str):
    obj = root
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


_SHUFFLE_FNS = {F.channel_shuffle, torch.channel_shuffle}
if hasattr(torch, "native_channel_shuffle"):
    _SHUFFLE_FNS.add(torch.native_channel_shuffle)
_CONV_FNS = {F.conv2d, torch.conv2d}


def _arg(node, pos: int, name: str, default):
    if len(node.args) > pos:
        return node.args[pos]
    return node.kwargs.get(name, default)


def _const_tensor(root, a) -> Optional[torch.Tensor]:
    if isinstance(a, torch.fx.Node) and a.op == "get_attr":
        t = _get_attr(root, a.target)
        return t if isinstance(t, torch.Tensor) else None
    return None


def _pair_is(v, value) -> bool:
    if isinstance(v, int):
        return v == value
    if isinstance(v, (tuple, list)) and len(v) == 2 and all(isinstance(e, int) for e in v):
        return tuple(v) == (value, value)
    return False


def _node_op(root: nn.Module, node, prefix: str, filter_fn: FilterFn):
    """``(op_tuple, data_input_node)`` if ``node`` can join a chain, else None. The data
    input is always ``node.args[0]``."""
    if node.op not in ("call_module", "call_function", "call_method") or not node.args:
        return None
    if node.op == "call_module":
        m = _get_attr(root, node.target)
        if len(node.args) != 1 or node.kwargs:
            return None
        op = _module_op(m)
        if op is None or (filter_fn is not None and not filter_fn(m, prefix + node.target)):
            return None
        return op, node.args[0]
    if node.op == "call_function" and node.target in _CONV_FNS:
        w_node = _arg(node, 1, "weight", None)
        w = _const_tensor(root, w_node)
        b_arg = _arg(node, 2, "bias", None)
        b = None if b_arg is None else _const_tensor(root, b_arg)
        if w is None or (b_arg is not None and b is None):
            return None
        stride, padding = _arg(node, 3, "stride", 1), _arg(node, 4, "padding", 0)
        dilation, groups = _arg(node, 5, "dilation", 1), _arg(node, 6, "groups", 1)
        if not (isinstance(groups, int) and _pair_is(stride, 1) and _pair_is(dilation, 1)
                and (padding == "valid" or _pair_is(padding, 0))):
            return None
        if w.dim() != 4 or tuple(w.shape[2:]) != (1, 1) or int(w.shape[0]) % groups:
            return None
        if filter_fn is not None and not filter_fn(root, prefix + w_node.target):
            return None
        return ("conv", w, b, groups), node.args[0]
    if node.op == "call_function" and node.target in _SHUFFLE_FNS:
        g = _arg(node, 1, "groups", None)
        if isinstance(g, int) and g > 0 and len(node.args) + len(node.kwargs) == 2:
            return ("shuffle", g), node.args[0]
        return None
    if (node.op == "call_function" and node.target is torch.index_select) or (
            node.op == "call_method" and node.target == "index_select"):
        dim = _arg(node, 1, "dim", None)
        idx = _const_tensor(root, _arg(node, 2, "index", None))
        if dim == 1 and idx is not None and idx.dim() == 1 and not idx.is_floating_point():
            return ("gather", idx), node.args[0]
        return None
    if node.op == "call_function" and node.target is operator.getitem and len(node.args) == 2:
        key = node.args[1]
        if (isinstance(key, tuple) and len(key) == 2 and key[0] == slice(None)
                and isinstance(key[1], torch.fx.Node)):
            idx = _const_tensor(root, key[1])
            if (idx is not None and idx.dim() == 1 and idx.dtype in (torch.int64, torch.int32)):
                return ("gather", idx), node.args[0]
    return None


def _convert_fx(module: nn.Module, prefix: str, filter_fn: FilterFn, backend: str,
                stats: dict) -> Optional[nn.Module]:
    try:
        graph = _ChildrenAsLeaves().trace(module)
    except Exception:  # not symbolically traceable (data-dependent control flow, ...): skip
        return None
    info = {}
    for node in graph.nodes:
        r = _node_op(module, node, prefix, filter_fn)
        if r is not None:
            info[node] = r
    if not any(r[0][0] == "conv" for r in info.values()):
        return None

    def single_user(n) -> Optional[torch.fx.Node]:
        users = list(n.users)
        return users[0] if len(users) == 1 else None

    consumed, paths = set(), []
    for node in graph.nodes:
        if node in consumed or node not in info or info[node][0][0] != "conv":
            continue
        path = [node]
        back = info[node][1]  # leading gathers / shuffles with no other user
        while (isinstance(back, torch.fx.Node) and back in info and back not in consumed
               and info[back][0][0] != "conv" and single_user(back) is path[0]):
            path.insert(0, back)
            back = info[back][1]
        cur = node
        while True:
            nxt = single_user(cur)
            if nxt is None or nxt not in info or info[nxt][1] is not cur:
                break
            path.append(nxt)
            cur = nxt
        consumed.update(path)
        paths.append(path)

    new_modules, changed = {}, False
    for path in paths:
        ops = [info[n][0] for n in path]
        for start, stop in _split_runs(ops):
            run = path[start:stop]
            fused = InterleavedGroupConv.from_ops(
                ops[start:stop], backend=backend,
                where=lambda t, run=run: f"{prefix}{run[t].name} ({run[t].format_node()})")
            name = f"igc_fused_{stats['fx_modules']}"
            while hasattr(module, name) or name in new_modules:
                stats["fx_modules"] += 1
                name = f"igc_fused_{stats['fx_modules']}"
            stats["fx_modules"] += 1
            new_modules[name] = fused
            last, first_input = run[-1], run[0].args[0]  # (a previous run may have replaced it)
            with graph.inserting_before(last):
                new = graph.call_module(name, (first_input,))
            last.replace_all_uses_with(new)
            for n in reversed(run):
                attrs = [a for a in n.all_input_nodes if a.op == "get_attr"]
                graph.erase_node(n)
                for a in attrs:
                    if not a.users:
                        graph.erase_node(a)
            stats["chains"] += 1
            changed = True
    if not changed:
        return None
    graph.lint()
    root = {}
    for node in graph.nodes:
        if node.op in ("call_module", "get_attr"):
            root[node.target] = new_modules[node.target] if node.target in new_modules \
                else _get_attr(module, node.target)
    gm = torch.fx.GraphModule(root, graph, class_name=type(module).__name__)
    gm.train(module.training)
    return gm


# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------
def convert(model: nn.Module, filter_fn: FilterFn = None, inplace: bool = False, *,
            backend: str = "auto", functional: bool = True) -> nn.Module:
    """Replace every chain of grouped 1x1 convolutions and permutations in ``model`` by the
    fused :class:`igc_kernels.InterleavedGroupConv` (see the module docstring for the rules).

    Args:
        model: the model (not modified unless ``inplace=True``).
        filter_fn: ``filter_fn(module, qualified_name) -> bool``; ``False`` keeps a module out
            of every chain.
        inplace: convert ``model`` itself (the fused modules adopt its Parameters); otherwise a
            deep copy is converted.
        backend: the ``backend`` of the created fused modules.
        functional: also run the torch.fx pass over functional forwards.

    Returns:
        The converted model: ``model`` itself or its copy, or a ``torch.fx.GraphModule`` when
        the top-level module's own forward held a chain. Always use the return value.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not inplace:
        model = copy.deepcopy(model)
    stats = {"chains": 0, "fx_modules": 0}
    out = _walk(model, "", filter_fn, backend, functional, stats)
    return out


def unfuse(model: nn.Module, inplace: bool = False) -> nn.Module:
    """Replace every :class:`InterleavedGroupConv` in ``model`` by its plain modules
    (:meth:`InterleavedGroupConv.unfuse`); Parameters are shared with the fused modules when
    ``inplace=True`` and belong to a deep copy otherwise."""
    if not inplace:
        model = copy.deepcopy(model)
    if isinstance(model, InterleavedGroupConv):
        return model.unfuse()
    for name, child in list(model._modules.items()):
        if child is None:
            continue
        if isinstance(child, InterleavedGroupConv):
            setattr(model, name, child.unfuse())
        else:
            unfuse(child, inplace=True)
    return model
