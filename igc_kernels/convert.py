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

from ._chain import interleave_index
from .modules import ChannelGather, InterleavedGroupConv, compose_ops, conv_problem

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
        try:
            return ("gather", m.index_values("index"))
        except ValueError:  # built from a meta tensor: no values to compose
            return None
    return None


def _composes(ops: list, start: int, stop: int) -> bool:
    """Whether ``ops[start:stop]`` is a chain (the one grammar: ``modules.compose_ops``)."""
    try:
        compose_ops(ops[start:stop], str)
        return True
    except ValueError:
        return False


def _split_runs(ops: list) -> list:
    """Maximal valid chains in a sequence of op tuples (None = something else).

    Returns ``(start, stop)`` index ranges into ``ops``; every range is a chain that
    ``InterleavedGroupConv.from_ops`` accepts (``compose_ops`` composes it) and that is worth
    fusing. From each convolution the run grows backwards over leading gathers / shuffles and
    forwards over convolutions and permutations while the ops still compose.
    """
    runs = []
    i, n = 0, len(ops)
    while i < n:
        if ops[i] is None or ops[i][0] != "conv":
            i += 1
            continue
        prev_stop = runs[-1][1] if runs else 0
        start = i
        while (start - 1 >= prev_stop and ops[start - 1] is not None
               and ops[start - 1][0] != "conv" and _composes(ops, start - 1, i + 1)):
            start -= 1
        k = i + 1
        while k < n and ops[k] is not None and _composes(ops, start, k + 1):
            k += 1
        convs = [op for op in ops[start:k] if op[0] == "conv"]
        grouped = any(op[3] > 1 for op in convs)
        if grouped and (len(convs) >= 2 or k - start > len(convs)):
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
        keys = [_module_keys(mods[t], names[t]) for t in range(start, stop)]
        fused = InterleavedGroupConv.from_ops(
            ops[start:stop], backend=backend,
            where=lambda t, s=start: f"{prefix}{names[s + t]}", keys=keys)
        setattr(seq, names[start], fused)
        for t in range(start + 1, stop):
            setattr(seq, names[t], nn.Identity())
        _install_checkpoint_hooks(seq)
        count += 1
    return count


def _module_keys(m: nn.Module, name: str):
    """The state-dict keys (relative to the parent) of a chain module's tensors."""
    if type(m) is nn.Conv2d:
        return (f"{name}.weight", f"{name}.bias" if m.bias is not None else None)
    if type(m) is ChannelGather:
        return f"{name}.index"
    return None


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
    try:
        if isinstance(module, nn.Sequential) and type(module).forward is nn.Sequential.forward:
            stats["chains"] += _convert_sequential(module, prefix, filter_fn, backend)
            return module
        if functional and (not _is_torch_module(module)
                           or isinstance(module, torch.fx.GraphModule)):
            new = _convert_fx(module, prefix, filter_fn, backend, stats)
            if new is not None:
                return new
    except (ValueError, TypeError, RuntimeError) as e:
        where = prefix[:-1] or "the model"
        raise type(e)(f"convert: in module {where!r} ({type(module).__name__}): {e}") from e
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


def _node_op(root: nn.Module, node, prefix: str, filter_fn: FilterFn, sd_keys: set):
    """``(op_tuple, data_input_node, keys)`` if ``node`` can join a chain, else None. The data
    input is always ``node.args[0]``; ``keys`` are the state-dict keys of the op's tensors in
    ``root`` (see ``InterleavedGroupConv.from_ops``)."""
    if node.op not in ("call_module", "call_function", "call_method") or not node.args:
        return None

    def key(a):
        if isinstance(a, torch.fx.Node) and a.op == "get_attr" and a.target in sd_keys:
            return a.target
        return None

    if node.op == "call_module":
        m = _get_attr(root, node.target)
        if len(node.args) != 1 or node.kwargs:
            return None
        op = _module_op(m)
        if op is None or (filter_fn is not None and not filter_fn(m, prefix + node.target)):
            return None
        return op, node.args[0], _module_keys(m, node.target)
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
        return ("conv", w, b, groups), node.args[0], (key(w_node), key(b_arg))
    if node.op == "call_function" and node.target in _SHUFFLE_FNS:
        g = _arg(node, 1, "groups", None)
        if isinstance(g, int) and g > 0 and len(node.args) + len(node.kwargs) == 2:
            return ("shuffle", g), node.args[0], None
        return None
    idx_node = None
    if (node.op == "call_function" and node.target is torch.index_select) or (
            node.op == "call_method" and node.target == "index_select"):
        if _arg(node, 1, "dim", None) == 1:
            idx_node = _arg(node, 2, "index", None)
    elif node.op == "call_function" and node.target is operator.getitem and len(node.args) == 2:
        k = node.args[1]
        if (isinstance(k, tuple) and len(k) == 2 and k[0] == slice(None)
                and isinstance(k[1], torch.fx.Node)):
            idx_node = k[1]
    if idx_node is not None:
        idx = _const_tensor(root, idx_node)
        if (idx is not None and idx.dim() == 1 and idx.dtype in (torch.int64, torch.int32)
                and idx.device.type != "meta"):
            return ("gather", idx), node.args[0], key(idx_node)
    return None


def _convert_fx(module: nn.Module, prefix: str, filter_fn: FilterFn, backend: str,
                stats: dict) -> Optional[nn.Module]:
    try:
        graph = _ChildrenAsLeaves().trace(module)
    except Exception:  # not symbolically traceable (data-dependent control flow, ...): skip
        return None
    if not _traces_alike(module, graph):
        return None
    sd_keys = set(module.state_dict(keep_vars=True).keys())
    called_before = {n.target for n in graph.nodes if n.op == "call_module"}
    info = {}
    for node in graph.nodes:
        r = _node_op(module, node, prefix, filter_fn, sd_keys)
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
                where=lambda t, run=run: f"node {run[t].name} ({run[t].format_node()})",
                keys=[info[n][2] for n in run])
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
    return _rewrite_forward(module, graph, new_modules, called_before)


def _traces_alike(module: nn.Module, graph) -> bool:
    """Whether the module traces to the same code in training and in eval mode (a forward that
    reads ``self.training`` would be frozen in one mode by the traced graph: not converted)."""
    training = module.training
    try:
        module.train(not training)
        other = _ChildrenAsLeaves().trace(module)
    except Exception:
        return False
    finally:
        module.train(training)
    return other.python_code("self").src == graph.python_code("self").src


def _rewrite_forward(module: nn.Module, graph, new_modules: dict, called_before: set
                     ) -> nn.Module:
    """Give ``module`` the traced ``graph`` as its forward, keeping the object, its class (the
    new class derives from it, same name), attributes and methods: the fused modules are added
    as children, the children whose calls were fused are removed (their parameters live on in
    the fused modules), and a state-dict translation keeps original checkpoints loading."""
    root = {}
    used = set()
    for node in graph.nodes:
        if node.op in ("call_module", "get_attr"):
            used.add(node.target.split(".")[0])
            root[node.target] = new_modules[node.target] if node.target in new_modules \
                else _get_attr(module, node.target)
    gm = torch.fx.GraphModule(root, graph, class_name=type(module).__name__)
    for name, fused in new_modules.items():
        module.add_module(name, fused)
    for name in list(module._modules):
        if name in called_before and name not in used:
            delattr(module, name)  # its calls were fused into a chain
    for target in root:  # constants the tracer created (tensor literals of the forward)
        if not _has_attr(module, target):
            setattr(module, target, getattr(gm, target))
    cls = type(module)
    base = getattr(cls, "_igc_converted_from", cls)
    new_cls = type(base.__name__, (base,), {
        "forward": type(gm).forward, "__module__": base.__module__,
        "__qualname__": base.__qualname__, "_igc_converted_from": base,
        "_igc_code": gm.code,
    })
    module.__class__ = new_cls
    _install_checkpoint_hooks(module)
    return module


def _has_attr(root: nn.Module, target: str) -> bool:
    try:
        _get_attr(root, target)
        return True
    except AttributeError:
        return False


# ---------------------------------------------------------------------------------------------
# Checkpoints: converted models save and load the original model's state-dict keys
# ---------------------------------------------------------------------------------------------
def _install_checkpoint_hooks(parent: nn.Module) -> None:
    """State-dict hooks on the parent of fused modules made by ``convert``: ``state_dict()``
    writes the original model's keys (the chain modules' weights, biases and index buffers)
    instead of the fused modules' own, and ``load_state_dict`` accepts those keys (the fused
    modules' own keys still load as they are)."""
    if getattr(parent, "_igc_checkpoint_hooks", False):
        return
    parent.register_state_dict_post_hook(_save_original_keys)
    parent.register_load_state_dict_pre_hook(_load_original_keys)
    parent._igc_checkpoint_hooks = True


def _fused_children(parent: nn.Module):
    for name, child in parent._modules.items():
        if isinstance(child, InterleavedGroupConv) and getattr(child, "_source_keys", None):
            yield name, child


def _save_original_keys(parent, state_dict, prefix, local_metadata) -> None:
    for cname, child in _fused_children(parent):
        p = f"{prefix}{cname}."
        own = {k[len(p):]: state_dict.pop(k) for k in list(state_dict) if k.startswith(p)}
        gathers = iter(child.source_index_values())
        for (kind, arg), keys in zip(child._source_ops, child._source_keys):
            if kind == "conv":
                wkey, bkey = keys
                if wkey is not None and f"weights.{arg}" in own:
                    state_dict[prefix + wkey] = own[f"weights.{arg}"]
                if bkey is not None and f"biases.{arg}" in own:
                    state_dict[prefix + bkey] = own[f"biases.{arg}"]
            elif kind == "gather":
                values = next(gathers)
                if keys is not None:
                    buf = getattr(child, arg)
                    state_dict[prefix + keys] = buf.detach() if buf.device.type == "meta" \
                        else values.to(buf.device)


def _load_original_keys(parent, state_dict, prefix, local_metadata, strict, missing_keys,
                        unexpected_keys, error_msgs) -> None:
    for cname, child in _fused_children(parent):
        p = f"{prefix}{cname}."
        if f"{p}weights.0" in state_dict:
            continue  # the fused module's own keys: nothing to translate
        gathers, loaded = [], False
        values = iter(child.source_index_values())
        for (kind, arg), keys in zip(child._source_ops, child._source_keys):
            if kind == "conv":
                for key, own in zip(keys, (f"weights.{arg}", f"biases.{arg}")):
                    if key is not None and prefix + key in state_dict:
                        state_dict[p + own] = _take(parent, state_dict, prefix, key)
            elif kind == "gather":
                current = next(values)
                if keys is not None and prefix + keys in state_dict:
                    v = _take(parent, state_dict, prefix, keys)
                    gathers.append(v.detach().to("cpu", torch.int64))
                    loaded = True
                else:
                    gathers.append(current)
        try:
            input_index, perms = child.recompose(gathers) if loaded else (None, None)
            entries = _index_entries(child, input_index, perms) if loaded else \
                {n: getattr(child, n) for n in child._index_host
                 if not n.startswith("source_index_") and getattr(child, n) is not None}
        except ValueError as e:
            error_msgs.append(f"{p[:-1]}: the checkpoint's index values do not give this "
                              f"converted chain ({e})")
            continue
        for n, v in entries.items():
            state_dict[p + n] = v
        if loaded:
            with torch.no_grad():
                for (kind, arg), g in zip([o for o in child._source_ops if o[0] == "gather"],
                                          gathers):
                    getattr(child, arg).copy_(g)
                    child._index_host[arg] = g.clone()


def _take(parent: nn.Module, state_dict: dict, prefix: str, key: str):
    """The entry ``prefix + key``: removed from ``state_dict`` when the converted module no
    longer has that tensor (it belonged to a fused child), left for the parent's own loading
    when it still does (a parameter or buffer of the module itself, shared with the fused
    module)."""
    if _has_attr(parent, key):
        return state_dict[prefix + key]
    return state_dict.pop(prefix + key)


def _index_entries(child: InterleavedGroupConv, input_index, perms) -> dict:
    """The fused module's index buffers for a recomposed chain; raises ValueError if the
    recomposed chain has another structure than the module's."""
    out = {}
    if (input_index is None) != (child.input_index is None):
        raise ValueError("the input index appears or disappears")
    if input_index is not None:
        out["input_index"] = input_index
    spec = child.spec
    for l, (name, p) in enumerate(zip(child._perm_names, perms)):
        C, G = spec.channels[l + 1], spec.groups[l]
        full = (torch.arange(C) if p is None else interleave_index(C, G) if p == "interleave"
                else p)
        if name is None or name == "interleave":
            mine = torch.arange(C) if name is None else interleave_index(C, G)
            if not torch.equal(full, mine):
                raise ValueError(f"layer {l + 1}'s permutation changes kind")
        else:
            out[name] = full
    return out


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
