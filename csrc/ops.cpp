// Schemas of the igc:: operator library, defined once for every device, and the Python module
// igc_kernels._C (importing it loads this library; it carries build facts as constants and the
// CUDA kernels' limits, so that Python never re-implements them).
//
// igc::chain_forward computes y = P_L W_L ... P_1 W_1 x (+ biases) per position.
// igc::chain_backward recomputes the chain from x and returns (grad_x, grad_weights, grad_biases):
// grad_weights concatenates every flattened dW_l in layer order, grad_biases every db_l of the
// layers that have a bias. An output whose output_mask entry is false has shape (0,).
// shuffles[l] > 0: channel shuffle with that many groups after layer l; 0: perms[l] or identity.
// biases: empty (no biases) or one entry per layer, a (0,)-shaped tensor meaning "no bias".
// input_index (optional): h_0[:, j] = x[:, input_index[j]] before layer 1 (entries may repeat;
// C_0 = its length); grad_x then has x's channel count and sums the gradients of repeats.
// igc::block_forward (inference only) runs a chain whose layers may also be spatial (a 4-D
// weight (C_l, C_{l-1} / G_l, k, k), k odd <= 7, padding k // 2, strides[l] 1 or 2), each
// followed by an activation (activations[l]: 0 none, 1 relu, 2 relu6, 3 hardswish) before its
// permutation, and adds x to the output when residual is true (csrc/cpu/block_cpu.cpp).
#include <Python.h>
#include <torch/library.h>

#include <vector>

#include "cuda/chain_limits.h"

TORCH_LIBRARY(igc, m) {
  m.def(
      "chain_forward(Tensor x, Tensor[] weights, Tensor[] biases, int[] groups, int[] shuffles, "
      "Tensor?[] perms, Tensor? input_index=None) -> Tensor");
  m.def(
      "chain_backward(Tensor grad_y, Tensor x, Tensor[] weights, Tensor[] biases, int[] groups, "
      "int[] shuffles, Tensor?[] perms, bool[3] output_mask, Tensor? input_index=None) -> "
      "(Tensor, Tensor, Tensor)");
  m.def(
      "block_forward(Tensor x, Tensor[] weights, Tensor[] biases, int[] groups, int[] shuffles, "
      "Tensor?[] perms, int[] strides, int[] activations, bool residual, "
      "Tensor? input_index=None) -> Tensor");
}

namespace igc {
const char* cpu_kernel_isa();  // csrc/cpu/chain_cpu.cpp
size_t cpu_output_cache_bytes();  // csrc/cpu/output_cache.cpp
void cpu_output_cache_clear();
}

namespace {

// cuda_min_smem_bytes(channels, acc_bytes) -> int: shared memory (bytes per block) of the
// smallest launch plan of the CUDA kernels for a chain of widths channels = [C_0, ..., C_L]
// (cuda/chain_limits.h).
PyObject* cuda_min_smem_bytes(PyObject*, PyObject* args) {
  PyObject* seq = nullptr;
  int acc_bytes = 0;
  if (!PyArg_ParseTuple(args, "Oi", &seq, &acc_bytes)) return nullptr;
  PyObject* fast = PySequence_Fast(seq, "channels must be a sequence of ints");
  if (fast == nullptr) return nullptr;
  const Py_ssize_t n = PySequence_Fast_GET_SIZE(fast);
  std::vector<int64_t> C;
  for (Py_ssize_t i = 0; i < n; ++i) {
    const long long v = PyLong_AsLongLong(PySequence_Fast_GET_ITEM(fast, i));
    if (v == -1 && PyErr_Occurred()) {
      Py_DECREF(fast);
      return nullptr;
    }
    C.push_back(static_cast<int64_t>(v));
  }
  Py_DECREF(fast);
  if (n < 2 || acc_bytes <= 0) {
    PyErr_SetString(PyExc_ValueError, "channels needs C_0 and at least one layer; acc_bytes > 0");
    return nullptr;
  }
  return PyLong_FromSize_t(igc::cuda::min_smem_bytes(C.data(), static_cast<int>(n - 1),
                                                     static_cast<size_t>(acc_bytes)));
}

PyObject* cache_bytes(PyObject*, PyObject*) {
  return PyLong_FromSize_t(igc::cpu_output_cache_bytes());
}

PyObject* cache_clear(PyObject*, PyObject*) {
  igc::cpu_output_cache_clear();
  Py_RETURN_NONE;
}

PyMethodDef methods[] = {
    {"cpu_output_cache_bytes", cache_bytes, METH_NOARGS,
     "cpu_output_cache_bytes() -> int: bytes of freed CPU outputs the cache holds for reuse."},
    {"cpu_output_cache_clear", cache_clear, METH_NOARGS,
     "cpu_output_cache_clear(): return the cached CPU output buffers to the system."},
    {"cuda_min_smem_bytes", cuda_min_smem_bytes, METH_VARARGS,
     "cuda_min_smem_bytes(channels, acc_bytes) -> int: shared memory of the CUDA kernels' "
     "smallest plan for widths [C_0, ..., C_L] and an accumulation type of acc_bytes."},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace

extern "C" {
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, methods};
  PyObject* mod = PyModule_Create(&module_def);
  if (mod == nullptr) return nullptr;
  PyModule_AddIntConstant(mod, "BUILT_WITH_CUDA", IGC_BUILT_WITH_CUDA);
  PyModule_AddStringConstant(mod, "CPU_KERNEL_ISA", igc::cpu_kernel_isa());
  PyModule_AddIntConstant(mod, "CUDA_MAX_LAYERS", igc::cuda::kMaxLayers);
  PyModule_AddIntConstant(mod, "CUDA_MIN_TILE", igc::cuda::kMinTile);
  return mod;
}
}
