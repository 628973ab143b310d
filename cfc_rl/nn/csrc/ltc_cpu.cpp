// The synapse reductions of the LTC cell (cfc_rl/nn/ltc.py) for the CPU.
//
// For each sample, with j the presynaptic neuron or input (the rows of the (M, N) parameters)
// and i the postsynaptic neuron (their columns, contiguous in memory):
//
//     a_ji  = sigmoid(sigma_ji · v_j + offset_ji)
//     num_i = Σ_j a_ji · w_erev_ji
//     den_i = Σ_j a_ji · w_ji
//
// The recurrent synapses (M = N, v the state) run ode_unfolds times per time step (four times
// as often with rk4); the sensory synapses (M inputs, v the mapped inputs) once per sequence,
// all steps as one batch. ATen evaluates a reduction as passes over a (B, M, N) tensor
// (activation, two products, two sums) and autograd keeps the activation and both products for
// the backward pass: the cell's time goes into memory traffic. Here the forward pass is one
// pass over the parameters per sample that keeps no (B, M, N) buffer at all, and the backward
// pass one pass per presynaptic row that recomputes the sigmoid instead of reading it back.
//
// The innermost loops run over the contiguous index i and are written so that GCC vectorises
// them (-O3 -march=native -fno-trapping-math): in float, exp is a branch-free approximation
// accurate to a few units in the last place (fast_math.h); in double (gradcheck, tests) it is the C
// library's.

#include <torch/extension.h>

#include <ATen/Parallel.h>

#include "fast_math.h"

#include <cmath>
#include <cstdint>
#include <vector>

namespace {

// Elements per parallel task: small batches stay on the calling thread, where a task switch
// would cost more than the work.
constexpr int64_t kGrainElements = 1 << 15;

int64_t grain(int64_t task_elements) {
  return std::max<int64_t>(1, kGrainElements / std::max<int64_t>(1, task_elements));
}

using cfc_rl::sigmoid;
using cfc_rl::sum;

// One presynaptic row j's contribution to one sample: num += a·w_erev, den += a·w.
template <typename T>
void accumulate_row(int64_t n, T v_j, const T* __restrict sigma, const T* __restrict offset,
                    const T* __restrict w, const T* __restrict w_erev, T* __restrict num,
                    T* __restrict den) {
  for (int64_t i = 0; i < n; ++i) {
    const T a = sigmoid(sigma[i] * v_j + offset[i]);
    num[i] += a * w_erev[i];
    den[i] += a * w[i];
  }
}

// One presynaptic row j and one sample: the row's parameter gradients accumulate this
// sample's share, and `scratch` receives dL/dz_ji · sigma_ji (z = sigma·v + offset), whose
// sum over i is dL/dv_j.
template <typename T>
void gradient_row(int64_t n, T v_j, const T* __restrict grad_num, const T* __restrict grad_den,
                  const T* __restrict sigma, const T* __restrict offset, const T* __restrict w,
                  const T* __restrict w_erev, T* __restrict grad_sigma, T* __restrict grad_offset,
                  T* __restrict grad_w, T* __restrict grad_w_erev, T* __restrict scratch) {
  for (int64_t i = 0; i < n; ++i) {
    const T a = sigmoid(sigma[i] * v_j + offset[i]);
    const T grad_z = (grad_num[i] * w_erev[i] + grad_den[i] * w[i]) * a * (T(1) - a);
    grad_w_erev[i] += grad_num[i] * a;
    grad_w[i] += grad_den[i] * a;
    grad_offset[i] += grad_z;
    grad_sigma[i] += grad_z * v_j;
    scratch[i] = grad_z * sigma[i];
  }
}

void check_inputs(const char* where, const at::Tensor& v,
                  std::initializer_list<const at::Tensor*> parameters) {
  TORCH_CHECK(v.device().is_cpu(), "ltc_cpu.", where, ": tensors must be on the CPU");
  TORCH_CHECK(v.dim() == 2 && v.is_contiguous(), "ltc_cpu.", where,
              ": v must be a contiguous (B, M) tensor, got shape ", v.sizes());
  const at::Tensor& sigma = **parameters.begin();
  TORCH_CHECK(sigma.dim() == 2 && sigma.size(0) == v.size(1), "ltc_cpu.", where,
              ": sigma must be (M, N) with M = ", v.size(1), " (v's second dimension), got shape ",
              sigma.sizes());
  for (const at::Tensor* t : parameters) {
    TORCH_CHECK(t->device().is_cpu(), "ltc_cpu.", where, ": tensors must be on the CPU");
    TORCH_CHECK(t->scalar_type() == v.scalar_type(), "ltc_cpu.", where,
                ": all tensors must have v's dtype ", v.scalar_type(), ", got ",
                t->scalar_type());
    TORCH_CHECK(t->sizes() == sigma.sizes() && t->is_contiguous(), "ltc_cpu.", where,
                ": sigma, offset, w and w_erev must be contiguous and of one shape (M, N), got ",
                sigma.sizes(), " and ", t->sizes());
  }
}

}  // namespace

// (num, den), each (B, N), for v (B, M) and parameters (M, N).
std::vector<at::Tensor> ltc_forward(const at::Tensor& v, const at::Tensor& sigma,
                                    const at::Tensor& offset, const at::Tensor& w,
                                    const at::Tensor& w_erev) {
  check_inputs("forward", v, {&sigma, &offset, &w, &w_erev});
  const int64_t batch = v.size(0), m = sigma.size(0), n = sigma.size(1);
  auto num = at::zeros({batch, n}, v.options());
  auto den = at::zeros({batch, n}, v.options());
  AT_DISPATCH_FLOATING_TYPES(v.scalar_type(), "ltc_forward", [&] {
    using T = scalar_t;
    const T* v_p = v.data_ptr<T>();
    const T* sigma_p = sigma.data_ptr<T>();
    const T* offset_p = offset.data_ptr<T>();
    const T* w_p = w.data_ptr<T>();
    const T* w_erev_p = w_erev.data_ptr<T>();
    T* num_p = num.data_ptr<T>();
    T* den_p = den.data_ptr<T>();
    // Samples are independent: each task owns its rows of num and den.
    at::parallel_for(0, batch, grain(m * n), [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        for (int64_t j = 0; j < m; ++j) {
          const int64_t row = j * n;
          accumulate_row<T>(n, v_p[b * m + j], sigma_p + row, offset_p + row, w_p + row,
                            w_erev_p + row, num_p + b * n, den_p + b * n);
        }
      }
    });
  });
  return {num, den};
}

// (grad_v (B, M), grad_sigma, grad_offset, grad_w, grad_w_erev ((M, N) each, summed over the
// batch)) from dL/dnum and dL/dden (B, N).
std::vector<at::Tensor> ltc_backward(const at::Tensor& grad_num, const at::Tensor& grad_den,
                                     const at::Tensor& v, const at::Tensor& sigma,
                                     const at::Tensor& offset, const at::Tensor& w,
                                     const at::Tensor& w_erev) {
  check_inputs("backward", v, {&sigma, &offset, &w, &w_erev});
  const int64_t batch = v.size(0), m = sigma.size(0), n = sigma.size(1);
  for (const at::Tensor* grad : {&grad_num, &grad_den}) {
    TORCH_CHECK(grad->dim() == 2 && grad->size(0) == batch && grad->size(1) == n &&
                    grad->is_contiguous(),
                "ltc_cpu.backward: grad_num and grad_den must be contiguous (B, N) = (", batch,
                ", ", n, "), got shape ", grad->sizes());
    TORCH_CHECK(grad->scalar_type() == v.scalar_type(),
                "ltc_cpu.backward: grad_num and grad_den must have v's dtype ", v.scalar_type(),
                ", got ", grad->scalar_type());
  }
  auto grad_v = at::empty_like(v);
  auto grad_sigma = at::zeros_like(sigma);
  auto grad_offset = at::zeros_like(sigma);
  auto grad_w = at::zeros_like(sigma);
  auto grad_w_erev = at::zeros_like(sigma);
  AT_DISPATCH_FLOATING_TYPES(v.scalar_type(), "ltc_backward", [&] {
    using T = scalar_t;
    const T* grad_num_p = grad_num.data_ptr<T>();
    const T* grad_den_p = grad_den.data_ptr<T>();
    const T* v_p = v.data_ptr<T>();
    const T* sigma_p = sigma.data_ptr<T>();
    const T* offset_p = offset.data_ptr<T>();
    const T* w_p = w.data_ptr<T>();
    const T* w_erev_p = w_erev.data_ptr<T>();
    T* grad_v_p = grad_v.data_ptr<T>();
    T* grad_sigma_p = grad_sigma.data_ptr<T>();
    T* grad_offset_p = grad_offset.data_ptr<T>();
    T* grad_w_p = grad_w.data_ptr<T>();
    T* grad_w_erev_p = grad_w_erev.data_ptr<T>();
    // Tasks over the presynaptic rows: each owns its rows of the weight gradients and its
    // columns of grad_v, so nothing is shared between them and no per-thread copies are
    // summed. Within a task, the samples run inside: a row's parameters and gradient
    // accumulators stay in L1 while the samples stream past.
    at::parallel_for(0, m, grain(batch * n), [&](int64_t begin, int64_t end) {
      std::vector<T> scratch(n);
      for (int64_t j = begin; j < end; ++j) {
        const int64_t row = j * n;
        for (int64_t b = 0; b < batch; ++b) {
          gradient_row<T>(n, v_p[b * m + j], grad_num_p + b * n, grad_den_p + b * n,
                          sigma_p + row, offset_p + row, w_p + row, w_erev_p + row,
                          grad_sigma_p + row, grad_offset_p + row, grad_w_p + row,
                          grad_w_erev_p + row, scratch.data());
          grad_v_p[b * m + j] = sum(scratch.data(), n);
        }
      }
    });
  });
  return {grad_v, grad_sigma, grad_offset, grad_w, grad_w_erev};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &ltc_forward, "LTC synapses forward (CPU): (num, den)", py::arg("v"),
        py::arg("sigma"), py::arg("offset"), py::arg("w"), py::arg("w_erev"));
  m.def("backward", &ltc_backward,
        "LTC synapses backward (CPU): (grad_v, grad_sigma, grad_offset, grad_w, grad_w_erev)",
        py::arg("grad_num"), py::arg("grad_den"), py::arg("v"), py::arg("sigma"),
        py::arg("offset"), py::arg("w"), py::arg("w_erev"));
}
