// Schemas of the igc:: operator library, defined once for every device, and the Python module
// igc_kernels._C (importing it loads this library; it carries no Python functions, only build
// facts as constants).
//
// igc::chain_forward computes y = P_L W_L ... P_1 W_1 x (+ biases) per position.
// igc::chain_backward recomputes the chain from x and returns (grad_x, grad_weights, grad_biases):
// grad_weights concatenates every flattened dW_l in layer order, grad_biases every db_l of the
// layers that have a bias. An output whose output_mask entry is false has shape (0,).
// shuffles[l] > 0: channel shuffle with that many groups after layer l; 0: perms[l] or identity.
// biases: empty (no biases) or one entry per layer, a (0,)-shaped tensor meaning "no bias".
// input_index (optional): h_0[:, j] = x[:, input_index[j]] before layer 1 (entries may repeat;
// C_0 = its length); grad_x then has x's channel count and sums the gradients of repeats.
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(igc, m) {
  m.def(
      "chain_forward(Tensor x, Tensor[] weights, Tensor[] biases, int[] groups, int[] shuffles, "
      "Tensor?[] perms, Tensor? input_index=None) -> Tensor");
  m.def(
      "chain_backward(Tensor grad_y, Tensor x, Tensor[] weights, Tensor[] biases, int[] groups, "
      "int[] shuffles, Tensor?[] perms, bool[3] output_mask, Tensor? input_index=None) -> "
      "(Tensor, Tensor, Tensor)");
}

namespace igc {
const char* cpu_kernel_isa();  // csrc/cpu/chain_cpu.cpp
}

extern "C" {
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  PyObject* mod = PyModule_Create(&module_def);
  if (mod == nullptr) return nullptr;
  PyModule_AddIntConstant(mod, "BUILT_WITH_CUDA", IGC_BUILT_WITH_CUDA);
  PyModule_AddStringConstant(mod, "CPU_KERNEL_ISA", igc::cpu_kernel_isa());
  return mod;
}
}
