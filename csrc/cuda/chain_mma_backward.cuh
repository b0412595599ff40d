// Tensor-core backward of the chain for float16 / bfloat16 (sm_80 and newer; float32 opt-in, in
// the forward's three or two bfloat16 planes: MmaF32x3, MmaF32x2, with the kernel below): the
// same contract as chain_backward_kernel (chain_kernels.cuh: dx, dW, db, the output mask, an
// input index with repeats, deterministic weight and bias gradients), built from the
// tensor-core forward's pieces (chain_mma.cuh: swizzled [channel][TP] 16-bit tiles, ldmatrix /
// movmatrix / mma.sync).
//
// Tile. A CTA takes TP = 16 * MT positions and keeps in shared memory, as 16-bit swizzled tiles:
// the x tile (C_0 rows, gathered by the input index), every intermediate u_1 .. u_{L-1}
// ("store-all"; the planner refuses chains whose intermediates do not fit, and the launcher
// then runs the CUDA-core backward), the dy tile (C_L rows), one row of zeros and the position
// offsets of x, dy and dx. Where it gives a larger tile or two CTAs per SM instead of one, and
// L >= 2, x and dy share one tile of max(C_0, C_L) rows ("reload x", MmaPlan::reload_x): dy is
// loaded once the recompute has read x, and x again (from L2, read a moment before) for layer
// 1's weight gradient, when dy is dead; IGCV2(512, K) then takes 32 positions instead of 16.
// The gradients need no tiles of their own: du_l is written over u_l once layer l's weight
// gradient has read it (below). Intermediates and gradients are rounded to
// the storage dtype between layers, as the unfused chain in that dtype rounds every layer's
// output and every gradient (MmaF32x3: split exactly into planes, so they stay fp32 values;
// MmaF32x2: to about 16 significant bits, chain_mma.cuh);
// products accumulate in fp32.
//
// Per tile: load x and dy (dy channel j goes to row gather_{L-1}[j]: du_L in natural output
// order), recompute u_1 .. u_{L-1} with the forward's mma_layer (every item, here too, looks
// its rows' swizzled starts up in the row tables), then for l = L-1 .. 0:
// - db_l[o] += sum over the tile's positions of du[o] (fp32, positions in order; a thread per o);
// - dW_l[g][o][i] += sum_p du[g m + o][p] h_l[in_row(g n + i)][p]: mma.sync m16n8k16 with
//   K = positions. Both operands are channel-major rows of 16-bit tiles, read by ldmatrix
//   without .trans: a row of the tile is a row of A (16 channels of the wider side of the group,
//   n or m) or a column of B (16 channels of the other side, two 8-wide products). A warp item
//   is (group, block of 16, block of 16) with MT k-steps; rows beyond the group read the zero
//   row. Groups of at most 8 outputs and 8 inputs go two to an item (A: the outputs of both,
//   B: the inputs of each, one product each, the cross-group halves discarded). Every kept dW
//   element is the dot product of one du row and one h row of its own group, so a non-finite
//   value cannot reach another group's gradients. The fp32 results are added to the CTA's
//   private row of the partial buffer (each element owned by one lane; no atomics);
// - (a barrier: h_l is dead) dh_l = W_l^T du_l with the forward's mma_layer on W_l^T (fragments
//   packed per call by mma_prepare_kernel): A = du by ldmatrix.trans from the
//   natural-order gradient, and output j (input j of layer l) stored to row gather_{l-1}[j] of
//   the tile that held u_l, i.e. du_l in natural order (the tile keeps its swizzle).
//   gather_{l-1} is a permutation, so every row receives exactly one output: the inverse
//   permutation of the gradient is a pure re-addressing of the epilogue's stores. For l = 0 the
//   output goes to the x tile's rows.
// Then dx: channel c of dx is row c of dh_0 (in the x tile), or with an input index the fp32 sum
// of the rows j with input_index[j] == c (a CSR list built by the launcher, in increasing j).
// A second kernel sums the per-CTA rows in CTA order (fp32) and rounds once: the weight and bias
// gradients are bitwise reproducible for a given device (grid) and problem.
//
// Bytes: x and dy read once, dx written once, plus the partial rows (num_w fp32 per CTA and
// tile added by reductions in L2, num_b read and written: L2 traffic). FLOPs on tensor cores:
// the forward recompute (every layer but the last), dh (every layer; the first only when dx
// is wanted) and dW, each padded to the mma shapes. The tile loads and stores are the
// forward's, inlined (called, they left the kernel's state across the calls in spilled
// registers).
#pragma once

#include "chain_mma.cuh"

namespace igc {
namespace cuda {

// ldmatrix without .trans (chain_mma.cuh): lane l receives elements (row l / 4, columns
// 2 (l % 4) + {0, 1}) of each matrix.
template <int NM>
__device__ __forceinline__ void ldmatrix_rows(uint32_t* r, const uint16_t* base, int elem) {
  ldmatrix<NM, false>(r, base, elem);
}

template <class Fmt>
__device__ __forceinline__ float mma_to_float(uint32_t v16) {
  return mma_bits_to_float(v16, Fmt::is_bf16);
}

// out[0] += a (and out[1] += b, 8-byte aligned) in the CTA's fp32 gradient row as reductions
// in L2 (red.add; a pair on sm_90: one 8-byte red.v2): nothing comes back to the SM, so an item
// neither waits for an L2 round trip nor issues the read and the adds, and the row crosses to
// L2 once per tile instead of twice. Each element has one owning lane, whose reductions on one
// address take effect in program order (PTX memory model: coherence follows causality order,
// which includes program order), so the sums are those of the read-add-write, in the same
// order. One difference: red.add.f32 on global memory flushes subnormal operands and results
// to zero (PTX ISA; its .noftz needs PTX 9.4), so partial sums below 2^-126 count as 0.
// ok: whether to add at all (a predicate; ptxas still branches around each predicated
// reduction, a BSSY / BSYNC pair per value, so the item loops whose values all exist pass none).
__device__ __forceinline__ void red_add_f32(float* out, float a, bool ok = true) {
#ifdef IGC_EMULATE
  if (ok) igc_emu::red_add_f32(out, a);
#elif defined(__CUDA_ARCH__)
  asm volatile(
      "{\n .reg .pred p;\n setp.ne.u32 p, %2, 0;\n @p red.global.add.f32 [%0], %1;\n}\n"
      :
      : "l"(__cvta_generic_to_global(out)), "f"(a), "r"(static_cast<unsigned>(ok)));
#else
  (void)out;
  (void)a;
  (void)ok;
  __trap();
#endif
}
__device__ __forceinline__ void red_add_f32x2(float* out, float a, float b) {
#ifdef IGC_EMULATE
  igc_emu::check_aligned8(out);
  igc_emu::red_add_f32(out, a);
  igc_emu::red_add_f32(out + 1, b);
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("red.global.add.v2.f32 [%0], {%1, %2};\n"
               :
               : "l"(__cvta_generic_to_global(out)), "f"(a), "f"(b));
#else
  red_add_f32(out, a);
  red_add_f32(out + 1, b);
#endif
}

// The transposed chain: layer l of the result is W_l^T (n and m swapped, no bias), fragments
// packed by mma_prepare_kernel.
inline MmaParams make_mma_transposed_params(const HostChain& h, const int32_t* table,
                                            const uint2* frag) {
  MmaParams mp;
  mp.c = make_params<float>(h, static_cast<const float*>(nullptr), nullptr, table);
  mp.frag = frag;
  mp.elem = mp.elem_out = nullptr;
  mp.tile_rows[0] = mp.tile_rows[1] = 0;  // (the forward's)
  int64_t off = 0;
  for (int l = 0; l < kMaxLayers; ++l) {
    MmaLayer& ml = mp.layer[l];
    if (l >= h.L) {
      ml = MmaLayer{0, 0, 0, off};
      continue;
    }
    LayerDesc& d = mp.c.layer[l];
    std::swap(d.cin, d.cout);
    std::swap(d.n, d.m);
    d.has_bias = 0;
    d.b_off = -1;
    ml.nblk = (d.m + 7) / 8;
    ml.k8 = d.n <= 8 ? 1 : 0;
    ml.ksteps = ml.k8 ? 1 : (d.n + 15) / 16;
    ml.f_off = off;
    off += static_cast<int64_t>(d.groups) * ml.nblk * ml.ksteps * 32;
  }
  mp.num_frag = off;
  return mp;
}

// ---------------------------------------------------------------------------------------------
// Weight and bias gradients of one layer over one tile
// ---------------------------------------------------------------------------------------------
// A dW work item's products over the tile's MT k-steps: A (16 rows) and B (two 8-row blocks)
// by ldmatrix x4 from this lane's rows in the tiles at pa / pb (ea / eb: the rows' elements,
// mma_elem(row, 0); a_t / b_t its position offset: chunk 16 ks + a_t at element ea ^ (16 ks +
// a_t)), acc[k] += A B_k. The loop is unrolled kUnroll times: fully
// unrolled, the item's k-steps push the kernel past 128 registers (spills).
// MmaF32x3 / MmaF32x2: the planes of each row ps elements apart, loaded all, six / three
// products per HMMA above.
template <class Fmt, int MT, int kUnroll>
__device__ __forceinline__ void mma_dw_item(float (&acc)[2][4], const uint16_t* pa, int a_t,
                                            int ea, const uint16_t* pb, int b_t, int eb,
                                            int ps) {
  constexpr int NP = Fmt::kPlanes;
#pragma unroll
  for (int k = 0; k < 2; ++k)
#pragma unroll
    for (int q = 0; q < 4; ++q) acc[k][q] = 0.0f;
#pragma unroll kUnroll
  for (int ks = 0; ks < MT; ++ks) {
    // every lane executes both ldmatrix and both mma (.aligned); padding lanes read zeros
    uint32_t a[NP][4], b[NP][4];
#pragma unroll
    for (int k = 0; k < NP; ++k) {
      ldmatrix_rows<4>(a[k], pa + k * ps, (16 * ks + a_t) ^ ea);
      ldmatrix_rows<4>(b[k], pb + k * ps, (16 * ks + b_t) ^ eb);
    }
    mma_sync_planes<Fmt, 16, 4, 4>(acc[0], a[0], b[0], acc[0]);
    mma_sync_planes<Fmt, 16, 4, 4>(acc[1], a[0], b[0] + 2, acc[1]);
  }
}

// pw[(g m + o) n + i] += sum_t du[g m + o][t] * h[h_row(g n + i)][t] over the TP positions; du:
// the natural-order gradient tile, h: the layer's input tile; du_elem / h_elem: their rows'
// elements (mma_prepare_kernel: natural order; the layer's input rows).
// A warp item is a 16 x 16 block of a group's dW (A: 16 rows of the wider side, B: two 8-row
// blocks of the other, one ldmatrix x4 each per k-step, two HMMAs): the item's row addresses,
// output offsets and loop step serve 2 HMMAs per k-step instead of 1 (16 x 8 items).
// kFullBlocks: every 16 x 16 block full, B's neighbours adjacent (stride_b 1) and pw 8-byte
// aligned: the row updates as float2 pairs without bounds checks (mma_weight_grads decides).
template <class Fmt, int MT, bool kFullBlocks>
__device__ __forceinline__ void mma_weight_grad_items(const LayerDesc d, const uint16_t* du,
                                                      const int32_t* __restrict__ du_elem,
                                                      const uint16_t* h,
                                                      const int32_t* __restrict__ h_elem,
                                                      float* __restrict__ pw,
                                                      const uint16_t* zero, int ps) {
  constexpr int kWarps = kThreads / 32;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int gid = lane >> 2, tig = lane & 3;
  // A (16 rows per block) is the wider side of the group, B (two blocks of 8) the other
  const bool swap = d.n > d.m;
  const int ca = swap ? d.n : d.m, cb = swap ? d.m : d.n;
  const int na = (ca + 15) / 16, nb = (cb + 15) / 16;
  const int items = d.groups * na * nb;
  // ldmatrix x4, lanes 8 j .. 8 j + 7: A: rows 8 (j % 2) + 0..7 at positions 8 (j / 2);
  // B: rows 8 (j / 2) + 0..7 at positions 8 (j % 2), so b[0..1] is B's first 8-row block and
  // b[2..3] its second
  const int a_r = ((lane >> 3) & 1) * 8 + (lane & 7), a_t = (lane >> 4) * 8;
  const int b_r = (lane >> 4) * 8 + (lane & 7), b_t = ((lane >> 3) & 1) * 8;
  const uint16_t* ta = swap ? h : du;
  const uint16_t* tb = swap ? du : h;
  const int32_t* elem_a = swap ? h_elem : du_elem;
  const int32_t* elem_b = swap ? du_elem : h_elem;
  // dW element (A row r_a, B row r_b) of group g: pw[g m n + r_a * stride_a + r_b * stride_b]
  const int stride_a = swap ? 1 : d.n, stride_b = swap ? d.n : 1;
  // item = (g * na + ia) * nb + ib, stepped by kWarps with carries (no division per item)
  int g = warp / (na * nb), ia = (warp / nb) % na, ib = warp % nb;
  const int sg = kWarps / (na * nb), sa_ = (kWarps / nb) % na, sb_ = kWarps % nb;
  for (int item = warp; item < items; item += kWarps) {
    // this lane's ldmatrix rows: the tile and the row's element (the zero row: element 0), so
    // a k-step's address is one XOR (mma_elem)
    const int ra = ia * 16 + a_r, rb = ib * 16 + b_r;
    const uint16_t* pa = zero;
    const uint16_t* pb = zero;
    int ea = 0, eb = 0;
    if (ra < ca) {
      ea = elem_a[g * ca + ra];
      pa = ta;
    }
    if (rb < cb) {
      eb = elem_b[g * cb + rb];
      pb = tb;
    }
    float acc[2][4];
    // rolled: two k-steps per iteration cost the 16 x 16 items more than they save (sm_90 SASS,
    // tools/gpu_static.py: IGCV2(256, 16) backward predicted 81% -> 77% of copy bandwidth)
    mma_dw_item<Fmt, MT, 1>(acc, pa, a_t, ea, pb, b_t, eb, ps);
    // acc[k][q]: A row 16 ia + gid + 8 (q / 2), B row 16 ib + 8 k + 2 tig + q % 2; 32-bit
    // offsets within the layer (its weights number far less than 2^31: its channels fit shared
    // memory). The values are added to the CTA's fp32 row in L2 (red_add_f32x2, red_add_f32):
    // the row crosses to L2 once per tile, not read and written, and nothing returns to the SM
    // (float32 in three planes had read and written it: tools/gpu_static.py predicted IGCV2(256,
    // 8) / (256, 16) 55% / 64% of copy bandwidth that way, 61% / 77% with the reductions).
    const int r_a = ia * 16 + gid, r_b = ib * 16 + 2 * tig;
    float* out = pw + ((g * d.m * d.n) + r_a * stride_a + r_b * stride_b);
    if (kFullBlocks) {  // (q, q + 1) adjacent and 8-byte aligned: 4 pairs
      float* o1 = out + 8 * stride_a;  // per lane, no bounds; A row r_a + 8; B rows +0, +8
      red_add_f32x2(out, acc[0][0], acc[0][1]);
      red_add_f32x2(out + 8, acc[1][0], acc[1][1]);
      red_add_f32x2(o1, acc[0][2], acc[0][3]);
      red_add_f32x2(o1 + 8, acc[1][2], acc[1][3]);
    } else {  // the values within the group, one reduction each
#pragma unroll
      for (int k = 0; k < 2; ++k) {
#pragma unroll
        for (int q = 0; q < 4; ++q) {
          red_add_f32(out + (8 * (q >> 1) * stride_a + (8 * k + (q & 1)) * stride_b),
                      acc[k][q], r_a + 8 * (q >> 1) < ca && r_b + 8 * k + (q & 1) < cb);
        }
      }
    }
    ib += sb_;
    if (ib >= nb) {
      ib -= nb;
      ++ia;
    }
    ia += sa_;
    if (ia >= na) {
      ia -= na;
      ++g;
    }
    g += sg;
  }
}

// Full 16 x 16 blocks (the float2 contract of mma_weight_grad_items' kFullBlocks) whose B side
// has an even number of them (IGCV2 with K = 32): an item is a 16 x 32 block, A against two B
// blocks, so each k-step's A fragment, and the item's row look-ups, offsets and loop step,
// serve four HMMAs instead of two.
template <class Fmt, int MT>
__device__ __forceinline__ void mma_weight_grad_wide_items(const LayerDesc d, const uint16_t* du,
                                                           const int32_t* __restrict__ du_elem,
                                                           const uint16_t* h,
                                                           const int32_t* __restrict__ h_elem,
                                                           float* __restrict__ pw, int ps) {
  constexpr int NP = Fmt::kPlanes;
  constexpr int kWarps = kThreads / 32;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int gid = lane >> 2, tig = lane & 3;
  // A: the group's m outputs (du), B: its n inputs (h); n <= m, m a multiple of 16, n of 32
  const int na = d.m / 16, nb2 = d.n / 32;  // A blocks, pairs of B blocks
  const int items = d.groups * na * nb2;
  const int a_r = ((lane >> 3) & 1) * 8 + (lane & 7), a_t = (lane >> 4) * 8;
  const int b_r = (lane >> 4) * 8 + (lane & 7), b_t = ((lane >> 3) & 1) * 8;
  int g = warp / (na * nb2), ia = (warp / nb2) % na, ib = warp % nb2;
  const int sg = kWarps / (na * nb2), sa_ = (kWarps / nb2) % na, sb_ = kWarps % nb2;
  for (int item = warp; item < items; item += kWarps) {
    // this lane's rows' elements: a k-step's chunk is one XOR away (mma_elem)
    const int ea = du_elem[g * d.m + ia * 16 + a_r];
    const int eb0 = h_elem[g * d.n + ib * 32 + b_r];
    const int eb1 = h_elem[g * d.n + ib * 32 + 16 + b_r];
    float acc[4][4];
#pragma unroll
    for (int k = 0; k < 4; ++k)
#pragma unroll
      for (int q = 0; q < 4; ++q) acc[k][q] = 0.0f;
#pragma unroll 1
    for (int ks = 0; ks < MT; ++ks) {
      uint32_t a[NP][4], b0[NP][4], b1[NP][4];
#pragma unroll
      for (int k = 0; k < NP; ++k) {
        ldmatrix_rows<4>(a[k], du + k * ps, (16 * ks + a_t) ^ ea);
        ldmatrix_rows<4>(b0[k], h + k * ps, (16 * ks + b_t) ^ eb0);
        ldmatrix_rows<4>(b1[k], h + k * ps, (16 * ks + b_t) ^ eb1);
      }
      mma_sync_planes<Fmt, 16, 4, 4>(acc[0], a[0], b0[0], acc[0]);
      mma_sync_planes<Fmt, 16, 4, 4>(acc[1], a[0], b0[0] + 2, acc[1]);
      mma_sync_planes<Fmt, 16, 4, 4>(acc[2], a[0], b1[0], acc[2]);
      mma_sync_planes<Fmt, 16, 4, 4>(acc[3], a[0], b1[0] + 2, acc[3]);
    }
    // acc[k][q]: A row 16 ia + gid + 8 (q / 2), B row 32 ib + 8 k + 2 tig + q % 2: per A row,
    // four pairs 8 apart, added in L2 (red_add_f32x2)
    float* out = pw + (g * d.m * d.n + (ia * 16 + gid) * d.n + ib * 32 + 2 * tig);
    float* o1 = out + 8 * d.n;  // A row r_a + 8
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      red_add_f32x2(out + 8 * k, acc[k][0], acc[k][1]);
      red_add_f32x2(o1 + 8 * k, acc[k][2], acc[k][3]);
    }
    ib += sb_;
    if (ib >= nb2) {
      ib -= nb2;
      ++ia;
    }
    ia += sa_;
    if (ia >= na) {
      ia -= na;
      ++g;
    }
    g += sg;
  }
}

// The weight gradients of a layer (above): the float2 item loop where every 16 x 16 block is
// full, the group's outputs are A (n <= m: B's neighbours adjacent) and pw is 8-byte aligned,
// else the general one. Two loops rather than a branch per item: each keeps its own registers.
// The 16 x 32 items (mma_weight_grad_wide_items) with one and two planes: with three, their
// nine operand fragments per k-step took the 32-position float32 kernel past 128 registers.
template <class Fmt, int MT>
__device__ __forceinline__ void mma_weight_grads(const LayerDesc d, const uint16_t* du,
                                                 const int32_t* __restrict__ du_elem,
                                                 const uint16_t* h,
                                                 const int32_t* __restrict__ h_elem,
                                                 float* __restrict__ pw, const uint16_t* zero,
                                                 int ps) {
  if (Fmt::kPlanes <= 2 && d.n <= d.m && d.n % 32 == 0 && d.m % 16 == 0 &&
      (reinterpret_cast<uintptr_t>(pw) & 7) == 0)
    mma_weight_grad_wide_items<Fmt, MT>(d, du, du_elem, h, h_elem, pw, ps);
  else if (d.n <= d.m && d.n % 16 == 0 && d.m % 16 == 0 &&
           (reinterpret_cast<uintptr_t>(pw) & 7) == 0)
    mma_weight_grad_items<Fmt, MT, true>(d, du, du_elem, h, h_elem, pw, zero, ps);
  else
    mma_weight_grad_items<Fmt, MT, false>(d, du, du_elem, h, h_elem, pw, zero, ps);
}

// The weight gradients of a layer whose groups have at most 8 outputs and 8 inputs (same
// contract as mma_weight_grads): an item takes two groups g, g + 1. A's 16 rows are the outputs
// of g (rows 0..7) and of g + 1 (rows 8..15); B's two 8-row blocks are the inputs of g and of
// g + 1, one product each. Every dW element kept is the dot product of one output row and one
// input row of the same group: the other half of each product (outputs of one group against
// inputs of the other) is discarded, so no value crosses groups. One ldmatrix x4 per operand
// and two HMMAs per k-step serve two groups (a 16 x 8 block per group wastes half its rows).
template <class Fmt, int MT>
__device__ __forceinline__ void mma_weight_grads_pairs(const LayerDesc d, const uint16_t* du,
                                                       const int32_t* __restrict__ du_elem,
                                                       const uint16_t* h,
                                                       const int32_t* __restrict__ h_elem,
                                                       float* __restrict__ pw,
                                                       const uint16_t* zero, int ps) {
  constexpr int kWarps = kThreads / 32;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int gid = lane >> 2, tig = lane & 3;
  // ldmatrix x4, lane -> (group of the pair, row, positions): A: matrices (g, t 0..7),
  // (g + 1, t 0..7), (g, t 8..15), (g + 1, t 8..15); B: (g, t 0..7), (g, t 8..15),
  // (g + 1, t 0..7), (g + 1, t 8..15)
  const int a_g = (lane >> 3) & 1, a_t = (lane >> 4) * 8;
  const int b_g = lane >> 4, b_t = ((lane >> 3) & 1) * 8;
  const int r = lane & 7;
  // an item: groups g0, g0 + 1; kWhole: both exist with 8 x 8 each and the layer's part of the
  // row is 8-byte aligned, so each lane's two values of a group are an aligned pair that
  // exists (one 8-byte reduction, no bounds)
  const auto item = [&](int g0, auto whole) {
    constexpr bool kWhole = decltype(whole)::value;
    const uint16_t* pa = zero;
    const uint16_t* pb = zero;
    int ea = 0, eb = 0;
    if (kWhole || (g0 + a_g < d.groups && r < d.m)) {  // (the row's element: mma_dw_item's XOR)
      ea = du_elem[(g0 + a_g) * d.m + r];
      pa = du;
    }
    if (kWhole || (g0 + b_g < d.groups && r < d.n)) {
      eb = h_elem[(g0 + b_g) * d.n + r];
      pb = h;
    }
    float acc[2][4];
    // two k-steps per iteration: the pair items' loop step is a larger share of their short
    // body (IGCV2(256, 8) backward predicted 46% -> 48% of copy bandwidth), no spills
    mma_dw_item<Fmt, MT, 2>(acc, pa, a_t, ea, pb, b_t, eb, ps);
    // kept: acc[0][0..1] (output gid of g, inputs 2 tig + {0, 1} of g) and acc[1][2..3]
    // (output gid of g + 1, inputs 2 tig + {0, 1} of g + 1)
    // a 32-bit offset within the layer (its weights number far less than 2^31: its channels
    // fit shared memory): 8 fewer instructions per item than a 64-bit one. The values are
    // added in L2 (red_add_f32x2, red_add_f32; mma_weight_grad_items).
    if constexpr (kWhole) {
#pragma unroll
      for (int k = 0; k < 2; ++k)
        red_add_f32x2(pw + ((g0 + k) * 64 + gid * 8 + 2 * tig), acc[k][2 * k],
                      acc[k][2 * k + 1]);
    } else {
#pragma unroll
      for (int k = 0; k < 2; ++k) {
        const int g = g0 + k;
        const bool row = g < d.groups && gid < d.m;
        float* out = pw + ((g * d.m + gid) * d.n + 2 * tig);
        red_add_f32(out, acc[k][2 * k], row && 2 * tig < d.n);
        red_add_f32(out + 1, acc[k][2 * k + 1], row && 2 * tig + 1 < d.n);
      }
    }
  };
  // one item per iteration: unrolled by two it gains nothing, and tools/gpu_static.py reads an
  // item's cost from these loops' bodies. The whole items first (every item of IGCV2 with
  // K = 8), then the rest
  int g0 = 2 * warp;
  if (d.m == 8 && d.n == 8 && (reinterpret_cast<uintptr_t>(pw) & 7) == 0) {
#pragma unroll 1
    for (; g0 + 1 < d.groups; g0 += 2 * kWarps) item(g0, std::true_type{});
  }
#pragma unroll 1
  for (; g0 < d.groups; g0 += 2 * kWarps) item(g0, std::false_type{});
}

// The tensors' element of an fp32 value: rounded to the 16-bit format, or itself (float32).
template <class Fmt>
__device__ __forceinline__ typename Fmt::Storage mma_storage_from_float(float v) {
  if constexpr (Fmt::kPlanes == 1) return mma_from_float<Fmt>(v);
  else return v;
}

// pb[o] += sum over the tile's positions of du[o] (fp32, in position order; float32: each value
// joined from its planes, ps elements apart).
template <class Fmt, int TP>
__device__ __forceinline__ void mma_bias_grads(const LayerDesc d, const uint16_t* du,
                                               float* __restrict__ pb, int ps) {
  for (int o = threadIdx.x; o < d.cout; o += kThreads) {
    float s = 0.0f;
#pragma unroll
    for (int c = 0; c < TP / 8; ++c) {
      const uint16_t* sp = du + mma_elem<TP>(o, 8 * c);
      const uint4 v = *reinterpret_cast<const uint4*>(sp);
      const uint32_t w[4] = {v.x, v.y, v.z, v.w};
      if constexpr (Fmt::kPlanes == 1) {
#pragma unroll
        for (int k = 0; k < 4; ++k) {
          s += mma_to_float<Fmt>(w[k] & 0xffffu);
          s += mma_to_float<Fmt>(w[k] >> 16);
        }
      } else {  // (the planes' loads as separate arrays: a [plane][4] array spilled 4 bytes)
        constexpr int NP = Fmt::kPlanes;
        const uint4 vm = *reinterpret_cast<const uint4*>(sp + ps);
        const uint4 vl = NP == 3 ? *reinterpret_cast<const uint4*>(sp + 2 * ps) : vm;
        const uint32_t m[4] = {vm.x, vm.y, vm.z, vm.w}, l[4] = {vl.x, vl.y, vl.z, vl.w};
#pragma unroll
        for (int i = 0; i < 8; ++i) {
          uint32_t r[NP];
          r[0] = w[i / 2];
          r[1] = m[i / 2];
          if constexpr (NP == 3) r[2] = l[i / 2];
          s += mma_join<NP>(r, i % 2);
        }
      }
    }
    pb[o] += s;
  }
}

// dx[pos t, channel c] = sum of tile rows order[starts[c] .. starts[c + 1] - 1] (fp32, in that
// order; 0 for a channel no row maps to), for c < C, t < tvalid.
template <class Fmt, int TP>
__device__ __forceinline__ void mma_store_tile_csr(typename Fmt::Storage* __restrict__ dst,
                                                   int64_t cs, const int64_t* pos_off,
                                                   int tvalid, int C,
                                                   const int32_t* __restrict__ starts,
                                                   const int32_t* __restrict__ order,
                                                   const uint16_t* tile, int ps) {
  for (int it = threadIdx.x; it < C * TP; it += kThreads) {
    const int c = it / TP, t = it - c * TP;
    if (t >= tvalid) continue;
    float v = 0.0f;
    const int e = starts[c + 1];
    for (int k = starts[c]; k < e; ++k) {
      const uint16_t* sp = tile + mma_elem<TP>(order[k], t);
      if constexpr (Fmt::kPlanes == 1) v += mma_to_float<Fmt>(*sp);
      else v += mma_join_elem<Fmt::kPlanes>(sp, ps);
    }
    dst[pos_off[t] + static_cast<int64_t>(c) * cs] = mma_storage_from_float<Fmt>(v);
  }
}

// The dy tile: dy channel j to row rows[j] (du_L in natural output order; rows null: row j).
// cl_vec: rows_aligned16(dy) (16-bit). MmaF32x3 / MmaF32x2: in its planes, ps elements apart, the
// alignments taken here (kept live across the kernel, they spilled).
template <class Fmt, int TP>
__device__ __forceinline__ void mma_load_dy(const TensorArg<const typename Fmt::Storage>& dy,
                                            const int64_t* off_dy, int64_t p0, int tvalid,
                                            bool cl_vec, int cout, const int32_t* rows,
                                            uint16_t* DY, int ps) {
  if constexpr (Fmt::kPlanes == 1) {
    if (rows != nullptr)
      mma_load_tile_inline<TP, true>(dy.ptr, dy.cs, off_dy, dy.ix.run_is_contiguous(p0, tvalid),
                                     cl_vec, tvalid, cout, nullptr, DY, rows);
    else
      mma_load_tile_inline<TP>(dy.ptr, dy.cs, off_dy, dy.ix.run_is_contiguous(p0, tvalid),
                               cl_vec, tvalid, cout, nullptr, DY);
  } else {
    const bool contig = dy.ix.run_is_contiguous(p0, tvalid);
    const bool pairs = pairs_aligned(dy), rows16 = rows_aligned16(dy);
    if (rows != nullptr)
      mma_load_tile_f32_inline<Fmt::kPlanes, TP, false, true>(
          dy.ptr, dy.cs, off_dy, contig, pairs, rows16, tvalid, cout, nullptr, DY, ps, rows);
    else
      mma_load_tile_f32_inline<Fmt::kPlanes, TP>(dy.ptr, dy.cs, off_dy, contig, pairs, rows16,
                                                 tvalid, cout, nullptr, DY, ps);
  }
}

// ---------------------------------------------------------------------------------------------
// The kernel
// ---------------------------------------------------------------------------------------------
// Rows of the backward's 16-bit tiles: x, u_1 .. u_{L-1}, dy (each a multiple of 4); with
// reload (x and dy in one tile) the larger of x and dy instead of both.
inline int64_t mma_backward_rows(const ChainParams<float>& p, bool reload = false) {
  int64_t middle = 0;
  for (int l = 1; l < p.L; ++l) middle += mma_tile_rows(p.layer[l].cin);
  const int64_t xr = mma_tile_rows(p.c0), dyr = mma_tile_rows(p.layer[p.L - 1].cout);
  return (reload ? (xr > dyr ? xr : dyr) : xr + dyr) + middle;
}

// Shared memory of a tile of TP positions: the rows above, the zero row, the scratch row (planes
// times: MmaF32x3 three, MmaF32x2 two, one bfloat16 plane after the other), three offset arrays.
inline size_t mma_backward_smem_bytes(int64_t rows, int tp, int planes = 1) {
  return static_cast<size_t>(planes) * (rows + 2) * tp * sizeof(uint16_t) +
         3 * tp * sizeof(int64_t);
}

// The backward kernel's launch-bounds minimum of CTAs per SM: two (at most 128 registers), but
// one for the float32 kernels (MmaF32x3, MmaF32x2) of 64 positions: the three-plane one
// spilled 4 bytes of the kernel's state on sm_90 at 128 registers (three planes of every
// operand), and the planner takes 64 positions for a float32 chain only on one CTA per SM.
constexpr int mma_backward_min_ctas(int mt, int planes) {
  return planes > 1 && mt == 4 ? 1 : 2;
}

// mp: the chain (forward fragments, for the recompute; its row tables, launch_mma_prepare); mt: its
// transpose (make_mma_transposed_params). partial: [gridDim.x, num_w + num_b] fp32 (null when
// neither weight nor bias gradients are needed); dx_starts / dx_order: CSR of the input index (dx
// channel c sums dh_0 rows dx_order[dx_starts[c] .. dx_starts[c+1]-1]); null without one.
// Launch bounds of two CTAs per SM (at most 128 registers): without a minimum, ptxas gave the
// 32-position kernel 80 registers and spilled once the items looked their rows up in tables.
// The float32 kernel of 64 positions takes one (mma_backward_min_ctas).
// MmaF32x3 / MmaF32x2: x, dy and dx float32; every tile, the zero and the scratch row in three /
// two planes (the whole first plane, then the second, ...: ps elements apart), both fragment
// sets likewise (mp.num_frag, mt.num_frag apart); the float32 tile moves inlined as the 16-bit
// ones.
template <class Fmt, int MT>
__global__ void __launch_bounds__(kThreads, mma_backward_min_ctas(MT, Fmt::kPlanes))
    chain_backward_mma_kernel(const MmaParams mp, const MmaParams mt,
                              const TensorArg<const typename Fmt::Storage> x,
                              const TensorArg<const typename Fmt::Storage> dy,
                              const TensorArg<typename Fmt::Storage> dx,
                              const int32_t* __restrict__ dx_starts,
                              const int32_t* __restrict__ dx_order, float* __restrict__ partial,
                              const BackwardFlags f, int64_t P) {
  constexpr int TP = MT * 16;
  constexpr int NP = Fmt::kPlanes;
  IGC_DECLARE_SMEM(smem);
  const ChainParams<float>& p = mp.c;
  const int L = p.L;
  int64_t middle = 0;  // rows of u_1 .. u_{L-1}, each a multiple of 4 (mma_tile_rows)
  for (int l = 1; l < L; ++l) middle += mma_tile_rows(p.layer[l].cin);
  const bool reload = f.reload_x != 0;
  const int64_t x_rows = mma_tile_rows(p.c0), dy_rows_n = mma_tile_rows(p.layer[L - 1].cout);
  // named tiles (see chain_forward_mma_kernel): every access stays a shared-memory instruction;
  // x | u_1 .. u_{L-1} | dy, or with reload x and dy in the first tile
  uint16_t* const X = reinterpret_cast<uint16_t*>(smem);
  uint16_t* const U = X + (reload && dy_rows_n > x_rows ? dy_rows_n : x_rows) * TP;
  uint16_t* const DY = reload ? X : U + middle * TP;
  uint16_t* const zero = U + (middle + (reload ? 0 : dy_rows_n)) * TP;
  // zero + TP: the scratch row of mma_layer_k's stmatrix epilogue
  const int ps = NP > 1 ? static_cast<int>(zero + 2 * TP - X) : 0;  // elements of a plane
  const int64_t fps = NP > 1 ? mp.num_frag : 0, fps_t = NP > 1 ? mt.num_frag : 0;
  // 4 TP bytes per plane: 8-byte aligned
  int64_t* off_x = reinterpret_cast<int64_t*>(zero + 2 * TP + (NP - 1) * ps);
  int64_t* off_dy = off_x + TP;
  int64_t* off_dx = off_dy + TP;
  for (int t = threadIdx.x; t < NP * TP; t += kThreads) zero[(t / TP) * ps + t % TP] = 0;

  const int64_t row_len = p.num_w + p.num_b;
  float* part = partial ? partial + static_cast<int64_t>(blockIdx.x) * row_len : nullptr;
  if (part != nullptr)
    for (int64_t e = threadIdx.x; e < row_len; e += kThreads) part[e] = 0.0f;

  const int32_t* index = p.has_index ? p.table + p.index_off : nullptr;
  const LayerDesc& last = p.layer[L - 1];
  const int32_t* dy_rows = last.gather_identity ? nullptr : p.table + last.g_off;
  // the 16-bit channels-last vector paths' alignment (float32: at each tile move)
  [[maybe_unused]] const bool x_cl_vec = NP == 1 && rows_aligned16(x);
  const bool dy_cl_vec = NP == 1 && rows_aligned16(dy);
  [[maybe_unused]] const bool dx_cl_vec = NP == 1 && f.need_x && rows_aligned16(dx);
  const int ntiles = static_cast<int>((P + TP - 1) / TP);
  for (int tile = blockIdx.x; tile < ntiles; tile += gridDim.x) {
    const int64_t p0 = static_cast<int64_t>(tile) * TP;
    const int tvalid = static_cast<int>(min64(TP, P - p0));
    __syncthreads();  // the previous tile is done with every tile and offset (part zeroed)
    tile_offsets(x.ix, p0, tvalid, off_x);
    tile_offsets(dy.ix, p0, tvalid, off_dy);
    if (f.need_x) tile_offsets(dx.ix, p0, tvalid, off_dx);
    __syncthreads();
    // the x tile (gathered by the input index); with reload loaded again for layer 1's dW
    const auto load_x = [&] {
      if constexpr (NP == 1)
        mma_load_tile_inline<TP>(x.ptr, x.cs, off_x, x.ix.run_is_contiguous(p0, tvalid),
                                 x_cl_vec, tvalid, p.c0, index, X);
      else
        mma_load_tile_f32_inline<NP, TP>(x.ptr, x.cs, off_x, x.ix.run_is_contiguous(p0, tvalid),
                                         pairs_aligned(x), rows_aligned16(x), tvalid, p.c0,
                                         index, X, ps);
    };
    const auto load_dy = [&] {
      mma_load_dy<Fmt, TP>(dy, off_dy, p0, tvalid, dy_cl_vec, last.cout, dy_rows, DY, ps);
    };
    load_x();
    // du_L in natural output order: dy channel j to row gather_{L-1}[j] (with reload once the
    // recompute has read x)
    if (!reload) load_dy();
    const int64_t next = static_cast<int64_t>(tile) + gridDim.x;
    if (f.prefetch && next < ntiles) {  // the next tile's x and dy, into L2 while this one runs
      const int64_t pn = next * TP;
      const int nn = static_cast<int>(min64(TP, P - pn));
      prefetch_tile_l2(x, pn, nn, p.c0, index, p.c_in);
      prefetch_tile_l2(dy, pn, nn, last.cout, nullptr, last.cout);
    }
    __syncthreads();
    {  // u_1 .. u_{L-1}, back to back
      const uint16_t* in = X;
      int64_t uo = 0;
      for (int l = 0; l + 1 < L; ++l) {
        uint16_t* out = U + uo * TP;
        mma_layer<Fmt, MT, false, true>(p.layer[l], mp.layer[l], p.B, mp.frag, in,
                                        mp.elem + mp.layer[l].e_off, out, zero, mp.elem_out,
                                        ps, fps);
        __syncthreads();
        in = out;
        uo += mma_tile_rows(p.layer[l].cout);
      }
    }
    if (reload) {  // (L >= 2: the barrier after u_1 ends every read of x)
      load_dy();
      __syncthreads();
    }
    // du_{l+1}: the dy tile, then the tile that held u_{l+1}
    const uint16_t* du = DY;
    int64_t ho = middle;
    for (int l = L - 1; l >= 0; --l) {
      const LayerDesc d = p.layer[l];
      if (l > 0) ho -= mma_tile_rows(d.cin);
      uint16_t* h = l > 0 ? U + ho * TP : X;
      if (l == 0 && reload && f.need_w) {  // x again, over dy (dead: du_1 is in u_1's tile)
        load_x();
        __syncthreads();
      }
      // h's rows as elements (the input rows of layer l: gather_{l-1}); du's in natural order
      const int32_t* h_elem = mp.elem + mp.layer[l].e_off;
      if (f.need_b && d.has_bias)
        mma_bias_grads<Fmt, TP>(d, du, part + p.num_w + d.b_off, ps);
      if (f.need_w) {
        if (d.m <= 8 && d.n <= 8)
          mma_weight_grads_pairs<Fmt, MT>(d, du, mp.elem_out, h, h_elem, part + d.w_off, zero,
                                          ps);
        else
          mma_weight_grads<Fmt, MT>(d, du, mp.elem_out, h, h_elem, part + d.w_off, zero, ps);
      }
      if (l > 0 || f.need_x) {
        __syncthreads();  // h_l has been read: du_l goes there
        // dh_l = W_l^T du_l; input j of layer l lands in row gather_{l-1}[j] (row j for l == 0)
        mma_layer<Fmt, MT>(mt.c.layer[l], mt.layer[l], nullptr, mt.frag, du, mp.elem_out, h,
                           zero, h_elem, ps, fps_t);
        __syncthreads();
        du = h;
      }
    }
    if (f.need_x) {  // dh_0, in the x tile
      if (dx_starts != nullptr)
        mma_store_tile_csr<Fmt, TP>(dx.ptr, dx.cs, off_dx, tvalid, p.c_in, dx_starts, dx_order,
                                    X, ps);
      else if constexpr (NP == 1)
        mma_store_tile_inline<TP>(dx.ptr, dx.cs, off_dx, dx.ix.run_is_contiguous(p0, tvalid),
                                  dx_cl_vec, tvalid, p.c0, nullptr, X);
      else
        mma_store_tile_f32_inline<NP, TP>(dx.ptr, dx.cs, off_dx,
                                          dx.ix.run_is_contiguous(p0, tvalid), pairs_aligned(dx),
                                          rows_aligned16(dx), tvalid, p.c0, nullptr, X, ps);
    }
  }
}

// out[e] = sum over CTA rows r = 0, 1, ... of partial[r][e] in that order, rounded once (to the
// 16-bit format; float32: the float32 sum itself).
template <class Fmt>
__global__ void __launch_bounds__(kThreads)
    reduce_partials_mma_kernel(const float* __restrict__ partial, int64_t rows, int64_t row_len,
                               int64_t num_w, typename Fmt::Storage* __restrict__ gw,
                               typename Fmt::Storage* __restrict__ gb) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; e < row_len;
       e += stride) {
    float s = 0.0f;
    for (int64_t r = 0; r < rows; ++r) s += partial[r * row_len + e];
    if (e < num_w) {
      if (gw != nullptr) gw[e] = mma_storage_from_float<Fmt>(s);
    } else if (gb != nullptr) {
      gb[e - num_w] = mma_storage_from_float<Fmt>(s);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Host: plan and launch
// ---------------------------------------------------------------------------------------------
template <class Fmt, int MT>
inline cudaError_t mma_backward_configure(size_t smem, int* occ) {
  return configure(chain_backward_mma_kernel<Fmt, MT>, smem, occ);
}

// Every tile updates its CTA's whole fp32 row of weight and bias gradients (in L2), so the rows
// of all resident CTAs are the backward's working set beside its tiles' streams. The H200
// profile of IGCV2(1024, 16) (tiles of 16 positions, two CTAs per SM: 264 rows of 192 KiB, 99%
// of the L2) moved 3.4 GB through DRAM where x, dy and dx are 0.8 GB, and the reduction that
// reads the rows next found 1.3% of them in L2. Where the rows of two CTAs per SM exceed three
// quarters of the L2 (a margin for the streams, not tuned), one CTA per SM with a tile of 32 mt
// positions keeps the positions per SM, halves the rows and the row traffic per position, and
// shares each item's set-up between twice the positions, for half the resident warps. The
// same where (one plane) a tile's row, added once by reductions in L2, moves at least the
// bytes of the tile's x, dy and dx: the row then takes half or more of the L2 traffic per
// position, which the longer tile halves (tools/perf_model.py's L2 term: IGCV2(512, 16) and
// (512, 32) in bfloat16 55% -> 65% and 67%, predicted, latency-bound then; IGCV2(512, 8), whose
// row is half its tile's bytes, 70% -> 74%, is left as it is). True where that tile exists (mt
// of 1 or 2), fits one CTA's shared memory and still gives every SM a tile.
// dev.l2_bytes == 0 (unknown, or IGC_CUDA_PLAN_L2_BYTES=0): never.
inline bool mma_backward_wide_tile(const ChainParams<float>& c, int mt, bool reload, int64_t P,
                                   const DeviceInfo& dev, int planes = 1) {
  if (dev.l2_bytes <= 0 || mt < 1 || mt >= kMmaMaxMt) return false;
  const int64_t row_bytes = (c.num_w + c.num_b) * static_cast<int64_t>(sizeof(float));
  const int64_t tile_bytes =
      16 * mt * static_cast<int64_t>(c.c0 + c.c_in + c.layer[c.L - 1].cout) * 2;
  if (!partial_rows_exceed_l2(dev, 2, row_bytes) && !(planes == 1 && row_bytes >= tile_bytes))
    return false;
  const int tp = 32 * mt;
  return mma_backward_smem_bytes(mma_backward_rows(c, reload), tp, planes) <=
             cta_smem_budget(dev, 1) &&
         (P + tp - 1) / tp >= dev.sm_count;
}

// The tile as the forward's (64, 32, 16 positions, two CTAs per SM where they fit; float32: two
// CTAs of 32 or 16 positions, else one); mt = 0 when the store-all tiles do not fit a
// 16-position tile or the tiles outnumber INT32_MAX / 2 (the caller falls back to the CUDA-core
// backward). The number of CTAs (rows of the partial buffer) is capped by kMaxPartialBytes.
// Weight gradients whose fp32 rows, one per CTA, exceed 3/4 of the L2 at two CTAs per SM, or
// (16-bit) move at least a tile's bytes per tile, take one CTA per SM with a tile twice as long
// where it fits (mma_backward_wide_tile). A lone CTA per SM prefetches its next tile into L2
// where that fits too (plan->prefetch, below).
template <class Fmt>
inline cudaError_t plan_backward_mma(const MmaParams& mp, int64_t P, bool need_grads_wb,
                                     const DeviceInfo& dev, MmaPlan* plan) {
  // (tile of 16 mt positions, CTAs per SM by shared memory: 2 or 1) of a layout
  constexpr int NP = Fmt::kPlanes;
  const auto pick = [&](bool reload, int* ctas) {
    const int64_t rows = mma_backward_rows(mp.c, reload);
    const auto bytes = [&](int t) { return mma_backward_smem_bytes(rows, t, NP); };
    if constexpr (NP > 1) {
      // float32: two CTAs of 32 positions where they fit and every SM gets a tile, else two of
      // 16 where they fit (the float32 kernels that run two per SM, mma_backward_min_ctas:
      // the 64-position one needs more registers), else the largest tile for one CTA
      if (bytes(32) <= cta_smem_budget(dev, 2) && (P + 31) / 32 >= dev.sm_count) {
        *ctas = 2;
        return 2;
      }
      if (bytes(16) <= cta_smem_budget(dev, 2)) {
        *ctas = 2;
        return 1;
      }
      const int tp = choose_tile(bytes, dev, P, 16, 1);
      *ctas = 1;
      return tp >= 64 ? 4 : tp / 16;
    }
    const int tp = choose_tile(bytes, dev, P, 16, 2);
    const int mt = tp >= 64 ? 4 : tp / 16;
    *ctas = mt > 0 && bytes(16 * mt) <= cta_smem_budget(dev, 2) ? 2 : 1;
    return mt;
  };
  int ctas = 0, ctas_r = 0;
  plan->mt = pick(false, &ctas);
  plan->reload_x = false;
  if (mp.c.L >= 2) {  // x and dy in one tile where that gives more positions per SM
    const int mt_r = pick(true, &ctas_r);
    if (mt_r * ctas_r > plan->mt * ctas) {
      plan->mt = mt_r;
      plan->reload_x = true;
    }
  }
  if (plan->mt == 0) return cudaSuccess;
  if (need_grads_wb && (plan->reload_x ? ctas_r : ctas) == 2 &&
      mma_backward_wide_tile(mp.c, plan->mt, plan->reload_x, P, dev, NP))
    plan->mt *= 2;
  plan->smem =
      mma_backward_smem_bytes(mma_backward_rows(mp.c, plan->reload_x), 16 * plan->mt, NP);
  plan->ntiles = (P + 16 * plan->mt - 1) / (16 * plan->mt);
  if (plan->ntiles > INT32_MAX / 2) {  // the kernel counts its tiles (plus the grid) in 32 bits
    plan->mt = 0;
    return cudaSuccess;
  }
  int occ = 0;
  cudaError_t e = plan->mt == 4   ? mma_backward_configure<Fmt, 4>(plan->smem, &occ)
                  : plan->mt == 2 ? mma_backward_configure<Fmt, 2>(plan->smem, &occ)
                                  : mma_backward_configure<Fmt, 1>(plan->smem, &occ);
  if (e != cudaSuccess) return e;
  if (occ < 1) occ = 1;
  int64_t grid = min64(plan->ntiles, static_cast<int64_t>(dev.sm_count) * occ);
  const int64_t row_bytes =
      need_grads_wb ? (mp.c.num_w + mp.c.num_b) * static_cast<int64_t>(sizeof(float)) : 0;
  if (row_bytes > 0) grid = min64(grid, std::max<int64_t>(1, kMaxPartialBytes / row_bytes));
  plan->grid = static_cast<int>(grid);
  // One CTA per SM loads its tile, computes and stores with nothing to overlap: its next tile's
  // x and dy are prefetched into L2 at the start of each tile, where they fit (l2_prefetch_fits)
  using S = typename Fmt::Storage;
  const int64_t tile_bytes = 16 * plan->mt * (mp.c.c_in + mp.c.layer[mp.c.L - 1].cout) *
                             static_cast<int64_t>(sizeof(S));
  plan->prefetch = occ == 1 && l2_prefetch_fits(dev, row_bytes, tile_bytes);
  return cudaSuccess;
}

// table: index_table_size(h) entries of device memory (mp.c.table and mt.c.table point to it);
// frag / frag_t: Fmt::kPlanes times mp.num_frag / mt.num_frag entries (mp.frag, mt.frag point to
// them); tables: mma_row_table_size(mp) entries (the row tables); w: the weights (MmaWeights);
// partial: plan.grid rows of num_w + num_b floats when f.need_w or f.need_b (else null); gw / gb:
// the outputs in the tensors' dtype, or null when not needed. Builds the tables and packs both
// fragment sets in one launch, runs the backward, then reduces the partial rows.
template <class Fmt>
inline cudaError_t launch_backward_mma(const HostChain& h, const MmaParams& mp,
                                       const MmaParams& mt, const MmaWeights& w, int32_t* table,
                                       uint2* frag, uint2* frag_t, int32_t* tables,
                                       const TensorArg<const typename Fmt::Storage>& x,
                                       const TensorArg<const typename Fmt::Storage>& dy,
                                       const TensorArg<typename Fmt::Storage>& dx,
                                       const int32_t* dx_starts, const int32_t* dx_order,
                                       float* partial, typename Fmt::Storage* gw,
                                       typename Fmt::Storage* gb, BackwardFlags f, int64_t P,
                                       const MmaPlan& plan, cudaStream_t stream) {
  if (plan.mt != 1 && plan.mt != 2 && plan.mt != 4) return cudaErrorInvalidValue;
  if (plan.grid < 1 || mt.c.table != table) return cudaErrorInvalidValue;
  const bool wb = f.need_w || f.need_b;
  if (wb && partial == nullptr) return cudaErrorInvalidValue;
  if (mp.c.has_index && f.need_x && (dx_starts == nullptr || dx_order == nullptr))
    return cudaErrorInvalidValue;
  MmaParams tp;
  cudaError_t e = launch_mma_prepare<Fmt>(h, mp, &mt, w, plan.mt, false, false, table, tables,
                                          frag, frag_t, stream, &tp);
  if (e != cudaSuccess) return e;
  float* part = wb ? partial : nullptr;
  if (!mp.c.has_index) dx_starts = dx_order = nullptr;
  f.reload_x = plan.reload_x ? 1 : 0;
  f.prefetch = plan.prefetch ? 1 : 0;
  if (plan.mt == 4)
    IGC_LAUNCH((chain_backward_mma_kernel<Fmt, 4>), plan.grid, plan.smem, stream, tp, mt, x, dy,
               dx, dx_starts, dx_order, part, f, P);
  else if (plan.mt == 2)
    IGC_LAUNCH((chain_backward_mma_kernel<Fmt, 2>), plan.grid, plan.smem, stream, tp, mt, x, dy,
               dx, dx_starts, dx_order, part, f, P);
  else
    IGC_LAUNCH((chain_backward_mma_kernel<Fmt, 1>), plan.grid, plan.smem, stream, tp, mt, x, dy,
               dx, dx_starts, dx_order, part, f, P);
  e = cudaGetLastError();
  if (e != cudaSuccess || !wb) return e;
  const int64_t row_len = mp.c.num_w + mp.c.num_b;
  IGC_LAUNCH((reduce_partials_mma_kernel<Fmt>), blocks_for(row_len, 4096), 0, stream,
             static_cast<const float*>(partial), static_cast<int64_t>(plan.grid), row_len,
             mp.c.num_w, f.need_w ? gw : nullptr, f.need_b ? gb : nullptr);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace igc
