"""ChainSpec: the IGCV2 design rules, structure queries and counts, validation."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

import igc_kernels as igc
from igc_kernels import ChainSpec


# ---------------------------------------------------------------------------------------------
# igcv2 / balanced
# ---------------------------------------------------------------------------------------------
def test_igcv2_64_8_is_complementary():
    s = ChainSpec.igcv2(64, 8)
    assert s.channels == (64, 64, 64) and s.groups == (8, 8)  # 2 layers of 8 groups of width 8
    assert s.is_complementary() and s.is_dense()
    assert bool((s.path_counts() == 1).all())


def test_igcv2_256_8_is_dense_not_complementary():
    s = ChainSpec.igcv2(256, 8)
    assert s.num_layers == 3 and s.groups == (32, 32, 32)
    assert s.is_dense()
    assert not s.is_complementary()
    assert int(s.path_counts().max()) > 1  # some output reaches some input by several paths


# (C, K, L): L = ceil(log_K C), i.e. the least L with K^L >= C, worked out by hand
IGCV2_DEPTHS = [(64, 8, 2), (256, 8, 3), (512, 8, 3), (8, 8, 1), (16, 4, 2), (48, 4, 3),
                (32, 2, 5), (27, 3, 3), (24, 2, 5), (1024, 32, 2), (1000, 10, 3)]


@pytest.mark.parametrize("C,K,L", IGCV2_DEPTHS)
def test_igcv2_layer_count(C, K, L):
    s = ChainSpec.igcv2(C, K)
    assert s.num_layers == L
    assert K ** L >= C and K ** (L - 1) < C
    assert s.channels == (C,) * (L + 1)
    assert all(m == K and n == K for m, n in s.group_shapes())
    assert s.is_dense()  # ceil(log_K C) layers of width K always connect everything
    assert s.is_complementary() == (K ** L == C)
    # default permutations: interleave after every layer but the last
    assert s.permutations == ("interleave",) * (L - 1) + (None,)


def test_igcv2_rejects_bad_arguments():
    with pytest.raises(ValueError, match="group_size = 3 must divide channels = 64"):
        ChainSpec.igcv2(64, 3)
    with pytest.raises(ValueError, match="positive ints"):
        ChainSpec.igcv2(0, 8)
    with pytest.raises(ValueError, match="positive ints"):
        ChainSpec.igcv2(64, 0)


@pytest.mark.parametrize("C,L", [(64, 1), (64, 2), (64, 3), (64, 6), (81, 4), (125, 3), (36, 2)])
def test_balanced_is_complementary_with_equal_widths(C, L):
    s = ChainSpec.balanced(C, L)
    K = round(C ** (1 / L))
    assert s.num_layers == L
    assert all(m == K and n == K for m, n in s.group_shapes())
    assert math.prod(n for _, n in s.group_shapes()) == C
    assert s.is_complementary()


def test_balanced_rejects_non_powers():
    with pytest.raises(ValueError, match="is not an L-th power"):
        ChainSpec.balanced(60, 2)


# ---------------------------------------------------------------------------------------------
# Balance condition, optimal depth
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("C,L,S", [(64, 2, 1), (64, 3, 9), (256, 4, 1), (100, 3, 9), (48, 5, 25)])
def test_balanced_group_sizes(C, L, S):
    ks = ChainSpec.balanced_group_sizes(C, L, spatial=S)
    assert len(ks) == L
    assert math.isclose(math.prod(ks), C, rel_tol=1e-12)  # complementary: prod K_l = C
    firsts = [S * ks[0]] + ks[1:]  # balance: S K_1 = K_2 = ... = K_L
    assert all(math.isclose(v, firsts[0], rel_tol=1e-12) for v in firsts)

    def params(k):  # C * (S K_1 + K_2 + ... + K_L)
        return C * (S * k[0] + sum(k[1:]))

    best = params(ks)
    assert math.isclose(best, ChainSpec.min_params(C, L, spatial=S), rel_tol=1e-12)
    # any other split with the same product has more parameters (AM-GM)
    gen = torch.Generator().manual_seed(C + L + S)
    for _ in range(20):
        f = torch.rand(L, generator=gen, dtype=torch.float64) + 0.5
        f = f / f.prod() ** (1.0 / L)  # product 1
        other = [k * float(v) for k, v in zip(ks, f)]
        assert math.isclose(math.prod(other), C, rel_tol=1e-9)
        assert params(other) >= best * (1 - 1e-12)


@pytest.mark.parametrize("C,S", [(8, 1), (64, 1), (256, 1), (1024, 1), (64, 9), (32, 25),
                                 (3, 1), (2048, 9)])
def test_optimal_depth_minimises_min_params(C, S):
    L = ChainSpec.optimal_depth(C, spatial=S)
    assert isinstance(L, int) and L >= 1
    costs = {d: ChainSpec.min_params(C, d, spatial=S) for d in range(1, 60)}
    assert costs[L] == min(costs.values())
    # the real optimum is ln(S C); the integer optimum is one of its neighbours
    assert abs(L - math.log(S * C)) < 1


def test_min_params_formula():
    # L C (S C)^(1/L) by hand: C = 64, L = 2, S = 1 -> 2 * 64 * 8
    assert ChainSpec.min_params(64, 2) == pytest.approx(2 * 64 * 8, rel=1e-12)
    assert ChainSpec.min_params(64, 3, spatial=1) == pytest.approx(3 * 64 * 4, rel=1e-12)
    # and it is what a balanced complementary chain really has
    assert ChainSpec.balanced(64, 3).num_params() == pytest.approx(ChainSpec.min_params(64, 3))


# ---------------------------------------------------------------------------------------------
# Counts
# ---------------------------------------------------------------------------------------------
COUNT_SPECS = {
    "nonsquare": ([12, 18, 8], [3, 2]),
    "igcv2": ([64, 64, 64], [8, 8]),
    "single": ([6, 10], [2]),
}


@pytest.mark.parametrize("channels,groups", COUNT_SPECS.values(), ids=COUNT_SPECS.keys())
def test_counts(channels, groups):
    s = ChainSpec(channels, groups)
    # by definition: layer l has C_l outputs, each reading n_l = C_{l-1} / G_l inputs
    per_layer = [channels[l + 1] * (channels[l] // g) for l, g in enumerate(groups)]
    assert s.num_params() == sum(per_layer)
    assert s.num_params(bias=True) == sum(per_layer) + sum(channels[1:])
    assert s.macs_per_position() == sum(per_layer)
    assert s.flops_per_position() == 2 * sum(per_layer)
    assert s.flops_per_position(bias=True) == 2 * sum(per_layer) + sum(channels[1:])
    # cross-checks: the module's parameter count, and the non-zeros of the block-diagonal W_l
    m = igc.InterleavedGroupConv(s, bias=True)
    assert sum(p.numel() for p in m.parameters()) == s.num_params(bias=True)
    ones = [torch.ones(c, k) for c, k in s.weight_shapes()]
    nnz = 0
    for l, (W, g) in enumerate(zip(ones, groups)):
        single = ChainSpec(channels[l:l + 2], [g], [None])
        nnz += int((single.dense_matrix([W]) != 0).sum())
    assert nnz == s.macs_per_position()


def test_example_counts_by_hand():
    s = ChainSpec([12, 18, 8], [3, 2])
    # layer 1: 18 outputs x 4 inputs = 72; layer 2: 8 outputs x 9 inputs = 72
    assert s.weight_shapes() == [(18, 4), (8, 9)]
    assert s.group_shapes() == [(6, 4), (4, 9)]
    assert s.num_params() == 144 and s.num_params(bias=True) == 144 + 26
    assert s.flops_per_position() == 288
    assert s.in_channels == 12 and s.out_channels == 8 and s.num_layers == 2


# ---------------------------------------------------------------------------------------------
# Structure
# ---------------------------------------------------------------------------------------------
def test_complementary_depends_on_permutations():
    assert ChainSpec([16, 16, 16], [4, 4]).is_complementary()  # interleave: K = 4, 4 * 4 = 16
    blocked = ChainSpec([16, 16, 16], [4, 4], [None, None])  # no shuffle: blocks stay separate
    assert not blocked.is_dense() and not blocked.is_complementary()
    # an explicit permutation equal to the shuffle is the same chain
    explicit = ChainSpec([16, 16, 16], [4, 4], [igc.interleave_index(16, 4), None])
    assert explicit == ChainSpec([16, 16, 16], [4, 4])
    assert explicit.is_complementary()


def test_dense_matrix_sparsity_matches_path_counts():
    s = ChainSpec([12, 12, 18, 6], [3, 2, 3], ["interleave", torch.randperm(18), None])
    gen = torch.Generator().manual_seed(0)
    ws = [torch.rand(c, k, generator=gen, dtype=torch.float64) + 0.5 for c, k in s.weight_shapes()]
    M = s.dense_matrix(ws)
    assert M.shape == (6, 12)
    # positive weights: an entry is non-zero exactly where a path exists
    assert torch.equal(M != 0, s.path_counts() > 0)
    # with all-one weights each entry counts the paths
    M1 = s.dense_matrix([torch.ones(c, k, dtype=torch.float64) for c, k in s.weight_shapes()])
    assert torch.equal(M1, s.path_counts())


def test_dense_matrix_accepts_conv_layout_and_rejects_wrong_shapes():
    s = ChainSpec([8, 8], [2])
    W = torch.randn(8, 4, dtype=torch.float64)
    assert torch.equal(s.dense_matrix([W]), s.dense_matrix([W.view(8, 4, 1, 1)]))
    with pytest.raises(ValueError, match=r"layer 1: weight has shape \(8, 4, 3, 3\)"):
        s.dense_matrix([torch.randn(8, 4, 3, 3)])
    with pytest.raises(ValueError, match="expected 1 weights, got 2"):
        s.dense_matrix([W, W])


def test_permutation_lists_are_accepted():
    s = ChainSpec([4, 4], [2], [[3, 2, 1, 0]])
    assert torch.equal(s.gather_indices()[0], torch.tensor([3, 2, 1, 0]))


# ---------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------
BAD_SPECS = {
    "no_layers": (([8], []), r"groups is empty"),
    "channels_length": (([8, 8], [2, 2]), r"channels must have len\(groups\) \+ 1 = 3 entries"),
    "channel_zero": (([8, 0], [2]), r"channels\[1\] \(C_1\) must be a positive int, got 0"),
    "channel_not_int": (([8, 8.0], [2]), r"channels\[1\] \(C_1\) must be a positive int"),
    "group_zero": (([8, 8], [0]), r"layer 1: groups must be a positive int, got 0"),
    "group_not_dividing_in": (([9, 12], [2]), r"layer 1: groups = 2 must divide C_0 = 9"),
    "group_not_dividing_out": (([8, 8, 9], [2, 2]),
                               r"layer 2: groups = 2 must divide C_1 = 8 and C_2 = 9"),
    "permutations_length": (([8, 8], [2], [None, None]),
                            r"permutations must have one entry per layer \(1\), got 2"),
    "perm_duplicate": (([4, 4], [2], [[0, 0, 1, 2]]), r"layer 1: permutation has duplicate"),
    "perm_out_of_range": (([4, 4], [2], [[0, 1, 2, 4]]), r"layer 1: permutation entries must lie"),
    "perm_wrong_length": (([4, 4], [2], [[0, 1, 2]]), r"layer 1: permutation has shape \(3,\)"),
    "perm_unknown_string": (([4, 4], [2], ["reverse"]), r"layer 1: unknown permutation 'reverse'"),
}


@pytest.mark.parametrize("args,fragment", BAD_SPECS.values(), ids=BAD_SPECS.keys())
def test_chainspec_validation(args, fragment):
    with pytest.raises(ValueError, match=fragment):
        ChainSpec(*args)
    assert ChainSpec([8, 8, 8], [2, 2]).is_dense()  # still works afterwards


def test_chainspec_float_permutation_is_type_error():
    with pytest.raises(TypeError, match=r"layer 1: permutation must be an integer tensor"):
        ChainSpec([4, 4], [2], [torch.arange(4.0)])


def test_chainspec_equality_and_repr():
    a = ChainSpec([8, 8, 8], [2, 4])
    assert a == ChainSpec([8, 8, 8], [2, 4], ["interleave", None])
    assert a != ChainSpec([8, 8, 8], [2, 4], [None, None])
    assert a != ChainSpec([8, 8, 8], [4, 2])
    r = repr(ChainSpec([8, 8], [2], [torch.arange(8)]))
    assert "channels=[8, 8]" in r and "groups=[2]" in r and "tensor(len=8)" in r


@pytest.mark.parametrize("C,K", list(itertools.product([16, 64], [2, 4])))
def test_igcv2_reference_equals_dense(C, K):
    """A spec's dense matrix is the operator: reference chain on tokens == M x."""
    s = ChainSpec.igcv2(C, K)
    gen = torch.Generator().manual_seed(C * K)
    ws = [torch.randn(c, k, generator=gen, dtype=torch.float64) / math.sqrt(k)
          for c, k in s.weight_shapes()]
    x = torch.randn(5, C, generator=gen, dtype=torch.float64)
    y = igc.reference.interleaved_group_conv(x, ws, list(s.groups), list(s.permutations))
    # float64, at most log2(C) = 6 layers of <= 4-term sums of O(1) values
    torch.testing.assert_close(y, x @ s.dense_matrix(ws).t(), rtol=1e-12, atol=1e-12)
