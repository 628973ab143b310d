// The time loops of the fused CfC kernel (cfc_rl/nn/cfc_fused.py) for the CPU.
//
// The Python kernel runs seven ATen operations per step forward and six backward; at RL sizes
// (8 samples, 64 units) each costs a few microseconds of dispatch for under a microsecond of
// arithmetic. Here each step is two matrix multiplies (at::mm_out, the same BLAS call as
// PyTorch's) and passes over the elements that do all the elementwise work at once: bias,
// activation, gates and state update forward; the gates' derivatives and the activation's
// backward.
//
// Those passes are written so that GCC vectorises them (-O3 -march=native -fno-trapping-math):
// in float, exp, tanh and erf are branch-free approximations accurate to a few units in the
// last place (fast_math.h); in double (gradcheck, tests) they are the C library's.
//
// Notation and the equations are those of cfc_fused.py; the weight gradients are computed
// there, after the loop, from the buffers these functions fill.

#include <torch/extension.h>

#include <ATen/Parallel.h>

#include "fast_math.h"

#include <cmath>
#include <cstdint>
#include <vector>

namespace {

using cfc_rl::Math;
using cfc_rl::sigmoid;

enum Mode : int64_t { kDefault = 0, kNoGate = 1, kPure = 2 };
enum Base : int64_t { kTanh = 0, kRelu = 1, kSilu = 2, kGelu = 3 };

// Rows (samples) per parallel task: small batches stay on the calling thread, where a task
// switch would cost more than the work.
constexpr int64_t kGrainElements = 1 << 15;

template <typename F>
void for_rows(int64_t rows, int64_t row_elements, const F& body) {
  const int64_t grain = std::max<int64_t>(1, kGrainElements / std::max<int64_t>(1, row_elements));
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) body(i);
  });
}

// p = a·(xw + p), then z = g(p), over n elements.
template <typename T>
void activate(Base base, T a, const T* __restrict xw, T* __restrict p, T* __restrict z,
              int64_t n) {
  for (int64_t k = 0; k < n; ++k) p[k] = a * (xw[k] + p[k]);
  switch (base) {
    case kTanh:
      for (int64_t k = 0; k < n; ++k) z[k] = Math<T>::tanh(p[k]);
      break;
    case kRelu:
      for (int64_t k = 0; k < n; ++k) z[k] = p[k] > T(0) ? p[k] : T(0);
      break;
    case kSilu:
      for (int64_t k = 0; k < n; ++k) z[k] = p[k] / (T(1) + Math<T>::exp(-p[k]));
      break;
    case kGelu:
      for (int64_t k = 0; k < n; ++k)
        z[k] = T(0.5) * p[k] * (T(1) + Math<T>::erf(p[k] * T(M_SQRT1_2)));
      break;
  }
}

// g[k] *= c · g'(p[k]), with z = g(p) (c: the scales of the activation).
template <typename T>
void scale_by_derivative(Base base, T c, const T* __restrict p, const T* __restrict z,
                         T* __restrict g, int64_t n) {
  switch (base) {
    case kTanh:
      for (int64_t k = 0; k < n; ++k) g[k] *= c * (T(1) - z[k] * z[k]);
      break;
    case kRelu:
      for (int64_t k = 0; k < n; ++k) g[k] *= p[k] > T(0) ? c : T(0);
      break;
    case kSilu:
      for (int64_t k = 0; k < n; ++k) {
        const T s = sigmoid(p[k]);
        g[k] *= c * s * (T(1) + p[k] * (T(1) - s));
      }
      break;
    case kGelu: {
      const T inv_sqrt_2pi = T(0.5) * T(M_2_SQRTPI) * T(M_SQRT1_2);
      for (int64_t k = 0; k < n; ++k) {
        const T cdf = T(0.5) * (T(1) + Math<T>::erf(p[k] * T(M_SQRT1_2)));
        g[k] *= c * (cdf + p[k] * Math<T>::exp(T(-0.5) * p[k] * p[k]) * inv_sqrt_2pi);
      }
      break;
    }
  }
}

// One sample's heads -> its new state. `head` holds the n_heads·H raw products z·W_heads^T on
// entry and b + c·(that) on exit (the backward pass reads them).
template <typename T>
void update_state(Mode mode, int64_t hidden, int64_t n_heads, T c, T ts, const T* __restrict bias,
                  const T* __restrict abs_tau, const T* __restrict big_a, T* __restrict head,
                  T* __restrict h) {
  for (int64_t k = 0; k < n_heads * hidden; ++k) head[k] = bias[k] + c * head[k];
  if (mode == kPure) {  // h = A - A·f·exp(-Δt·(|w_tau| + |f|))
    for (int64_t j = 0; j < hidden; ++j) {
      const T f = head[j];
      h[j] = big_a[j] - big_a[j] * f * Math<T>::exp(-ts * (abs_tau[j] + std::abs(f)));
    }
    return;
  }
  const T* __restrict ff1 = head;
  const T* __restrict ff2 = head + hidden;
  const T* __restrict t_a = head + 2 * hidden;
  const T* __restrict t_b = head + 3 * hidden;
  for (int64_t j = 0; j < hidden; ++j) {
    const T f1 = Math<T>::tanh(ff1[j]);
    const T f2 = Math<T>::tanh(ff2[j]);
    const T gate = sigmoid(t_a[j] * ts + t_b[j]);
    h[j] = mode == kDefault ? f1 + gate * (f2 - f1) : f1 + gate * f2;
  }
}

// dL/dheads for one sample and step: dL/dh_t times dh_t/dheads_t, the gates recomputed from
// the heads kept by the forward loop. Returns dL/dΔt of the step; `scratch` holds H numbers.
template <typename T>
T heads_gradient(Mode mode, int64_t hidden, T ts, const T* __restrict head,
                 const T* __restrict abs_tau, const T* __restrict big_a,
                 const T* __restrict grad_h, T* __restrict grad_head, T* __restrict scratch) {
  if (mode == kPure) {
    // h = A - A·f·e, e = exp(-Δt·(|w_tau| + |f|)): dh/df = -A·e·(1 - Δt·|f|) and
    // dh/dΔt = A·f·e·(|w_tau| + |f|).
    for (int64_t j = 0; j < hidden; ++j) {
      const T magnitude = std::abs(head[j]);
      const T rate = abs_tau[j] + magnitude;
      const T decay = Math<T>::exp(-ts * rate);
      grad_head[j] = -big_a[j] * decay * (T(1) - ts * magnitude) * grad_h[j];
      scratch[j] = big_a[j] * head[j] * decay * rate * grad_h[j];
    }
    return cfc_rl::sum(scratch, hidden);
  }
  for (int64_t j = 0; j < hidden; ++j) {
    const T f1 = Math<T>::tanh(head[j]);
    const T f2 = Math<T>::tanh(head[hidden + j]);
    const T t_a = head[2 * hidden + j];
    const T gate = sigmoid(t_a * ts + head[3 * hidden + j]);
    const T slope = gate * (T(1) - gate);
    const T g = grad_h[j];
    // default: h = f1 + gate·(f2 - f1); no_gate: h = f1 + gate·f2
    const T coef_ff1 = mode == kDefault ? (T(1) - gate) : T(1);
    const T coef_gate = (mode == kDefault ? f2 - f1 : f2) * slope;
    grad_head[j] = coef_ff1 * (T(1) - f1 * f1) * g;
    grad_head[hidden + j] = gate * (T(1) - f2 * f2) * g;
    grad_head[2 * hidden + j] = coef_gate * ts * g;
    grad_head[3 * hidden + j] = coef_gate * g;
  }
  // gate pre-activation = t_a·Δt + t_b: dL/dΔt = Σ dL/dt_b · t_a
  return cfc_rl::dot(grad_head + 3 * hidden, head + 2 * hidden, hidden);
}

void check_inputs(const at::Tensor& xw, const at::Tensor& h0, const at::Tensor& ts,
                  const at::Tensor& keep) {
  TORCH_CHECK(xw.device().is_cpu(), "cfc_cpu: tensors must be on the CPU");
  TORCH_CHECK(xw.dim() == 3 && xw.is_contiguous(), "cfc_cpu: xw must be contiguous (B, T, U)");
  TORCH_CHECK(h0.dim() == 2 && h0.size(0) == xw.size(0), "cfc_cpu: h0 must be (B, H)");
  TORCH_CHECK(ts.sizes() == xw.sizes().slice(0, 2) && ts.is_contiguous(),
              "cfc_cpu: timespans must be contiguous (B, T)");
  TORCH_CHECK(!keep.defined() || keep.numel() == 0 ||
                  (keep.sizes() == ts.sizes() && keep.is_contiguous()),
              "cfc_cpu: keep must be empty or contiguous (B, T)");
}

// The memory cell of mixed memory (an LSTM cell before the update) for one sample:
// z = xm + h·W_memory^T holds the raw product on entry and the pre-activations on exit (the
// backward pass reads them); c = c_in·σ(z_f) + tanh(z_c)·σ(z_i), r = tanh(c)·σ(z_o).
template <typename T>
void memory_step(int64_t hidden, const T* __restrict xm, T* __restrict z,
                 const T* __restrict c_in, T* __restrict c, T* __restrict r) {
  for (int64_t k = 0; k < 4 * hidden; ++k) z[k] += xm[k];
  for (int64_t j = 0; j < hidden; ++j) {
    const T cell = c_in[j] * sigmoid(z[2 * hidden + j]) +
                   Math<T>::tanh(z[j]) * sigmoid(z[hidden + j]);
    c[j] = cell;
    r[j] = Math<T>::tanh(cell) * sigmoid(z[3 * hidden + j]);
  }
}

// The memory cell's backward for one sample: given dL/dr and dL/dc (the cell state's gradient
// from the later steps, updated in place to dL/dc_in), fills dL/dz.
template <typename T>
void memory_gradient(int64_t hidden, const T* __restrict z, const T* __restrict c_in,
                     const T* __restrict c, const T* __restrict grad_r, T* __restrict grad_c,
                     T* __restrict grad_z) {
  for (int64_t j = 0; j < hidden; ++j) {
    const T candidate = Math<T>::tanh(z[j]);
    const T input_gate = sigmoid(z[hidden + j]);
    const T forget_gate = sigmoid(z[2 * hidden + j]);
    const T output_gate = sigmoid(z[3 * hidden + j]);
    const T cell_tanh = Math<T>::tanh(c[j]);
    const T g = grad_c[j] + grad_r[j] * output_gate * (T(1) - cell_tanh * cell_tanh);
    grad_z[j] = g * input_gate * (T(1) - candidate * candidate);
    grad_z[hidden + j] = g * candidate * input_gate * (T(1) - input_gate);
    grad_z[2 * hidden + j] = g * c_in[j] * forget_gate * (T(1) - forget_gate);
    grad_z[3 * hidden + j] = grad_r[j] * cell_tanh * output_gate * (T(1) - output_gate);
    grad_c[j] = g * forget_gate;
  }
}

// dst = src·keep (per sample, keep[i·stride]): the state a step starts from, zeroed where a
// reset comes.
template <typename T>
void mask_rows(const T* __restrict src, const T* __restrict keep, int64_t stride,
               T* __restrict dst, int64_t batch, int64_t width) {
  for (int64_t i = 0; i < batch; ++i)
    for (int64_t j = 0; j < width; ++j) dst[i * width + j] = src[i * width + j] * keep[i * stride];
}

bool given(const at::Tensor& tensor) { return tensor.defined() && tensor.numel() > 0; }

}  // namespace

// The forward loop. The inputs are batch major: xw (B, T, U), timespans and keep (B, T) (keep:
// 0 where a reset zeroes the state before the step; empty without resets), and with mixed
// memory xm (B, T, 4H), the memory cell's input projection (forget-gate offset included), c0
// its initial cell state and w_memory (4H, H) its recurrent weight (empty tensors without it).
// Returns the outputs y (B, T, H) and, time major for the backward pass, states (T+1, B, H),
// pres (T, B, U), acts (T, B, U), heads (T, B, n_heads·H), and with mixed memory cells
// (T+1, B, H), memory_out (T, B, H), memory_pre (T, B, 4H), else three empty tensors. With
// record=false the buffers other than y, states and cells are one step long (scratch), and so
// is pres with a tanh activation, whose derivative the backward pass takes from acts alone.
std::vector<at::Tensor> cfc_forward(const at::Tensor& xw, const at::Tensor& h0,
                                    const at::Tensor& ts, const at::Tensor& keep,
                                    const at::Tensor& w_rec, const at::Tensor& w_heads,
                                    const at::Tensor& b_heads, const at::Tensor& abs_tau,
                                    const at::Tensor& big_a, int64_t mode, int64_t base, double a,
                                    double c, const at::Tensor& xm, const at::Tensor& c0,
                                    const at::Tensor& w_memory, bool record) {
  check_inputs(xw, h0, ts, keep);
  const bool memory = given(xm);
  TORCH_CHECK(!memory || (xm.is_contiguous() && xm.size(0) == xw.size(0) &&
                          xm.size(1) == xw.size(1) && xm.size(2) == 4 * h0.size(1) &&
                          c0.sizes() == h0.sizes()),
              "cfc_cpu: xm must be contiguous (B, T, 4H) and c0 (B, H)");
  at::NoGradGuard no_grad;
  const int64_t batch = xw.size(0), steps = xw.size(1), units = xw.size(2);
  const int64_t hidden = h0.size(1), n_heads_h = w_heads.size(0);
  const int64_t n_heads = n_heads_h / hidden;
  const bool masked = given(keep);
  const int64_t kept = record ? steps : 1;
  const auto options = xw.options();
  auto y = at::empty({batch, steps, hidden}, options);
  auto states = at::empty({steps + 1, batch, hidden}, options);
  const int64_t kept_pres = base == kTanh ? 1 : kept;
  auto pres = at::empty({kept_pres, batch, units}, options);
  auto acts = at::empty({kept, batch, units}, options);
  auto heads = at::empty({kept, batch, n_heads_h}, options);
  auto h_in = at::empty({batch, hidden}, options);
  auto cells = at::empty({memory ? steps + 1 : 0, batch, hidden}, options);
  auto memory_out = at::empty({memory ? kept : 0, batch, hidden}, options);
  auto memory_pre = at::empty({memory ? kept : 0, batch, 4 * hidden}, options);
  auto c_in = at::empty({memory ? batch : 0, hidden}, options);
  states[0].copy_(h0);
  if (memory) cells[0].copy_(c0);
  // Per-step views made once: select() in the loop would cost a tensor allocation each time.
  auto state_s = states.unbind(0), pre_s = pres.unbind(0), act_s = acts.unbind(0);
  auto head_s = heads.unbind(0), memory_out_s = memory_out.unbind(0);
  auto memory_pre_s = memory_pre.unbind(0);
  // Transposed into contiguous copies for sequences: MKL's small-batch multiply is about twice
  // as fast with a contiguous right-hand matrix as with a transposed view, which pays for the
  // copy from the second step on.
  const auto transposed = [steps](const at::Tensor& w) {
    return steps > 1 ? w.t().contiguous() : w.t();
  };
  const auto w_rec_t = transposed(w_rec);
  const auto w_heads_t = transposed(w_heads);
  const auto w_memory_t = memory ? transposed(w_memory) : w_memory;
  const auto bias = b_heads.contiguous();
  const auto tau = mode == kPure ? abs_tau.contiguous() : abs_tau;
  const auto amplitude = mode == kPure ? big_a.contiguous() : big_a;

  AT_DISPATCH_FLOATING_TYPES(xw.scalar_type(), "cfc_forward", [&] {
    using T = scalar_t;
    const T* ts_p = ts.data_ptr<T>();
    const T* keep_p = masked ? keep.data_ptr<T>() : nullptr;
    const T* bias_p = bias.data_ptr<T>();
    const T* xw_p = xw.data_ptr<T>();
    const T* xm_p = memory ? xm.data_ptr<T>() : nullptr;
    const T* tau_p = mode == kPure ? tau.data_ptr<T>() : nullptr;
    const T* a_p = mode == kPure ? amplitude.data_ptr<T>() : nullptr;
    for (int64_t t = 0; t < steps; ++t) {
      const int64_t s = record ? t : 0;
      at::Tensor h = state_s[t];
      if (masked) {  // a reset zeroes the state before this step
        mask_rows(h.data_ptr<T>(), keep_p + t, steps, h_in.data_ptr<T>(), batch, hidden);
        h = h_in;
      }
      if (memory) {
        const T* cell_p = cells.data_ptr<T>() + t * batch * hidden;
        if (masked) {
          mask_rows(cell_p, keep_p + t, steps, c_in.data_ptr<T>(), batch, hidden);
          cell_p = c_in.data_ptr<T>();
        }
        at::Tensor& z = memory_pre_s[s];
        at::mm_out(z, h, w_memory_t);
        T* z_p = z.data_ptr<T>();
        T* next_cell_p = cells.data_ptr<T>() + (t + 1) * batch * hidden;
        T* r_p = memory_out_s[s].data_ptr<T>();
        for_rows(batch, 4 * hidden, [&](int64_t i) {
          memory_step<T>(hidden, xm_p + (i * steps + t) * 4 * hidden, z_p + i * 4 * hidden,
                         cell_p + i * hidden, next_cell_p + i * hidden, r_p + i * hidden);
        });
        h = memory_out_s[s];  // the backbone reads the memory cell's output
      }
      at::Tensor &pre = pre_s[kept_pres > 1 ? t : 0], &act = act_s[s], &head = head_s[s];
      // p = a·(xw + h·W_rec^T): mm and the elementwise pass rather than addmm, whose bias
      // costs more than the pass.
      at::mm_out(pre, h, w_rec_t);
      T* pre_p = pre.data_ptr<T>();
      T* act_p = act.data_ptr<T>();
      for_rows(batch, units, [&](int64_t i) {
        activate(static_cast<Base>(base), T(a), xw_p + (i * steps + t) * units,
                 pre_p + i * units, act_p + i * units, units);
      });
      at::mm_out(head, act, w_heads_t);
      T* head_p = head.data_ptr<T>();
      T* next_p = state_s[t + 1].data_ptr<T>();
      T* y_p = y.data_ptr<T>();
      for_rows(batch, n_heads_h, [&](int64_t i) {
        T* h_new = next_p + i * hidden;
        update_state<T>(static_cast<Mode>(mode), hidden, n_heads, T(c), ts_p[i * steps + t],
                        bias_p, tau_p, a_p, head_p + i * n_heads_h, h_new);
        T* out = y_p + (i * steps + t) * hidden;
        for (int64_t j = 0; j < hidden; ++j) out[j] = h_new[j];
      });
    }
  });
  return {y, states, pres, acts, heads, cells, memory_out, memory_pre};
}

// The backward loop through time, for the forward loop's inputs and buffers and the outputs'
// gradient grad_y (B, T, H). Fills grad_heads (T, B, n_heads·H) = dL/dheads,
// grad_xw (T, B, U) = dL/dxw = a·dL/dp, in pure mode grad_states (T, B, H) = dL/dh_t (the total
// gradient of each state) and with mixed memory grad_memory_pre (T, B, 4H) = dL/dz. Returns
// dL/dh0, dL/dc0 with mixed memory (grad_cell: dL/dc_T on entry; else empty), dL/dΔt (B, T)
// and dL/db_heads, the sum of grad_heads over steps and samples (accumulated in double).
std::vector<at::Tensor> cfc_backward(
    const at::Tensor& grad_y, const at::Tensor& heads, const at::Tensor& pres,
    const at::Tensor& acts, const at::Tensor& ts, const at::Tensor& keep, const at::Tensor& w_rec,
    const at::Tensor& w_heads, const at::Tensor& /*b_heads: the kept heads include it*/,
    const at::Tensor& abs_tau, const at::Tensor& big_a, int64_t mode, int64_t base, double a,
    double c, const at::Tensor& memory_pre, const at::Tensor& cells, const at::Tensor& w_memory,
    const at::Tensor& grad_cell, at::Tensor grad_heads, at::Tensor grad_pres,
    at::Tensor grad_states, at::Tensor grad_memory_pre) {
  // grad_pres receives dL/dxw: the backbone's inner scale a is folded into the activation's
  // derivative, so that dL/dxw·W_rec is dL/d(backbone input) with no further pass.
  at::NoGradGuard no_grad;
  // pres: (T, B, U), or empty with a tanh activation (not needed).
  const int64_t steps = acts.size(0), batch = acts.size(1), units = acts.size(2);
  const int64_t hidden = grad_y.size(2), n_heads_h = heads.size(2);
  TORCH_CHECK(grad_y.size(0) == batch && grad_y.size(1) == steps,
              "cfc_cpu: grad_y must be (B, T, H)");
  TORCH_CHECK(ts.is_contiguous() && ts.size(0) == batch && ts.size(1) == steps &&
                  (!given(keep) || (keep.is_contiguous() && keep.sizes() == ts.sizes())),
              "cfc_cpu: timespans and keep must be contiguous (B, T)");
  const bool masked = given(keep), memory = given(memory_pre);
  TORCH_CHECK(base == kTanh || pres.sizes() == acts.sizes(),
              "cfc_cpu: pres must be (T, B, U) for an activation other than tanh");
  TORCH_CHECK(grad_y.is_contiguous() && heads.is_contiguous() && pres.is_contiguous() &&
                  acts.is_contiguous() && grad_heads.is_contiguous() &&
                  grad_pres.is_contiguous() && (mode != kPure || grad_states.is_contiguous()) &&
                  (!memory || (memory_pre.is_contiguous() && cells.is_contiguous() &&
                               grad_memory_pre.is_contiguous())),
              "cfc_cpu: backward buffers must be contiguous");
  const auto tau = mode == kPure ? abs_tau.contiguous() : abs_tau;
  const auto amplitude = mode == kPure ? big_a.contiguous() : big_a;
  const auto options = grad_y.options();
  auto grad_h = grad_y.select(1, steps - 1).contiguous();
  auto grad_c = memory ? grad_cell.clone() : at::empty({0}, options);
  auto grad_rec = at::empty({batch, hidden}, options);
  auto grad_memory_in = at::empty({memory ? batch : 0, hidden}, options);
  auto c_in = at::empty({memory ? batch : 0, hidden}, options);
  auto grad_head_s = grad_heads.unbind(0), grad_pre_s = grad_pres.unbind(0);
  auto grad_memory_pre_s = grad_memory_pre.unbind(0);
  auto grad_timespans = at::empty({batch, steps}, options);
  auto grad_bias = at::zeros({n_heads_h}, options.dtype(at::kDouble));
  auto scratch = at::empty({batch, hidden}, options);

  AT_DISPATCH_FLOATING_TYPES(grad_y.scalar_type(), "cfc_backward", [&] {
    using T = scalar_t;
    const T* ts_p = ts.data_ptr<T>();
    const T* keep_p = masked ? keep.data_ptr<T>() : nullptr;
    const T* tau_p = mode == kPure ? tau.data_ptr<T>() : nullptr;
    const T* a_p = mode == kPure ? amplitude.data_ptr<T>() : nullptr;
    const T* grad_y_p = grad_y.data_ptr<T>();
    for (int64_t t = steps - 1; t >= 0; --t) {
      T* grad_h_p = grad_h.data_ptr<T>();
      if (mode == kPure) {
        T* out = grad_states.data_ptr<T>() + t * batch * hidden;
        for (int64_t k = 0; k < batch * hidden; ++k) out[k] = grad_h_p[k];
      }
      const T* head_p = heads.data_ptr<T>() + t * batch * n_heads_h;
      T* grad_head_p = grad_heads.data_ptr<T>() + t * batch * n_heads_h;
      T* grad_ts_p = grad_timespans.data_ptr<T>();
      T* scratch_p = scratch.data_ptr<T>();
      for_rows(batch, n_heads_h, [&](int64_t i) {
        grad_ts_p[i * steps + t] = heads_gradient<T>(
            static_cast<Mode>(mode), hidden, ts_p[i * steps + t],
                                         head_p + i * n_heads_h, tau_p, a_p,
                                         grad_h_p + i * hidden, grad_head_p + i * n_heads_h,
                                         scratch_p + i * hidden);
      });
      // dL/db_heads while this step's gradients are in cache (in double: T·B terms).
      double* bias_p = grad_bias.data_ptr<double>();
      for (int64_t i = 0; i < batch; ++i)
        for (int64_t k = 0; k < n_heads_h; ++k) bias_p[k] += grad_head_p[i * n_heads_h + k];
      at::Tensor& grad_pre = grad_pre_s[t];
      at::mm_out(grad_pre, grad_head_s[t], w_heads);
      scale_by_derivative(static_cast<Base>(base), T(a * c),
                          base == kTanh ? nullptr : pres.data_ptr<T>() + t * batch * units,
                          acts.data_ptr<T>() + t * batch * units, grad_pre.data_ptr<T>(),
                          batch * units);
      at::mm_out(grad_rec, grad_pre, w_rec);  // dL/d(backbone input)
      T* rec_p = grad_rec.data_ptr<T>();
      if (memory) {  // through the memory cell to the state it started from
        const T* cell_p = cells.data_ptr<T>() + t * batch * hidden;
        if (masked) {
          mask_rows(cell_p, keep_p + t, steps, c_in.data_ptr<T>(), batch, hidden);
          cell_p = c_in.data_ptr<T>();
        }
        const T* z_p = memory_pre.data_ptr<T>() + t * batch * 4 * hidden;
        const T* next_cell_p = cells.data_ptr<T>() + (t + 1) * batch * hidden;
        T* grad_c_p = grad_c.data_ptr<T>();
        T* grad_z_p = grad_memory_pre.data_ptr<T>() + t * batch * 4 * hidden;
        for_rows(batch, 4 * hidden, [&](int64_t i) {
          memory_gradient<T>(hidden, z_p + i * 4 * hidden, cell_p + i * hidden,
                             next_cell_p + i * hidden, rec_p + i * hidden, grad_c_p + i * hidden,
                             grad_z_p + i * 4 * hidden);
        });
        at::mm_out(grad_memory_in, grad_memory_pre_s[t], w_memory);
        rec_p = grad_memory_in.data_ptr<T>();
        if (masked) {
          for (int64_t i = 0; i < batch; ++i)
            for (int64_t j = 0; j < hidden; ++j) grad_c_p[i * hidden + j] *= keep_p[i * steps + t];
        }
      }
      // dL/dh_{t-1} = dL/d(masked h_{t-1})·keep_t + dL/dy_{t-1}
      for (int64_t i = 0; i < batch; ++i) {
        const T scale = masked ? keep_p[i * steps + t] : T(1);
        const T* previous = grad_y_p + (i * steps + t - 1) * hidden;
        T* out = grad_h_p + i * hidden;
        const T* rec = rec_p + i * hidden;
        if (t > 0)
          for (int64_t j = 0; j < hidden; ++j) out[j] = scale * rec[j] + previous[j];
        else
          for (int64_t j = 0; j < hidden; ++j) out[j] = scale * rec[j];
      }
    }
  });
  return {grad_h, grad_c, grad_timespans, grad_bias.to(grad_y.scalar_type())};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &cfc_forward, "CfC forward loop (CPU)");
  m.def("backward", &cfc_backward, "CfC backward loop through time (CPU)");
}
