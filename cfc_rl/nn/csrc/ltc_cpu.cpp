// The LTC cell (cfc_rl/nn/ltc.py) on the CPU: its synapse sums, and whole sequences of its
// reference solver.
//
// Synapses. For each sample, with j the presynaptic neuron or input (the rows of a synapse
// matrix) and i the postsynaptic neuron (its columns):
//
//     a_ji  = sigmoid(sigma_ji · v_j + offset_ji)
//     num_i = Σ_j a_ji · w_erev_ji
//     den_i = Σ_j a_ji · w_ji
//
// The parameters are (M, N) matrices, row-major; a wiring's absent synapses have w = w_erev = 0.
// Each row j may come with a column range [lo_j, hi_j) that holds all of its synapses: the loops
// then skip the columns outside it. A wired LTC's rows reach only the next layer of its circuit
// (an NCP(64) has 483 synapses of 4096 pairs; its ranges, rounded out to whole vector widths,
// cover about a third of the pairs), so it costs a fraction of a dense one, at the dense loops'
// speed per pair: contiguous and vectorised, no gather, no scatter. Without ranges every row
// spans all N columns.
//
// Sequences ("fused" solver, no mixed memory). Per time step t, after zeroing the state of the
// samples that reset, ode_unfolds times:
//
//     v ← (cm·v + δ·(leak + num + num_s)) / (cm + δ·(gleak + den + den_s + ε)),  δ = Δt/unfolds
//
// where num_s, den_s are the sensory synapses' sums (one batch of all steps, computed before).
// One call runs the whole sequence, so the cell's time goes into the synapses and not into
// per-operation dispatch and autograd bookkeeping (ode_unfolds · T steps of ~10 operations
// each). The forward pass keeps v, num and den before every unfold (3 · T · unfolds · B · N
// numbers, never B · N · N); the backward pass goes back through time from them and recomputes
// the sigmoids.
//
// The innermost loops run over contiguous memory and are written so that GCC vectorises them
// (-O3 -march=native -fno-trapping-math): in float, exp is a branch-free approximation accurate
// to a few units in the last place (fast_math.h); in double (gradcheck, tests) it is the C
// library's.

#include <torch/extension.h>

#include <ATen/Parallel.h>

#include "fast_math.h"

#include <algorithm>
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

using cfc_rl::sigmoid_of_sum;
using cfc_rl::sum;

// A synapse matrix of m rows (presynaptic) and n columns (postsynaptic), row-major, with the
// column range of each row (none: all columns).
template <typename T>
struct Synapses {
  int64_t m = 0, n = 0;
  const int64_t* lo = nullptr;  // first column of each row's range; null: 0
  const int64_t* hi = nullptr;  // one past its last; null: n
  const T* sigma = nullptr;
  const T* offset = nullptr;
  const T* w = nullptr;
  const T* w_erev = nullptr;

  int64_t first(int64_t j) const { return lo == nullptr ? 0 : lo[j]; }
  int64_t last(int64_t j) const { return hi == nullptr ? n : hi[j]; }
};

// The gradients of a synapse matrix's parameters, (m, n) each.
template <typename T>
struct SynapseGradients {
  T* sigma;
  T* offset;
  T* w;
  T* w_erev;
};

// One row j's contribution to one sample over a column range: num += a·w_erev, den += a·w.
template <typename T>
void accumulate_row(int64_t len, T v_j, const T* __restrict sigma, const T* __restrict offset,
                    const T* __restrict w, const T* __restrict w_erev, T* __restrict num,
                    T* __restrict den) {
  for (int64_t i = 0; i < len; ++i) {
    const T a = sigmoid_of_sum(sigma[i] * v_j + offset[i]);
    num[i] += a * w_erev[i];
    den[i] += a * w[i];
  }
}

// num and den (n each) of one sample with presynaptic values v (m).
template <typename T>
void synapses_of_sample(const Synapses<T>& s, const T* v, T* num, T* den) {
  std::fill(num, num + s.n, T(0));
  std::fill(den, den + s.n, T(0));
  for (int64_t j = 0; j < s.m; ++j) {
    const int64_t lo = s.first(j), at = j * s.n + lo;
    accumulate_row<T>(s.last(j) - lo, v[j], s.sigma + at, s.offset + at, s.w + at, s.w_erev + at,
                      num + lo, den + lo);
  }
}

// One row's column range and kBlock samples (grad_num and grad_den: kBlock rows `stride`
// apart): the row's parameter gradients accumulate these samples' share, and `scratch` (kBlock
// rows of len) receives dL/dz · sigma (z = sigma·v + offset), whose sums over the columns are
// each sample's dL/dv_j. The row's parameters are loaded, and its gradient accumulators loaded
// and stored, once per block instead of once per sample; the loop over the block is unrolled,
// so that GCC vectorises the loop over the columns. (Summing dL/dv_j in that loop instead,
// with `omp simd` reductions, measured slower.)
template <typename T, int kBlock>
void gradient_row_block(int64_t len, const T* __restrict v_j, const T* __restrict grad_num,
                        const T* __restrict grad_den, int64_t stride, const T* __restrict sigma,
                        const T* __restrict offset, const T* __restrict w,
                        const T* __restrict w_erev, T* __restrict grad_sigma,
                        T* __restrict grad_offset, T* __restrict grad_w,
                        T* __restrict grad_w_erev, T* __restrict scratch) {
  for (int64_t k = 0; k < len; ++k) {
    T g_sigma = T(0), g_offset = T(0), g_w = T(0), g_w_erev = T(0);
#pragma GCC unroll 8
    for (int b = 0; b < kBlock; ++b) {
      const T gn = grad_num[b * stride + k], gd = grad_den[b * stride + k];
      const T a = sigmoid_of_sum(sigma[k] * v_j[b] + offset[k]);
      const T grad_z = (gn * w_erev[k] + gd * w[k]) * a * (T(1) - a);
      g_w_erev += gn * a;
      g_w += gd * a;
      g_offset += grad_z;
      g_sigma += grad_z * v_j[b];
      scratch[b * len + k] = grad_z * sigma[k];
    }
    grad_w_erev[k] += g_w_erev;
    grad_w[k] += g_w;
    grad_offset[k] += g_offset;
    grad_sigma[k] += g_sigma;
  }
}

// The backward pass of the synapse sums of a batch: grad_v (B, m) is written, the parameter
// gradients accumulate. v, grad_num and grad_den are (B, m), (B, n), (B, n), row-major.
//
// Tasks over the presynaptic rows: each owns its rows of the parameter gradients and its
// columns of grad_v, so nothing is shared between them and no per-thread copies are summed
// (any thread count gives the same bits). Within a task the samples run inside, in blocks: a
// row's parameters and gradient accumulators stay in L1 while the samples stream past.
template <typename T>
void synapses_backward(const Synapses<T>& s, int64_t batch, const T* v, const T* grad_num,
                       const T* grad_den, T* grad_v, const SynapseGradients<T>& g) {
  constexpr int kBlock = 4;
  at::parallel_for(0, s.m, grain(batch * s.n), [&](int64_t first, int64_t last) {
    std::vector<T> scratch(kBlock * s.n);
    T v_block[kBlock];
    for (int64_t j = first; j < last; ++j) {
      const int64_t lo = s.first(j), len = s.last(j) - lo, at = j * s.n + lo;
      int64_t b = 0;
      for (; b + kBlock <= batch; b += kBlock) {
        for (int k = 0; k < kBlock; ++k) v_block[k] = v[(b + k) * s.m + j];
        gradient_row_block<T, kBlock>(len, v_block, grad_num + b * s.n + lo,
                                      grad_den + b * s.n + lo, s.n, s.sigma + at, s.offset + at,
                                      s.w + at, s.w_erev + at, g.sigma + at, g.offset + at,
                                      g.w + at, g.w_erev + at, scratch.data());
        for (int k = 0; k < kBlock; ++k) grad_v[(b + k) * s.m + j] = sum(&scratch[k * len], len);
      }
      for (; b < batch; ++b) {
        gradient_row_block<T, 1>(len, v + b * s.m + j, grad_num + b * s.n + lo,
                                 grad_den + b * s.n + lo, s.n, s.sigma + at, s.offset + at,
                                 s.w + at, s.w_erev + at, g.sigma + at, g.offset + at, g.w + at,
                                 g.w_erev + at, scratch.data());
        grad_v[b * s.m + j] = sum(scratch.data(), len);
      }
    }
  });
}

// ---- argument checks and unpacking ---------------------------------------------------------

void check_same(const char* where, const at::Tensor& reference, const at::Tensor& t,
                const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "ltc_cpu.", where, ": ", name, " must be on the CPU");
  TORCH_CHECK(t.scalar_type() == reference.scalar_type(), "ltc_cpu.", where, ": ", name,
              " must have dtype ", reference.scalar_type(), ", got ", t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), "ltc_cpu.", where, ": ", name, " must be contiguous");
}

void check_shape(const char* where, const at::Tensor& t, at::IntArrayRef shape, const char* name) {
  TORCH_CHECK(t.sizes() == shape, "ltc_cpu.", where, ": ", name, " must have shape ", shape,
              ", got ", t.sizes());
}

// Checks the column ranges: both empty (every row spans all n columns), or m entries each with
// 0 <= lo <= hi <= n.
void check_ranges(const char* where, const at::Tensor& lo, const at::Tensor& hi, int64_t m,
                  int64_t n) {
  TORCH_CHECK(n >= 1, "ltc_cpu.", where, ": n (the postsynaptic count) must be >= 1, got ", n);
  if (lo.numel() == 0 && hi.numel() == 0) return;
  for (const at::Tensor* t : {&lo, &hi}) {
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == at::kLong && t->dim() == 1 &&
                    t->numel() == m && t->is_contiguous(),
                "ltc_cpu.", where, ": lo and hi must be contiguous int64 CPU vectors of M = ", m,
                " entries (or both empty), got shape ", t->sizes());
  }
  const int64_t* l = lo.data_ptr<int64_t>();
  const int64_t* h = hi.data_ptr<int64_t>();
  for (int64_t j = 0; j < m; ++j) {
    TORCH_CHECK(0 <= l[j] && l[j] <= h[j] && h[j] <= n, "ltc_cpu.", where,
                ": column ranges must satisfy 0 <= lo <= hi <= N = ", n, ", got [", l[j], ", ",
                h[j], ") for row ", j);
  }
}

// Checks the (m, n) parameters (v's dtype) and the ranges.
template <typename T>
Synapses<T> unpack(const char* where, const at::Tensor& reference, int64_t m,
                   const at::Tensor& lo, const at::Tensor& hi, const at::Tensor& sigma,
                   const at::Tensor& offset, const at::Tensor& w, const at::Tensor& w_erev) {
  TORCH_CHECK(sigma.dim() == 2 && sigma.size(0) == m, "ltc_cpu.", where,
              ": sigma must be (M, N) with M = ", m, ", got shape ", sigma.sizes());
  const int64_t n = sigma.size(1);
  const char* names[] = {"sigma", "offset", "w", "w_erev"};
  const at::Tensor* params[] = {&sigma, &offset, &w, &w_erev};
  for (int k = 0; k < 4; ++k) {
    check_same(where, reference, *params[k], names[k]);
    TORCH_CHECK(params[k]->sizes() == sigma.sizes(), "ltc_cpu.", where,
                ": sigma, offset, w and w_erev must be of one shape (M, N), got ", sigma.sizes(),
                " and ", params[k]->sizes());
  }
  check_ranges(where, lo, hi, m, n);
  Synapses<T> s;
  s.m = m;
  s.n = n;
  if (lo.numel() > 0) {
    s.lo = lo.data_ptr<int64_t>();
    s.hi = hi.data_ptr<int64_t>();
  }
  s.sigma = sigma.data_ptr<T>();
  s.offset = offset.data_ptr<T>();
  s.w = w.data_ptr<T>();
  s.w_erev = w_erev.data_ptr<T>();
  return s;
}

std::vector<at::Tensor> zeros_like_all(std::initializer_list<const at::Tensor*> tensors) {
  std::vector<at::Tensor> out;
  for (const at::Tensor* t : tensors) out.push_back(at::zeros_like(*t));
  return out;
}

}  // namespace

// (num, den), each (B, N), for v (B, M) and (M, N) parameters with optional column ranges.
std::vector<at::Tensor> ltc_forward(const at::Tensor& v, const at::Tensor& sigma,
                                    const at::Tensor& offset, const at::Tensor& w,
                                    const at::Tensor& w_erev, const at::Tensor& lo,
                                    const at::Tensor& hi) {
  TORCH_CHECK(v.device().is_cpu() && v.dim() == 2 && v.is_contiguous(),
              "ltc_cpu.forward: v must be a contiguous (B, M) CPU tensor, got shape ", v.sizes());
  const int64_t batch = v.size(0), m = v.size(1);
  auto num = at::empty({batch, sigma.size(-1)}, v.options());
  auto den = at::empty_like(num);
  AT_DISPATCH_FLOATING_TYPES(v.scalar_type(), "ltc_forward", [&] {
    using T = scalar_t;
    const auto s = unpack<T>("forward", v, m, lo, hi, sigma, offset, w, w_erev);
    const T* v_p = v.data_ptr<T>();
    T* num_p = num.data_ptr<T>();
    T* den_p = den.data_ptr<T>();
    // Samples are independent: each task owns its rows of num and den.
    at::parallel_for(0, batch, grain(m * s.n), [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        synapses_of_sample<T>(s, v_p + b * m, num_p + b * s.n, den_p + b * s.n);
      }
    });
  });
  return {num, den};
}

// (grad_v (B, M), grad_sigma, grad_offset, grad_w, grad_w_erev ((M, N) each, summed over the
// batch; zero outside the column ranges)) from dL/dnum and dL/dden (B, N).
std::vector<at::Tensor> ltc_backward(const at::Tensor& grad_num, const at::Tensor& grad_den,
                                     const at::Tensor& v, const at::Tensor& sigma,
                                     const at::Tensor& offset, const at::Tensor& w,
                                     const at::Tensor& w_erev, const at::Tensor& lo,
                                     const at::Tensor& hi) {
  TORCH_CHECK(v.device().is_cpu() && v.dim() == 2 && v.is_contiguous(),
              "ltc_cpu.backward: v must be a contiguous (B, M) CPU tensor, got shape ", v.sizes());
  const int64_t batch = v.size(0), m = v.size(1), n = sigma.size(-1);
  for (const at::Tensor* grad : {&grad_num, &grad_den}) {
    TORCH_CHECK(grad->dim() == 2 && grad->size(0) == batch && grad->size(1) == n &&
                    grad->is_contiguous(),
                "ltc_cpu.backward: grad_num and grad_den must be contiguous (B, N) = (", batch,
                ", ", n, "), got shape ", grad->sizes());
    check_same("backward", v, *grad, "grad_num and grad_den");
  }
  auto grad_v = at::empty_like(v);
  auto grads = zeros_like_all({&sigma, &offset, &w, &w_erev});
  AT_DISPATCH_FLOATING_TYPES(v.scalar_type(), "ltc_backward", [&] {
    using T = scalar_t;
    const auto s = unpack<T>("backward", v, m, lo, hi, sigma, offset, w, w_erev);
    const SynapseGradients<T> g{grads[0].data_ptr<T>(), grads[1].data_ptr<T>(),
                                grads[2].data_ptr<T>(), grads[3].data_ptr<T>()};
    synapses_backward<T>(s, batch, v.data_ptr<T>(), grad_num.data_ptr<T>(),
                         grad_den.data_ptr<T>(), grad_v.data_ptr<T>(), g);
  });
  return {grad_v, grads[0], grads[1], grads[2], grads[3]};
}

namespace {

// The arguments both sequence passes share, checked.
struct SequenceShapes {
  int64_t batch, steps, units;
};

SequenceShapes check_sequence(const char* where, const at::Tensor& num_s, const at::Tensor& den_s,
                              const at::Tensor& delta, const at::Tensor& keep,
                              const at::Tensor& cm, const at::Tensor& gleak,
                              const at::Tensor& leak, int64_t unfolds) {
  TORCH_CHECK(num_s.device().is_cpu() && num_s.dim() == 3 && num_s.is_contiguous(), "ltc_cpu.",
              where, ": num_s must be a contiguous (B, T, N) CPU tensor, got shape ",
              num_s.sizes());
  const SequenceShapes sh{num_s.size(0), num_s.size(1), num_s.size(2)};
  TORCH_CHECK(unfolds >= 1, "ltc_cpu.", where, ": unfolds must be >= 1, got ", unfolds);
  check_same(where, num_s, den_s, "den_s");
  check_shape(where, den_s, num_s.sizes(), "den_s");
  check_same(where, num_s, delta, "delta");
  check_shape(where, delta, {sh.batch, sh.steps}, "delta");
  if (keep.numel() > 0) {
    check_same(where, num_s, keep, "keep");
    check_shape(where, keep, {sh.batch, sh.steps}, "keep");
  }
  for (const at::Tensor* t : {&cm, &gleak, &leak}) {
    check_same(where, num_s, *t, "cm, gleak and leak");
    check_shape(where, *t, {sh.units}, "cm, gleak and leak");
  }
  return sh;
}

// The per-step and per-neuron inputs of the update both sequence passes read.
template <typename T>
struct Neurons {
  const T* delta;  // (B, T) unfold lengths Δt / unfolds
  const T* keep;   // (B, T) 0 where the state resets before the step; null: no resets
  const T* cm;     // (N,) each
  const T* gleak;
  const T* leak;
  T epsilon;

  Neurons(const at::Tensor& delta_t, const at::Tensor& keep_t, const at::Tensor& cm_t,
          const at::Tensor& gleak_t, const at::Tensor& leak_t, double eps)
      : delta(delta_t.data_ptr<T>()),
        keep(keep_t.numel() > 0 ? keep_t.data_ptr<T>() : nullptr),
        cm(cm_t.data_ptr<T>()),
        gleak(gleak_t.data_ptr<T>()),
        leak(leak_t.data_ptr<T>()),
        epsilon(static_cast<T>(eps)) {}
};

}  // namespace

// The fused solver over a whole sequence: hs (B, T, N), the state after every step, and with
// `save` the values the backward pass needs: v, num and den before every unfold, each
// (T, unfolds, B, N). keep (B, T) is 0 where the state resets before the step (empty: none).
std::vector<at::Tensor> ltc_sequence_forward(
    const at::Tensor& num_s, const at::Tensor& den_s, const at::Tensor& v0,
    const at::Tensor& delta, const at::Tensor& keep, const at::Tensor& sigma,
    const at::Tensor& offset, const at::Tensor& w, const at::Tensor& w_erev, const at::Tensor& lo,
    const at::Tensor& hi, const at::Tensor& cm, const at::Tensor& gleak, const at::Tensor& leak,
    double epsilon, int64_t unfolds, bool save) {
  const auto sh =
      check_sequence("sequence_forward", num_s, den_s, delta, keep, cm, gleak, leak, unfolds);
  const int64_t B = sh.batch, T = sh.steps, N = sh.units, U = unfolds;
  check_shape("sequence_forward", sigma, {N, N}, "sigma");
  check_same("sequence_forward", num_s, v0, "v0");
  check_shape("sequence_forward", v0, {B, N}, "v0");
  auto hs = at::empty({B, T, N}, num_s.options());
  const auto saved_shape = save ? std::vector<int64_t>{T, U, B, N} : std::vector<int64_t>{0};
  auto vs = at::empty(saved_shape, num_s.options());
  auto nums = at::empty(saved_shape, num_s.options());
  auto dens = at::empty(saved_shape, num_s.options());
  AT_DISPATCH_FLOATING_TYPES(num_s.scalar_type(), "ltc_sequence_forward", [&] {
    using T_ = scalar_t;
    const auto s =
        unpack<T_>("sequence_forward", num_s, N, lo, hi, sigma, offset, w, w_erev);
    const T_* num_s_p = num_s.data_ptr<T_>();
    const T_* den_s_p = den_s.data_ptr<T_>();
    const T_* v0_p = v0.data_ptr<T_>();
    const Neurons<T_> cell(delta, keep, cm, gleak, leak, epsilon);
    T_* hs_p = hs.data_ptr<T_>();
    T_* vs_p = save ? vs.data_ptr<T_>() : nullptr;
    T_* nums_p = save ? nums.data_ptr<T_>() : nullptr;
    T_* dens_p = save ? dens.data_ptr<T_>() : nullptr;
    // Samples are independent over the whole sequence: one parallel loop, no barrier per step.
    at::parallel_for(0, B, grain(T * U * s.m * N), [&](int64_t first, int64_t last) {
      std::vector<T_> buffers(3 * N);
      T_* v = buffers.data();
      T_* num = v + N;
      T_* den = num + N;
      for (int64_t b = first; b < last; ++b) {
        std::copy(v0_p + b * N, v0_p + (b + 1) * N, v);
        for (int64_t t = 0; t < T; ++t) {
          const int64_t bt = b * T + t;
          if (cell.keep != nullptr) {
            const T_ k = cell.keep[bt];
            for (int64_t i = 0; i < N; ++i) v[i] *= k;
          }
          const T_ d = cell.delta[bt];
          const T_* ns = num_s_p + bt * N;
          const T_* ds = den_s_p + bt * N;
          for (int64_t u = 0; u < U; ++u) {
            synapses_of_sample<T_>(s, v, num, den);
            for (int64_t i = 0; i < N; ++i) {
              num[i] += ns[i];
              den[i] += ds[i];
            }
            if (save) {
              const int64_t at_ = ((t * U + u) * B + b) * N;
              std::copy(v, v + N, vs_p + at_);
              std::copy(num, num + N, nums_p + at_);
              std::copy(den, den + N, dens_p + at_);
            }
            for (int64_t i = 0; i < N; ++i) {
              v[i] = (cell.cm[i] * v[i] + d * (cell.leak[i] + num[i])) /
                     (cell.cm[i] + d * (cell.gleak[i] + den[i] + cell.epsilon));
            }
          }
          std::copy(v, v + N, hs_p + bt * N);
        }
      }
    });
  });
  return {hs, vs, nums, dens};
}

// The backward pass of ltc_sequence_forward from dL/dhs (B, T, N) and what it saved:
// (grad_num_s, grad_den_s (B, T, N), grad_v0 (B, N), grad_delta (B, T), grad_sigma,
// grad_offset, grad_w, grad_w_erev ((N, N) each), grad_cm, grad_gleak, grad_leak (N)).
std::vector<at::Tensor> ltc_sequence_backward(
    const at::Tensor& grad_hs, const at::Tensor& vs, const at::Tensor& nums,
    const at::Tensor& dens, const at::Tensor& num_s, const at::Tensor& den_s,
    const at::Tensor& delta, const at::Tensor& keep, const at::Tensor& sigma,
    const at::Tensor& offset, const at::Tensor& w, const at::Tensor& w_erev, const at::Tensor& lo,
    const at::Tensor& hi, const at::Tensor& cm, const at::Tensor& gleak, const at::Tensor& leak,
    double epsilon, int64_t unfolds) {
  const auto sh =
      check_sequence("sequence_backward", num_s, den_s, delta, keep, cm, gleak, leak, unfolds);
  const int64_t B = sh.batch, T = sh.steps, N = sh.units, U = unfolds;
  check_shape("sequence_backward", sigma, {N, N}, "sigma");
  check_same("sequence_backward", num_s, grad_hs, "grad_hs");
  check_shape("sequence_backward", grad_hs, num_s.sizes(), "grad_hs");
  for (const at::Tensor* t : {&vs, &nums, &dens}) {
    check_same("sequence_backward", num_s, *t, "vs, nums and dens");
    check_shape("sequence_backward", *t, {T, U, B, N}, "vs, nums and dens");
  }
  auto grad_num_s = at::empty_like(num_s);
  auto grad_den_s = at::empty_like(den_s);
  auto grad_v = at::zeros({B, N}, num_s.options());  // dL/dv after the current unfold
  auto grad_delta = at::zeros_like(delta);
  auto grads = zeros_like_all({&sigma, &offset, &w, &w_erev, &cm, &gleak, &leak});
  AT_DISPATCH_FLOATING_TYPES(num_s.scalar_type(), "ltc_sequence_backward", [&] {
    using T_ = scalar_t;
    const auto s =
        unpack<T_>("sequence_backward", num_s, N, lo, hi, sigma, offset, w, w_erev);
    const SynapseGradients<T_> g{grads[0].data_ptr<T_>(), grads[1].data_ptr<T_>(),
                                 grads[2].data_ptr<T_>(), grads[3].data_ptr<T_>()};
    T_* grad_cm = grads[4].data_ptr<T_>();
    T_* grad_gleak = grads[5].data_ptr<T_>();
    T_* grad_leak = grads[6].data_ptr<T_>();
    const T_* grad_hs_p = grad_hs.data_ptr<T_>();
    const T_* vs_p = vs.data_ptr<T_>();
    const T_* nums_p = nums.data_ptr<T_>();
    const T_* dens_p = dens.data_ptr<T_>();
    const Neurons<T_> cell(delta, keep, cm, gleak, leak, epsilon);
    T_* grad_num_s_p = grad_num_s.data_ptr<T_>();
    T_* grad_den_s_p = grad_den_s.data_ptr<T_>();
    T_* grad_v_p = grad_v.data_ptr<T_>();
    T_* grad_delta_p = grad_delta.data_ptr<T_>();
    // dL/dnum and dL/dden of one unfold (B, N), the synapses' dL/dv (B, N).
    std::vector<T_> buffers(3 * B * N + N);
    T_* grad_num = buffers.data();
    T_* grad_den = grad_num + B * N;
    T_* grad_v_synapses = grad_den + B * N;
    T_* grad_d_terms = grad_v_synapses + B * N;  // one sample's terms of dL/dδ
    for (int64_t t = T - 1; t >= 0; --t) {
      for (int64_t b = 0; b < B; ++b) {
        const int64_t bt = (b * T + t) * N;
        for (int64_t i = 0; i < N; ++i) {
          grad_v_p[b * N + i] += grad_hs_p[bt + i];
          grad_num_s_p[bt + i] = T_(0);
          grad_den_s_p[bt + i] = T_(0);
        }
      }
      for (int64_t u = U - 1; u >= 0; --u) {
        const int64_t at_ = (t * U + u) * B * N;
        const T_* v_before = vs_p + at_;
        // v_after = P / D with P = cm·v + δ·(leak + num), D = cm + δ·(gleak + den + ε).
        for (int64_t b = 0; b < B; ++b) {
          const T_ d = cell.delta[b * T + t];
          const int64_t row = b * N;
          const int64_t bt = (b * T + t) * N;
          // No sum inside the loop: GCC vectorises no floating-point reduction by itself.
          for (int64_t i = 0; i < N; ++i) {
            const T_ v_i = v_before[row + i];
            const T_ drive = cell.leak[i] + nums_p[at_ + row + i];
            const T_ conductance = cell.gleak[i] + dens_p[at_ + row + i] + cell.epsilon;
            const T_ denominator = cell.cm[i] + d * conductance;
            const T_ v_after = (cell.cm[i] * v_i + d * drive) / denominator;
            const T_ grad_p = grad_v_p[row + i] / denominator;
            const T_ grad_denominator = -grad_p * v_after;
            grad_cm[i] += grad_p * v_i + grad_denominator;
            grad_leak[i] += grad_p * d;
            grad_gleak[i] += grad_denominator * d;
            grad_d_terms[i] = grad_p * drive + grad_denominator * conductance;
            grad_num[row + i] = grad_p * d;
            grad_den[row + i] = grad_denominator * d;
            grad_num_s_p[bt + i] += grad_num[row + i];
            grad_den_s_p[bt + i] += grad_den[row + i];
            grad_v_p[row + i] = grad_p * cell.cm[i];  // the direct path; the synapses' is added
          }
          grad_delta_p[b * T + t] += sum(grad_d_terms, N);
        }
        synapses_backward<T_>(s, B, v_before, grad_num, grad_den, grad_v_synapses, g);
        for (int64_t k = 0; k < B * N; ++k) grad_v_p[k] += grad_v_synapses[k];
      }
      if (cell.keep != nullptr) {
        for (int64_t b = 0; b < B; ++b) {
          const T_ k = cell.keep[b * T + t];
          for (int64_t i = 0; i < N; ++i) grad_v_p[b * N + i] *= k;
        }
      }
    }
  });
  return {grad_num_s, grad_den_s, grad_v, grad_delta, grads[0], grads[1],
          grads[2],   grads[3],   grads[4], grads[5], grads[6]};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &ltc_forward, "LTC synapse sums (CPU): (num, den)", py::arg("v"),
        py::arg("sigma"), py::arg("offset"), py::arg("w"), py::arg("w_erev"), py::arg("lo"),
        py::arg("hi"));
  m.def("backward", &ltc_backward,
        "LTC synapse sums, backward (CPU): (grad_v, grad_sigma, grad_offset, grad_w, "
        "grad_w_erev)",
        py::arg("grad_num"), py::arg("grad_den"), py::arg("v"), py::arg("sigma"),
        py::arg("offset"), py::arg("w"), py::arg("w_erev"), py::arg("lo"), py::arg("hi"));
  m.def("sequence_forward", &ltc_sequence_forward,
        "A sequence of the fused LTC solver (CPU): (hs, vs, nums, dens)", py::arg("num_s"),
        py::arg("den_s"), py::arg("v0"), py::arg("delta"), py::arg("keep"), py::arg("sigma"),
        py::arg("offset"), py::arg("w"), py::arg("w_erev"), py::arg("lo"), py::arg("hi"),
        py::arg("cm"), py::arg("gleak"), py::arg("leak"), py::arg("epsilon"),
        py::arg("unfolds"), py::arg("save"));
  m.def("sequence_backward", &ltc_sequence_backward,
        "The backward pass of sequence_forward (CPU)", py::arg("grad_hs"), py::arg("vs"),
        py::arg("nums"), py::arg("dens"), py::arg("num_s"), py::arg("den_s"), py::arg("delta"),
        py::arg("keep"), py::arg("sigma"), py::arg("offset"), py::arg("w"), py::arg("w_erev"),
        py::arg("lo"), py::arg("hi"), py::arg("cm"), py::arg("gleak"), py::arg("leak"),
        py::arg("epsilon"), py::arg("unfolds"));
}
