// Element-wise pseudo-gradients of the training model's backward pass, one pass over memory each
// where stock operators need three to five (timm_binaryvit.quantizers / layers call these on the
// CPU and keep their stock-operator forms everywhere else).
#include "packed_common.h"

#include <cmath>
#include <vector>

namespace {

// Rows per task: enough work per task that scheduling costs nothing, few enough that both
// threads get rows even for one image's tokens.
constexpr int64_t ROW_GRAIN = 64;

void check_rows(const torch::Tensor& t, const torch::Tensor& like, const char* what) {
  TORCH_CHECK(t.device().is_cpu() && t.is_contiguous() && t.scalar_type() == like.scalar_type() &&
              t.sizes() == like.sizes(), what, " must be a contiguous CPU tensor of the same shape and dtype");
}

// ApproxSign (Bi-Real Net): out = factor * grad * (1 - |clamp(x, -1, 1)|); out may be grad.
template <typename T>
AI void approx_sign_span(const T* g, const T* x, T* out, int64_t b, int64_t e, T factor) {
  for (int64_t i = b; i < e; ++i) {
    const T h = std::min(std::abs(x[i]), T(1));  // NaN stays NaN, as clamp and abs keep it
    const T gi = g[i] * factor;
    out[i] = gi - gi * h;
  }
}

// PReLU backward on rows r0..r1 of (M, C): grad_z = grad (z > 0) or slope * grad (z <= 0); with sums,
// adds each column's sum over these rows of grad * z where z <= 0 (the slope's gradient) and of
// grad_z to slope_acc and gz_acc (in T: a few dozen rows per call, so the loop vectorises).
template <typename T>
AI void prelu_span(const T* g, const T* z, const T* __restrict__ slope, T* gz, int64_t r0, int64_t r1, int64_t C,
                   T* __restrict__ slope_acc, T* __restrict__ gz_acc) {
  for (int64_t r = r0; r < r1; ++r) {
    const T* __restrict__ gr = g + r * C;
    const T* __restrict__ zr = z + r * C;
    T* __restrict__ out = gz + r * C;
    for (int64_t j = 0; j < C; ++j) out[j] = (zr[j] > 0 ? T(1) : slope[j]) * gr[j];  // 1 * g is exactly g
    if (!slope_acc) continue;
    // the sums as separate simple loops over the row just written (still in L1): these vectorise
    for (int64_t j = 0; j < C; ++j) gz_acc[j] += out[j];
    for (int64_t j = 0; j < C; ++j) slope_acc[j] += std::min(zr[j], T(0)) * gr[j];
  }
}

template <typename T>
void approx_sign_plain(const T* g, const T* x, T* out, int64_t b, int64_t e, T factor) {
  approx_sign_span<T>(g, x, out, b, e, factor);
}
template <typename T>
void prelu_plain(const T* g, const T* z, const T* slope, T* gz, int64_t r0, int64_t r1, int64_t C, T* sa, T* ga) {
  prelu_span<T>(g, z, slope, gz, r0, r1, C, sa, ga);
}
#if defined(TBV_X86)
// the same loops compiled for AVX2 (the build's baseline is SSE2)
template <typename T>
TGT_AVX2 void approx_sign_avx2(const T* g, const T* x, T* out, int64_t b, int64_t e, T factor) {
  approx_sign_span<T>(g, x, out, b, e, factor);
}
template <typename T>
TGT_AVX2 void prelu_avx2(const T* g, const T* z, const T* slope, T* gz, int64_t r0, int64_t r1, int64_t C, T* sa, T* ga) {
  prelu_span<T>(g, z, slope, gz, r0, r1, C, sa, ga);
}
#endif

inline bool use_avx2() {
#if defined(TBV_X86)
  return tbv::isa_supported(tbv::ISA_AVX2);
#else
  return false;
#endif
}

template <typename T>
void approx_sign_rows(const T* g, const T* x, T* out, int64_t n, T factor) {
  auto span = approx_sign_plain<T>;
#if defined(TBV_X86)
  if (use_avx2()) span = approx_sign_avx2<T>;
#endif
  at::parallel_for(0, n, ROW_GRAIN * 256, [&](int64_t b, int64_t e) { span(g, x, out, b, e, factor); });
}

// Column sums: per task, in T over blocks of SUM_ROWS rows, then in double, added up in a fixed order.
constexpr int64_t SUM_ROWS = 32;

template <typename T>
void prelu_backward_rows(const T* g, const T* z, const T* slope, T* gz, int64_t M, int64_t C, T* slope_sum,
                         T* gz_sum) {
  auto span = prelu_plain<T>;
#if defined(TBV_X86)
  if (use_avx2()) span = prelu_avx2<T>;
#endif
  const bool sums = slope_sum || gz_sum;
  const int64_t tasks = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads() * 4, (M + ROW_GRAIN - 1) / ROW_GRAIN));
  std::vector<double> partial(sums ? tasks * 2 * C : 0, 0.0);
  const int64_t per_task = (M + tasks - 1) / tasks;
  at::parallel_for(0, tasks, 1, [&](int64_t t0, int64_t t1) {
    std::vector<T> acc(sums ? 2 * C : 0);
    for (int64_t task = t0; task < t1; ++task) {
      const int64_t r_end = std::min(M, (task + 1) * per_task);
      double* ps = sums ? partial.data() + task * 2 * C : nullptr;
      for (int64_t r = task * per_task; r < r_end; r += SUM_ROWS) {
        const int64_t r1 = std::min(r_end, r + SUM_ROWS);
        if (!sums) {
          span(g, z, slope, gz, r, r1, C, nullptr, nullptr);
          continue;
        }
        std::fill(acc.begin(), acc.end(), T(0));
        span(g, z, slope, gz, r, r1, C, acc.data(), acc.data() + C);
        for (int64_t j = 0; j < 2 * C; ++j) ps[j] += static_cast<double>(acc[j]);
      }
    }
  });
  if (!sums) return;
  for (int64_t j = 0; j < C; ++j) {
    double s = 0.0, t = 0.0;
    for (int64_t task = 0; task < tasks; ++task) {
      s += partial[task * 2 * C + j];
      t += partial[task * 2 * C + C + j];
    }
    if (slope_sum) slope_sum[j] = static_cast<T>(s);
    if (gz_sum) gz_sum[j] = static_cast<T>(t);
  }
}

}  // namespace

void approx_sign_backward(const torch::Tensor& grad, const torch::Tensor& x, torch::Tensor out, double factor) {
  TORCH_CHECK(grad.scalar_type() == torch::kFloat32 || grad.scalar_type() == torch::kFloat64,
              "grad must be float32 or float64");
  check_rows(grad, grad, "grad");
  check_rows(x, grad, "x");
  check_rows(out, grad, "out");
  if (grad.scalar_type() == torch::kFloat32)
    approx_sign_rows<float>(grad.data_ptr<float>(), x.data_ptr<float>(), out.data_ptr<float>(), grad.numel(),
                            static_cast<float>(factor));
  else
    approx_sign_rows<double>(grad.data_ptr<double>(), x.data_ptr<double>(), out.data_ptr<double>(), grad.numel(),
                             factor);
}

// grad, z, grad_z (M, C); slope (C,); slope_sum and gz_sum (C,) or None.
void prelu_backward(const torch::Tensor& grad, const torch::Tensor& z, const torch::Tensor& slope, torch::Tensor grad_z,
                    const c10::optional<torch::Tensor>& slope_sum, const c10::optional<torch::Tensor>& gz_sum) {
  TORCH_CHECK(grad.dim() == 2 && (grad.scalar_type() == torch::kFloat32 || grad.scalar_type() == torch::kFloat64),
              "grad must be a 2-D float32 or float64 tensor");
  check_rows(grad, grad, "grad");
  check_rows(z, grad, "z");
  check_rows(grad_z, grad, "grad_z");
  const int64_t M = grad.size(0), C = grad.size(1);
  for (const auto* t : {&slope, slope_sum.has_value() ? &*slope_sum : nullptr, gz_sum.has_value() ? &*gz_sum : nullptr})
    if (t) TORCH_CHECK(t->device().is_cpu() && t->is_contiguous() && t->dim() == 1 && t->size(0) == C &&
                       t->scalar_type() == grad.scalar_type(), "slope and the sums must be contiguous (C,) of grad's dtype");
  if (grad.scalar_type() == torch::kFloat32)
    prelu_backward_rows<float>(grad.data_ptr<float>(), z.data_ptr<float>(), slope.data_ptr<float>(),
                               grad_z.data_ptr<float>(), M, C,
                               slope_sum.has_value() ? slope_sum->data_ptr<float>() : nullptr,
                               gz_sum.has_value() ? gz_sum->data_ptr<float>() : nullptr);
  else
    prelu_backward_rows<double>(grad.data_ptr<double>(), z.data_ptr<double>(), slope.data_ptr<double>(),
                                grad_z.data_ptr<double>(), M, C,
                                slope_sum.has_value() ? slope_sum->data_ptr<double>() : nullptr,
                                gz_sum.has_value() ? gz_sum->data_ptr<double>() : nullptr);
}
