// Argument checks shared by every device implementation of the igc:: operators.
//
// The Python front end validates with friendlier messages first; these checks guard the ops
// when they are called directly (torch.ops.igc.*) and make the kernels memory safe: every shape,
// group count and permutation entry a kernel relies on is verified here, before any launch.
#pragma once

#include <ATen/core/List.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <optional>
#include <vector>

namespace igc {

using OptTensorList = c10::List<std::optional<at::Tensor>>;

struct ChainDesc {
  int64_t L = 0;
  int64_t C_in = 0;            // channels of x (= C_0 unless an input index is given)
  bool has_index = false;      // h_0[j] = x[input_index[j]]
  std::vector<int32_t> input_gather;  // the input index (filled with read_perms=true)
  std::vector<int64_t> C;      // C_0 .. C_L
  std::vector<int64_t> G;      // groups per layer
  std::vector<int64_t> n, m;   // inputs / outputs per group
  std::vector<bool> has_bias;
  // Gather index after every layer (only filled by check_chain(..., read_perms=true)):
  // h_l[j] = u_l[gather[l][j]].
  std::vector<std::vector<int32_t>> gather;
  int64_t num_weight_elems = 0;
  int64_t num_bias_elems = 0;
};

inline bool is_supported_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

// The ops take biases as a Tensor[] that is either empty (no layer has a bias) or holds one
// entry per layer, a (0,)-shaped tensor standing for "no bias". (A Tensor?[] with None entries
// would be one opaque argument to torch.library's autograd, and no gradient could reach the
// biases in it.)
inline bool has_bias_entry(const at::Tensor& b) { return !(b.dim() == 1 && b.size(0) == 0); }

// Validates the chain against x; with read_perms, reads permutation and input index tensors
// (which must then be on the CPU) and fills desc.gather / desc.input_gather, checking that each
// permutation is a permutation of 0..C_l-1 and every index entry lies in [0, C_in). With
// spatial_weights, a 4-D weight (C_l, C_{l-1} / G_l, k, k) is accepted as its first two
// dimensions (the caller checks the others).
inline ChainDesc check_chain(const char* op, const at::Tensor& x, at::TensorList weights,
                             at::TensorList biases, at::IntArrayRef groups,
                             at::IntArrayRef shuffles, const OptTensorList& perms,
                             const std::optional<at::Tensor>& input_index, bool read_perms,
                             bool spatial_weights = false) {
  ChainDesc d;
  d.L = static_cast<int64_t>(weights.size());
  TORCH_CHECK(d.L >= 1, op, ": weights is empty; the chain needs at least one layer");
  TORCH_CHECK(static_cast<int64_t>(groups.size()) == d.L &&
                  static_cast<int64_t>(shuffles.size()) == d.L &&
                  static_cast<int64_t>(perms.size()) == d.L,
              op, ": weights, groups, shuffles and perms must have one entry per layer; got ",
              weights.size(), ", ", groups.size(), ", ", shuffles.size(), ", ", perms.size());
  TORCH_CHECK(biases.empty() || static_cast<int64_t>(biases.size()) == d.L, op,
              ": biases must be empty (no biases) or have one entry per layer (", d.L, "), got ",
              biases.size());
  TORCH_CHECK(x.dim() >= 2 && x.dim() <= 5, op,
              ": x must have shape (N, C) or (N, C, *spatial) with 1 to 3 spatial dims, got ",
              x.sizes());
  TORCH_CHECK(is_supported_dtype(x.scalar_type()), op, ": x has unsupported dtype ",
              x.scalar_type(), " (supported: float32, float16, bfloat16, float64)");
  TORCH_CHECK(x.size(1) > 0, op, ": x has 0 channels (shape ", x.sizes(), ")");
  TORCH_CHECK(x.size(1) <= INT32_MAX, op, ": x has ", x.size(1),
              " channels, more than the kernels address (2^31 - 1)");
  d.C_in = x.size(1);
  d.has_index = input_index.has_value() && input_index->defined();
  if (d.has_index) {
    const at::Tensor& ix = *input_index;
    TORCH_CHECK(ix.dim() == 1 && ix.size(0) > 0, op,
                ": input_index must be a non-empty 1-D index tensor, got shape ", ix.sizes());
    TORCH_CHECK(ix.scalar_type() == at::kLong || ix.scalar_type() == at::kInt, op,
                ": input_index must be int64 or int32, got ", ix.scalar_type());
    TORCH_CHECK(ix.device() == x.device(), op, ": input_index is on ", ix.device(),
                " but x is on ", x.device());
    TORCH_CHECK(ix.size(0) <= INT32_MAX, op, ": input_index is too long (", ix.size(0), ")");
    if (read_perms) {
      TORCH_CHECK(ix.device().is_cpu(), op, ": input_index must be on the CPU for this kernel");
      const at::Tensor ic = ix.to(at::kLong).contiguous();
      const int64_t* iv = ic.data_ptr<int64_t>();
      d.input_gather.resize(static_cast<size_t>(ix.size(0)));
      for (int64_t j = 0; j < ix.size(0); ++j) {
        TORCH_CHECK(iv[j] >= 0 && iv[j] < d.C_in, op, ": input_index entry ", j, " = ", iv[j],
                    " is outside [0, ", d.C_in, ") (x has ", d.C_in, " channels)");
        d.input_gather[j] = static_cast<int32_t>(iv[j]);
      }
    }
    d.C.push_back(ix.size(0));
  } else {
    d.C.push_back(x.size(1));
  }
  for (int64_t l = 0; l < d.L; ++l) {
    const int64_t layer = l + 1;
    const at::Tensor& W = weights[l];
    const int64_t G = groups[l];
    const int64_t cin = d.C.back();
    TORCH_CHECK(G > 0, op, ": layer ", layer, ": groups must be positive, got ", G);
    TORCH_CHECK(cin % G == 0, op, ": layer ", layer, ": in_channels C_", l, " = ", cin,
                " must be divisible by groups = ", G);
    TORCH_CHECK(W.dim() == 2 || (spatial_weights && W.dim() == 4), op, ": layer ", layer,
                ": weight must be 2-D (C_", layer,
                ", C_", l, " / groups), got shape ", W.sizes());
    const int64_t cout = W.size(0);
    TORCH_CHECK(cout <= INT32_MAX, op, ": layer ", layer, ": C_", layer, " = ", cout,
                " channels is more than the kernels address (2^31 - 1)");
    TORCH_CHECK(cout > 0 && W.size(1) == cin / G, op, ": layer ", layer, ": weight has shape ",
                W.sizes(), ", expected (C_", layer, ", C_", l, " / groups) = (", cout, ", ",
                cin / G, ")");
    TORCH_CHECK(cout % G == 0, op, ": layer ", layer, ": out_channels C_", layer, " = ", cout,
                " must be divisible by groups = ", G);
    TORCH_CHECK(W.scalar_type() == x.scalar_type(), op, ": layer ", layer, ": weight has dtype ",
                W.scalar_type(), " but x has dtype ", x.scalar_type());
    TORCH_CHECK(W.device() == x.device(), op, ": layer ", layer, ": weight is on ", W.device(),
                " but x is on ", x.device());
    const bool has_b = !biases.empty() && has_bias_entry(biases[l]);
    if (has_b) {
      const at::Tensor& b = biases[l];
      TORCH_CHECK(b.dim() == 1 && b.size(0) == cout, op, ": layer ", layer,
                  ": bias has shape ", b.sizes(), ", expected (", cout, ",) or (0,) for none");
      TORCH_CHECK(b.scalar_type() == x.scalar_type(), op, ": layer ", layer,
                  ": bias has dtype ", b.scalar_type(), " but x has dtype ", x.scalar_type());
      TORCH_CHECK(b.device() == x.device(), op, ": layer ", layer, ": bias is on ", b.device(),
                  " but x is on ", x.device());
      d.num_bias_elems += cout;
    }
    const int64_t s = shuffles[l];
    const std::optional<at::Tensor> p = perms.get(l);
    const bool has_p = p.has_value() && p->defined();
    TORCH_CHECK(s >= 0, op, ": layer ", layer, ": shuffle groups must be >= 0, got ", s);
    TORCH_CHECK(s == 0 || cout % s == 0, op, ": layer ", layer, ": shuffle groups ", s,
                " must divide C_", layer, " = ", cout);
    TORCH_CHECK(!(s > 0 && has_p), op, ": layer ", layer,
                ": give either a shuffle or an explicit permutation, not both");
    if (has_p) {
      TORCH_CHECK(p->dim() == 1 && p->size(0) == cout, op, ": layer ", layer,
                  ": permutation has shape ", p->sizes(), ", expected (", cout, ",)");
      TORCH_CHECK(p->scalar_type() == at::kLong || p->scalar_type() == at::kInt, op, ": layer ",
                  layer, ": permutation must be int64 or int32, got ", p->scalar_type());
      TORCH_CHECK(p->device() == x.device(), op, ": layer ", layer, ": permutation is on ",
                  p->device(), " but x is on ", x.device());
    }
    d.G.push_back(G);
    d.n.push_back(cin / G);
    d.m.push_back(cout / G);
    d.has_bias.push_back(has_b);
    d.C.push_back(cout);
    d.num_weight_elems += cout * (cin / G);

    if (read_perms) {
      std::vector<int32_t> g(static_cast<size_t>(cout));
      if (s > 0) {
        const int64_t mm = cout / s;
        for (int64_t k = 0; k < mm; ++k)
          for (int64_t q = 0; q < s; ++q) g[k * s + q] = static_cast<int32_t>(q * mm + k);
      } else if (has_p) {
        TORCH_CHECK(p->device().is_cpu(), op, ": layer ", layer,
                    ": permutation must be on the CPU for this kernel");
        const at::Tensor pc = p->to(at::kLong).contiguous();
        const int64_t* pv = pc.data_ptr<int64_t>();
        std::vector<char> seen(static_cast<size_t>(cout), 0);
        for (int64_t j = 0; j < cout; ++j) {
          TORCH_CHECK(pv[j] >= 0 && pv[j] < cout, op, ": layer ", layer,
                      ": permutation entry ", j, " = ", pv[j], " is outside [0, ", cout, ")");
          TORCH_CHECK(!seen[pv[j]], op, ": layer ", layer, ": permutation has duplicate entry ",
                      pv[j]);
          seen[pv[j]] = 1;
          g[j] = static_cast<int32_t>(pv[j]);
        }
      } else {
        for (int64_t j = 0; j < cout; ++j) g[j] = static_cast<int32_t>(j);
      }
      d.gather.push_back(std::move(g));
    }
  }
  return d;
}

// grad_y of chain_backward: x's shape with C_L channels, x's dtype and device.
inline void check_grad_y(const char* op, const at::Tensor& grad_y, const at::Tensor& x,
                         const ChainDesc& d) {
  TORCH_CHECK(grad_y.device() == x.device(), op, ": grad_y is on ", grad_y.device(),
              " but x is on ", x.device());
  TORCH_CHECK(grad_y.dim() == x.dim() && grad_y.size(0) == x.size(0) &&
                  grad_y.size(1) == d.C.back(),
              op, ": grad_y has shape ", grad_y.sizes(), ", expected x's shape with ", d.C.back(),
              " channels");
  for (int64_t i = 2; i < x.dim(); ++i)
    TORCH_CHECK(grad_y.size(i) == x.size(i), op, ": grad_y has shape ", grad_y.sizes(),
                " but x has shape ", x.sizes());
  TORCH_CHECK(grad_y.scalar_type() == x.scalar_type(), op, ": grad_y has dtype ",
              grad_y.scalar_type(), " but x has dtype ", x.scalar_type());
}

// The rule shared with the fake kernels (igc_kernels/_chain.py: out_is_channels_last): an input
// that is not contiguous and whose channel stride is below every stride of a non-trivial spatial
// dim gives channels-last outputs; everything else gives contiguous outputs.
inline bool out_is_channels_last(const at::Tensor& x) {
  if (x.dim() < 3 || x.is_contiguous()) return false;
  bool any = false;
  int64_t min_sp = 0;
  for (int64_t d = 2; d < x.dim(); ++d) {
    if (x.size(d) > 1) {
      min_sp = any ? std::min(min_sp, x.stride(d)) : x.stride(d);
      any = true;
    }
  }
  return any && x.stride(1) < min_sp;
}

// An uninitialised (N, channels, *spatial) tensor in the memory format the rule above gives for
// outputs shaped like x (the fake kernels' empty_like_layout).
inline at::Tensor empty_layout(const at::Tensor& x, int64_t channels) {
  std::vector<int64_t> sizes;
  sizes.push_back(x.size(0));
  if (out_is_channels_last(x)) {
    for (int64_t d = 2; d < x.dim(); ++d) sizes.push_back(x.size(d));
    sizes.push_back(channels);
    return at::empty(sizes, x.options()).movedim(-1, 1);
  }
  sizes.push_back(channels);
  for (int64_t d = 2; d < x.dim(); ++d) sizes.push_back(x.size(d));
  return at::empty(sizes, x.options());
}

}  // namespace igc
