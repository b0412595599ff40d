"""Bad input to the public API: the exception type, a message naming the argument / layer /
value, raised before any computation, and the process keeps working (a good call succeeds
after every error). Also autocast, which makes mixed dtypes legal."""

from __future__ import annotations

import re

import pytest
import torch

import igc_kernels as igc
from igc_test_utils import FUSED, case_maker

BACKENDS = ["reference", FUSED, "auto"]


def _good():
    """x (2, 8, 3, 3) -> layer 1: 2 groups, 8 -> 12 -> layer 2: 2 groups, 12 -> 6."""
    g = torch.Generator().manual_seed(0)
    return dict(
        x=torch.randn(2, 8, 3, 3, generator=g),
        weights=[torch.randn(12, 4, generator=g), torch.randn(6, 6, generator=g)],
        groups=[2, 2],
        permutations=None,
        biases=None,
    )


_case = case_maker(_good)


def _set(key, index, value):
    def change(args):
        lst = list(args[key])
        lst[index] = value
        return lst
    return change


BAD = {
    # name: (make args, exception type, message fragment (regex))
    "groups_zero": (_case(groups=[0, 2]), ValueError,
                    r"layer 1: groups must be a positive integer, got 0"),
    "groups_negative": (_case(groups=[2, -3]), ValueError,
                        r"layer 2: groups must be a positive integer, got -3"),
    "groups_not_int": (_case(groups=[2.0, 2]), TypeError, r"layer 1: groups must be an int"),
    "groups_not_dividing_input": (_case(groups=[3, 2]), ValueError,
                                  r"layer 1: in_channels C_0 = 8 .* divisible by groups = 3"),
    "groups_not_dividing_output": (
        _case(groups=[2, 4], weights=lambda a: [a["weights"][0], torch.randn(6, 3)]), ValueError,
        r"layer 2: out_channels C_2 = 6 .* divisible by groups = 4"),
    "weight_wrong_shape": (_case(weights=lambda a: [torch.randn(12, 3), a["weights"][1]]),
                           ValueError, r"x has 8 channels, but layer 1 expects C_0"),
    "weight_not_1x1": (_case(weights=lambda a: [torch.randn(12, 4, 3, 2), a["weights"][1]]),
                       ValueError, r"layer 1: weight has shape \(12, 4, 3, 2\)"),
    "weight_even_kernel": (_case(weights=lambda a: [torch.randn(12, 4, 2, 2), a["weights"][1]]),
                           ValueError, r"layer 1: weight has shape \(12, 4, 2, 2\): a spatial"),
    "weight_1d": (_case(weights=lambda a: [a["weights"][0], torch.randn(36)]), ValueError,
                  r"layer 2: weight has shape \(36,\)"),
    "weight_not_tensor": (_case(weights=lambda a: [a["weights"][0], [[1.0] * 6] * 6]), TypeError,
                          r"layer 2: weight must be a torch.Tensor"),
    "layers_do_not_chain": (_case(weights=lambda a: [a["weights"][0], torch.randn(6, 5)]),
                            ValueError,
                            r"layer 2: weight has shape \(6, 5\), expected \(C_2, C_1 / groups\) "
                            r"= \(6, 6\)"),
    "empty_layer_list": (_case(weights=[], groups=[]), ValueError, r"weights is empty"),
    "weights_not_a_list": (_case(weights=lambda a: a["weights"][0]), TypeError,
                           r"weights must be a list or tuple"),
    "fewer_groups": (_case(groups=[2]), ValueError, r"one entry per layer; got 2 weights, 1 groups"),
    "more_permutations": (_case(permutations=["interleave", None, None]), ValueError,
                          r"one entry per layer; got 2 weights, 2 groups, 3 permutations"),
    "fewer_biases": (_case(biases=[None]), ValueError,
                     r"one entry per layer; got 2 weights, 2 groups, 1 biases"),
    "perm_wrong_length": (_case(permutations=[torch.arange(11), None]), ValueError,
                          r"layer 1: permutation has shape \(11,\), expected .* C_1 = 12"),
    "perm_2d": (_case(permutations=[None, torch.arange(6).view(2, 3)]), ValueError,
                r"layer 2: permutation has shape \(2, 3\)"),
    "perm_out_of_range": (_case(permutations=[None, torch.tensor([0, 1, 2, 3, 4, 6])]),
                          ValueError, r"layer 2: permutation entries must lie in \[0, 6\), "
                                      r"got min 0 and max 6"),
    "perm_negative": (_case(permutations=[None, torch.tensor([0, 1, 2, 3, 4, -1])]),
                      ValueError, r"layer 2: permutation entries must lie in \[0, 6\)"),
    "perm_duplicates": (_case(permutations=[None, torch.tensor([0, 1, 2, 2, 4, 5])]),
                        ValueError, r"layer 2: permutation has duplicate entries \(2 appears 2"),
    "perm_float": (_case(permutations=[None, torch.arange(6.0)]), TypeError,
                   r"layer 2: permutation must be an integer tensor, got dtype torch.float32"),
    "perm_bool": (_case(permutations=[None, torch.ones(6, dtype=torch.bool)]), TypeError,
                  r"layer 2: permutation must be an integer tensor, got dtype torch.bool"),
    "perm_other_device": (_case(permutations=[torch.arange(12, device="meta"), None]),
                          ValueError, r"layer 1: permutation is on meta but x is on cpu"),
    "perm_unknown_string": (_case(permutations=["shuffle", None]), ValueError,
                            r"layer 1: unknown permutation 'shuffle'"),
    "perm_wrong_type": (_case(permutations=[None, 3]), TypeError,
                        r"layer 2: permutation must be None, 'interleave' or an index tensor"),
    "perm_list_of_floats": (_case(permutations=[None, [0.0, 1, 2, 3, 4, 5]]), TypeError,
                            r"layer 2: permutation given as a sequence must hold ints"),
    "bias_wrong_shape": (_case(biases=[None, torch.randn(7)]), ValueError,
                         r"layer 2: bias has shape \(7,\), expected \(6,\)"),
    "bias_2d": (_case(biases=[torch.randn(12, 1), None]), ValueError,
                r"layer 1: bias has shape \(12, 1\), expected \(12,\)"),
    "bias_dtype": (_case(biases=[torch.randn(12, dtype=torch.float64), None]), TypeError,
                   r"layer 1: bias has dtype torch.float64 but x has dtype torch.float32"),
    "bias_other_device": (_case(biases=[None, torch.randn(6, device="meta")]), ValueError,
                          r"layer 2: bias is on meta but x is on cpu"),
    "weight_dtype": (_case(weights=lambda a: [a["weights"][0], a["weights"][1].double()]),
                     TypeError,
                     r"layer 2: weight has dtype torch.float64 but x has dtype torch.float32"),
    "weight_other_device": (
        _case(weights=lambda a: [a["weights"][0], torch.randn(6, 6, device="meta")]), ValueError,
        r"layer 2: weight is on meta but x is on cpu"),
    "x_int64": (_case(x=lambda a: a["x"].long(), weights=lambda a: [w.long() for w in a["weights"]]),
                TypeError, r"x has dtype torch.int64; supported dtypes are"),
    "x_bool": (_case(x=lambda a: a["x"] > 0, weights=lambda a: [w > 0 for w in a["weights"]]),
               TypeError, r"x has dtype torch.bool"),
    "x_complex64": (_case(x=lambda a: a["x"].to(torch.complex64),
                          weights=lambda a: [w.to(torch.complex64) for w in a["weights"]]),
                    TypeError, r"x has dtype torch.complex64"),
    "x_1d": (_case(x=torch.randn(8)), ValueError, r"x must have shape \(N, C\).*got shape \(8,\)"),
    "x_0d": (_case(x=torch.tensor(1.0)), ValueError, r"x must have shape \(N, C\).*got shape \(\)"),
    "x_6d": (_case(x=torch.randn(1, 8, 1, 1, 1, 1)), ValueError, r"1 to 3 spatial dims"),
    "x_wrong_channels": (_case(x=torch.randn(2, 10, 3, 3)), ValueError,
                         r"layer 1: in_channels C_0 = 10 .* divisible by groups = 2|"
                         r"x has 10 channels"),
    "x_wrong_channels_divisible": (_case(x=torch.randn(2, 6, 3, 3)), ValueError,
                                   r"x has 6 channels, but layer 1 expects C_0 = "
                                   r"weight.shape\[1\] \* groups = 4 \* 2 = 8"),
    "x_not_tensor": (_case(x=[[1.0] * 8] * 2), TypeError, r"x must be a torch.Tensor"),
}


def _call(args, backend):
    return igc.interleaved_group_conv(args["x"], args["weights"], args["groups"],
                                      args["permutations"], args["biases"], backend=backend)


def _good_call_works(backend):
    y = _call(_good(), backend)
    assert y.shape == (2, 6, 3, 3) and bool(torch.isfinite(y).all())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", BAD.values(), ids=BAD.keys())
def test_bad_input(case, backend):
    make, exc, fragment = case
    with pytest.raises(exc, match=fragment):
        _call(make(), backend)
    _good_call_works(backend)


@pytest.mark.parametrize("case", ["perm_out_of_range", "perm_duplicates", "bias_wrong_shape",
                                  "layers_do_not_chain"])
def test_bad_input_reference_function(case):
    """igc_kernels.reference.interleaved_group_conv validates the same way."""
    make, exc, fragment = BAD[case]
    a = make()
    with pytest.raises(exc, match=fragment):
        igc.reference.interleaved_group_conv(a["x"], a["weights"], a["groups"],
                                             a["permutations"], a["biases"])
    _good_call_works("reference")


def test_permutation_edited_in_place_is_validated_again():
    """A permutation validated once and then edited in place is validated again."""
    args = _good()
    perm = torch.randperm(6)
    args["permutations"] = [None, perm]
    _call(args, FUSED)
    with torch.no_grad():
        perm[0] = perm[1]
    with pytest.raises(ValueError, match=r"layer 2: permutation has duplicate entries"):
        _call(args, FUSED)
    _good_call_works(FUSED)


def test_unknown_backend():
    with pytest.raises(ValueError, match=r"unknown backend 'gpu'; choose one of 'auto'"):
        _call(_good(), "gpu")
    _good_call_works("auto")


def _float64(args):
    args["x"] = args["x"].double()
    args["weights"] = [w.double() for w in args["weights"]]
    return args


def _wide(args, channels=2048, dtype=torch.float32):
    """One layer of ``channels`` groups of one channel: past the Triton backend's limit."""
    args["x"] = torch.randn(1, channels, 2, dtype=dtype)
    args["weights"] = [torch.randn(channels, 1, dtype=dtype)]
    args["groups"] = [channels]
    return args


@pytest.mark.parametrize("backend,make,reason", [
    ("cuda", _good, r"x is on cpu; this backend runs on cuda"),
    # CPU tensors run through Triton under TRITON_INTERPRET=1 (the suite sets it without a GPU);
    # float64 and more than 1024 channels are refused whatever the device
    ("triton", lambda: _float64(_good()), r"dtype torch.float64 is not supported"),
    ("triton", lambda: _wide(_good()), r"2048 channels exceeds"),
], ids=["cuda-device", "triton-dtype", "triton-channels"])
def test_backend_that_cannot_run(backend, make, reason):
    with pytest.raises(igc.BackendUnavailableError) as info:
        _call(make(), backend)
    msg = str(info.value)
    assert f"backend {backend!r} cannot run this input" in msg
    assert re.search(reason, msg), msg
    assert msg.count("\n  - ") >= 1, f"reasons are not listed: {msg}"
    assert isinstance(info.value, RuntimeError)
    _good_call_works("auto")


def test_backend_unavailable_lists_every_reason():
    """float64 and too many channels on triton: both reasons are listed."""
    with pytest.raises(igc.BackendUnavailableError) as info:
        _call(_wide(_good(), dtype=torch.float64), "triton")
    msg = str(info.value)
    assert "dtype torch.float64 is not supported" in msg, msg
    assert "2048 channels exceeds" in msg, msg
    assert msg.count("\n  - ") >= 2, msg


# ---------------------------------------------------------------------------------------------
# Autocast: mixed dtypes are legal inside, rejected outside
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_autocast_mixed_dtypes(backend):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 8, 3, 3, generator=g)  # float32
    ws = [torch.randn(12, 4, generator=g).bfloat16(), torch.randn(6, 6, generator=g)]  # mixed
    bs = [torch.randn(12, generator=g), None]
    with pytest.raises(TypeError, match=r"layer 1: weight has dtype torch.bfloat16 but x has "
                                        r"dtype torch.float32"):
        igc.interleaved_group_conv(x, ws, [2, 2], biases=bs, backend=backend)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = igc.interleaved_group_conv(x, ws, [2, 2], biases=bs, backend=backend)
    assert y.dtype == torch.bfloat16 and y.shape == (2, 6, 3, 3)
    # the same as running everything in bfloat16 explicitly
    y_bf16 = igc.interleaved_group_conv(x.bfloat16(), [w.bfloat16() for w in ws], [2, 2],
                                        biases=[bs[0].bfloat16(), None], backend=backend)
    assert torch.equal(y, y_bf16)


def test_autocast_gradients_reach_float32_leaves():
    x = torch.randn(2, 8, 3, 3, requires_grad=True)
    ws = [torch.randn(12, 4, requires_grad=True), torch.randn(6, 6, requires_grad=True)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = igc.interleaved_group_conv(x, ws, [2, 2], backend=FUSED)
    y.float().sum().backward()
    for t in [x, *ws]:
        assert t.grad is not None and t.grad.dtype == torch.float32 and t.grad.shape == t.shape
