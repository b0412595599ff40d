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
#include <ATen/record_function.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/library.h>

#include <exception>
#include <optional>
#include <string>
#include <vector>

#include "chain_args.h"
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
// csrc/cpu/block_cpu.cpp: the CPU kernel of igc::block_forward, called without the dispatcher
at::Tensor block_forward_cpu_direct(const at::Tensor& x, at::TensorList weights,
                                    at::TensorList biases, at::IntArrayRef groups,
                                    at::IntArrayRef shuffles, const OptTensorList& perms,
                                    at::IntArrayRef strides, at::IntArrayRef activations,
                                    bool residual, const std::optional<at::Tensor>& input_index,
                                    const std::vector<at::Tensor>* packed);
std::vector<at::Tensor> block_pack_cpu(at::TensorList weights, at::TensorList biases,
                                       at::IntArrayRef groups);
const char* cpu_kernel_isa();  // csrc/cpu/chain_cpu.cpp
size_t cpu_output_cache_bytes();  // csrc/cpu/output_cache.cpp
void cpu_output_cache_clear();
}

namespace {

// Arguments from Python objects (false with a Python error set); fn names the function in errors.
bool tensor_arg(PyObject* o, const char* fn, const char* what, at::Tensor* t) {
  if (!THPVariable_Check(o)) {
    PyErr_Format(PyExc_TypeError, "%s: %s must be a tensor", fn, what);
    return false;
  }
  *t = THPVariable_Unpack(o);
  return true;
}

// Calls f(item) for every item of the sequence o (false as soon as f returns false).
template <typename F>
bool for_each_item(PyObject* o, const char* fn, const char* what, F&& f) {
  PyObject* fast = PySequence_Fast(o, "");
  if (fast == nullptr) {
    PyErr_Format(PyExc_TypeError, "%s: %s must be a sequence", fn, what);
    return false;
  }
  const Py_ssize_t n = PySequence_Fast_GET_SIZE(fast);
  PyObject** items = PySequence_Fast_ITEMS(fast);
  bool ok = true;
  for (Py_ssize_t i = 0; i < n && ok; ++i) ok = f(items[i]);
  Py_DECREF(fast);
  return ok;
}

bool tensor_list_arg(PyObject* o, const char* fn, const char* what, bool optional,
                     std::vector<std::optional<at::Tensor>>* out) {
  return for_each_item(o, fn, what, [&](PyObject* item) {
    if (optional && item == Py_None) {
      out->emplace_back(std::nullopt);
      return true;
    }
    at::Tensor t;
    if (!tensor_arg(item, fn, what, &t)) return false;
    out->emplace_back(std::move(t));
    return true;
  });
}

bool int_list_arg(PyObject* o, const char* fn, const char* what, std::vector<int64_t>* out) {
  return for_each_item(o, fn, what, [&](PyObject* item) {
    const long long v = PyLong_AsLongLong(item);
    if (v == -1 && PyErr_Occurred()) return false;
    out->push_back(static_cast<int64_t>(v));
    return true;
  });
}

// cuda_min_smem_bytes(channels, acc_bytes) -> int: shared memory (bytes per block) of the
// smallest launch plan of the CUDA kernels for a chain of widths channels = [C_0, ..., C_L]
// (cuda/chain_limits.h).
PyObject* cuda_min_smem_bytes(PyObject*, PyObject* args) {
  PyObject* seq = nullptr;
  int acc_bytes = 0;
  if (!PyArg_ParseTuple(args, "Oi", &seq, &acc_bytes)) return nullptr;
  std::vector<int64_t> C;
  if (!int_list_arg(seq, "cuda_min_smem_bytes", "channels", &C)) return nullptr;
  if (C.size() < 2 || acc_bytes <= 0) {
    PyErr_SetString(PyExc_ValueError, "channels needs C_0 and at least one layer; acc_bytes > 0");
    return nullptr;
  }
  return PyLong_FromSize_t(igc::cuda::min_smem_bytes(C.data(), static_cast<int>(C.size() - 1),
                                                     static_cast<size_t>(acc_bytes)));
}

// Sets a Python exception from a C++ exception.
void set_python_error(const std::exception_ptr& err) {
  try {
    std::rethrow_exception(err);
  } catch (const c10::IndexError& e) {
    PyErr_SetString(PyExc_IndexError, e.what_without_backtrace());
  } catch (const c10::ValueError& e) {
    PyErr_SetString(PyExc_ValueError, e.what_without_backtrace());
  } catch (const c10::TypeError& e) {
    PyErr_SetString(PyExc_TypeError, e.what_without_backtrace());
  } catch (const c10::Error& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what_without_backtrace());
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what());
  }
}

// Runs f() with the GIL released; false (with the Python error set) when it threw.
template <typename F>
bool run_without_gil(F&& f) {
  std::exception_ptr err;
  Py_BEGIN_ALLOW_THREADS
  try {
    f();
  } catch (...) {
    err = std::current_exception();
  }
  Py_END_ALLOW_THREADS
  if (err) set_python_error(err);
  return !err;
}

// cpu_block_forward(x, weights, biases, groups, shuffles, perms, strides, activations,
// residual, input_index, packed=None) -> Tensor: igc::block_forward's CPU kernel called
// directly, without the dispatcher's argument boxing (about 15 us of a call at batch 1, where a
// whole block can take 100 us). The kernel validates every argument itself. packed: what
// cpu_block_pack returned for these weights and biases (the caller keeps it in step with
// them); it enables the channels-last tiles. For inference callers that have ruled out
// autograd, tracing, subclasses and dispatch modes (FusedBlock); it shows in profiles as
// igc::block_forward.
PyObject* cpu_block_forward(PyObject*, PyObject* args) {
  PyObject *ox, *ow, *ob, *og, *osh, *op, *ost, *oa, *oi, *opk = Py_None;
  int residual = 0;
  if (!PyArg_ParseTuple(args, "OOOOOOOOpO|O", &ox, &ow, &ob, &og, &osh, &op, &ost, &oa,
                        &residual, &oi, &opk))
    return nullptr;
  const char* fn = "cpu_block_forward";
  at::Tensor x;
  std::vector<std::optional<at::Tensor>> w_opt, b_opt, perm_opt;
  std::vector<int64_t> groups, shuffles, strides, acts;
  std::optional<at::Tensor> index;
  if (!tensor_arg(ox, fn, "x", &x) || !tensor_list_arg(ow, fn, "weights", false, &w_opt) ||
      !tensor_list_arg(ob, fn, "biases", false, &b_opt) ||
      !int_list_arg(og, fn, "groups", &groups) || !int_list_arg(osh, fn, "shuffles", &shuffles) ||
      !tensor_list_arg(op, fn, "perms", true, &perm_opt) ||
      !int_list_arg(ost, fn, "strides", &strides) || !int_list_arg(oa, fn, "activations", &acts))
    return nullptr;
  if (oi != Py_None) {
    at::Tensor t;
    if (!tensor_arg(oi, fn, "input_index", &t)) return nullptr;
    index = std::move(t);
  }
  std::vector<at::Tensor> weights, biases;
  for (auto& t : w_opt) weights.push_back(std::move(*t));
  for (auto& t : b_opt) biases.push_back(std::move(*t));
  igc::OptTensorList perms;
  for (auto& t : perm_opt) perms.push_back(std::move(t));
  std::vector<at::Tensor> packed;
  if (opk != Py_None) {
    std::vector<std::optional<at::Tensor>> pk_opt;
    if (!tensor_list_arg(opk, fn, "packed", true, &pk_opt)) return nullptr;
    for (auto& t : pk_opt) packed.push_back(t.has_value() ? std::move(*t) : at::Tensor());
  }
  at::Tensor y;
  if (!run_without_gil([&] {
        RECORD_FUNCTION("igc::block_forward", std::vector<c10::IValue>({x}));
        y = igc::block_forward_cpu_direct(x, weights, biases, groups, shuffles, perms, strides,
                                          acts, residual != 0, index,
                                          opk == Py_None ? nullptr : &packed);
      }))
    return nullptr;
  return THPVariable_Wrap(std::move(y));
}

// cpu_block_pack(weights, biases, groups) -> list: the packed weights of cpu_block_forward's
// channels-last tiles, one entry per layer (None for a spatial layer or a layer that is not
// float32). biases: as the op's (an empty list, or one entry per layer, (0,)-shaped for none).
PyObject* cpu_block_pack(PyObject*, PyObject* args) {
  PyObject *ow, *ob, *og;
  if (!PyArg_ParseTuple(args, "OOO", &ow, &ob, &og)) return nullptr;
  const char* fn = "cpu_block_pack";
  std::vector<std::optional<at::Tensor>> w_opt, b_opt;
  std::vector<int64_t> groups;
  if (!tensor_list_arg(ow, fn, "weights", false, &w_opt) ||
      !tensor_list_arg(ob, fn, "biases", false, &b_opt) ||
      !int_list_arg(og, fn, "groups", &groups))
    return nullptr;
  std::vector<at::Tensor> weights, biases, out;
  for (auto& t : w_opt) weights.push_back(std::move(*t));
  for (auto& t : b_opt) biases.push_back(std::move(*t));
  if (!run_without_gil([&] { out = igc::block_pack_cpu(weights, biases, groups); }))
    return nullptr;
  PyObject* list = PyList_New(static_cast<Py_ssize_t>(out.size()));
  if (list == nullptr) return nullptr;
  for (size_t i = 0; i < out.size(); ++i) {
    PyObject* item = nullptr;
    if (out[i].defined()) {
      item = THPVariable_Wrap(std::move(out[i]));
    } else {
      Py_INCREF(Py_None);
      item = Py_None;
    }
    PyList_SET_ITEM(list, static_cast<Py_ssize_t>(i), item);
  }
  return list;
}

PyObject* cache_bytes(PyObject*, PyObject*) {
  return PyLong_FromSize_t(igc::cpu_output_cache_bytes());
}

PyObject* cache_clear(PyObject*, PyObject*) {
  igc::cpu_output_cache_clear();
  Py_RETURN_NONE;
}

PyMethodDef methods[] = {
    {"cpu_block_forward", cpu_block_forward, METH_VARARGS,
     "cpu_block_forward(x, weights, biases, groups, shuffles, perms, strides, activations, "
     "residual, input_index, packed=None) -> Tensor: igc::block_forward's CPU kernel without the "
     "dispatcher (inference callers that have ruled out autograd, tracing and modes)."},
    {"cpu_block_pack", cpu_block_pack, METH_VARARGS,
     "cpu_block_pack(weights, biases, groups) -> list: packed weights for cpu_block_forward's "
     "channels-last tiles (None for layers they do not take)."},
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
