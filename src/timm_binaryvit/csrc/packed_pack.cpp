// Packing kernels: fused shift + sign (or compare) + pack, and the packed file format -> planes.
#include "packed_common.h"

using namespace tbv;

// ------------------------------------------------------------------------------------------------
// Packing: x (B1, B2, M, K) of any strides -> planes (B1 * B2, P, Kw, 8) and row counts.
// mode 0: value sign(x + shift) (sign(0) = 0; NaN packs as 0); mode 1: value (x > threshold) in {0, 1}.

namespace {

template <typename T>
AI int32_t pack_row_scalar(const T* x, int64_t sk, const T* shift, int64_t K, int mode, T thr, u64* neg, u64* nz) {
  int32_t count = 0;
  for (int64_t kw = 0; kw * 64 < K; ++kw) {
    const int lim = static_cast<int>(std::min<int64_t>(64, K - kw * 64));
    u64 n = 0, z = 0;
    for (int t = 0; t < lim; ++t) {
      const int64_t col = kw * 64 + t;
      T v = x[col * sk];
      if (shift) v = v + shift[col];
      if (mode == 1) {
        z |= static_cast<u64>(v > thr) << t;
      } else {
        n |= static_cast<u64>(v < T(0)) << t;
        z |= static_cast<u64>((v < T(0)) | (v > T(0))) << t;
      }
    }
    neg[kw * PW] = n;
    nz[kw * PW] = z;
    count += __builtin_popcountll(z);
  }
  return count;
}

#if defined(TBV_X86)
// Contiguous float32 rows: 16 comparisons give 16 bits at once.
TGT_AVX512 int32_t pack_row_avx512(const float* x, const float* shift, int64_t K, int mode, float thr, u64* neg, u64* nz) {
  int32_t count = 0;
  const __m512 zero = _mm512_setzero_ps(), t = _mm512_set1_ps(thr);
  for (int64_t kw = 0; kw * 64 < K; ++kw) {
    u64 n = 0, z = 0;
    for (int q = 0; q < 4; ++q) {
      const int64_t col = kw * 64 + q * 16;
      if (col >= K) break;
      const __mmask16 valid = K - col >= 16 ? 0xffff : static_cast<__mmask16>((1u << (K - col)) - 1);
      __m512 v = _mm512_maskz_loadu_ps(valid, x + col);
      if (shift) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(valid, shift + col));
      if (mode == 1) {
        z |= static_cast<u64>(_mm512_mask_cmp_ps_mask(valid, v, t, _CMP_GT_OQ)) << (16 * q);
      } else {
        const __mmask16 lt = _mm512_mask_cmp_ps_mask(valid, v, zero, _CMP_LT_OQ);
        const __mmask16 gt = _mm512_mask_cmp_ps_mask(valid, v, zero, _CMP_GT_OQ);
        n |= static_cast<u64>(lt) << (16 * q);
        z |= static_cast<u64>(lt | gt) << (16 * q);
      }
    }
    neg[kw * PW] = n;
    nz[kw * PW] = z;
    count += static_cast<int32_t>(_mm_popcnt_u64(z));
  }
  return count;
}

TGT_AVX2 int32_t pack_row_avx2(const float* x, const float* shift, int64_t K, int mode, float thr, u64* neg, u64* nz) {
  int32_t count = 0;
  const __m256 zero = _mm256_setzero_ps(), t = _mm256_set1_ps(thr);
  for (int64_t kw = 0; kw * 64 < K; ++kw) {
    const int64_t full = std::min<int64_t>(64, K - kw * 64) / 8 * 8;  // whole groups of 8
    u64 n = 0, z = 0;
    for (int q = 0; q < full; q += 8) {
      const int64_t col = kw * 64 + q;
      __m256 v = _mm256_loadu_ps(x + col);
      if (shift) v = _mm256_add_ps(v, _mm256_loadu_ps(shift + col));
      if (mode == 1) {
        z |= static_cast<u64>(_mm256_movemask_ps(_mm256_cmp_ps(v, t, _CMP_GT_OQ))) << q;
      } else {
        const int lt = _mm256_movemask_ps(_mm256_cmp_ps(v, zero, _CMP_LT_OQ));
        const int gt = _mm256_movemask_ps(_mm256_cmp_ps(v, zero, _CMP_GT_OQ));
        n |= static_cast<u64>(lt) << q;
        z |= static_cast<u64>(lt | gt) << q;
      }
    }
    const int lim = static_cast<int>(std::min<int64_t>(64, K - kw * 64));
    for (int q = static_cast<int>(full); q < lim; ++q) {  // the tail, one by one
      const int64_t col = kw * 64 + q;
      float v = x[col];
      if (shift) v = v + shift[col];
      if (mode == 1) {
        z |= static_cast<u64>(v > thr) << q;
      } else {
        n |= static_cast<u64>(v < 0.f) << q;
        z |= static_cast<u64>((v < 0.f) | (v > 0.f)) << q;
      }
    }
    neg[kw * PW] = n;
    nz[kw * PW] = z;
    count += static_cast<int32_t>(_mm_popcnt_u64(z));
  }
  return count;
}
#endif

template <typename T>
int64_t pack_impl(const torch::Tensor& x, const T* shift, int mode, double threshold, torch::Tensor& neg,
                  torch::Tensor& nz, torch::Tensor& cnt, int isa) {
  const int64_t B1 = x.size(0), B2 = x.size(1), M = x.size(2), K = x.size(3);
  const int64_t s1 = x.stride(0), s2 = x.stride(1), sm = x.stride(2), sk = x.stride(3);
  const int64_t P = neg.size(1), Kw = neg.size(2);
  const T* x0 = x.data_ptr<T>();
  u64 *n0 = words_mut(neg), *z0 = words_mut(nz);
  int32_t* c0 = cnt.data_ptr<int32_t>();
  const T thr = static_cast<T>(threshold);
  std::atomic<int64_t> short_rows{0};
  at::parallel_for(0, B1 * B2 * P, 1, [&](int64_t begin, int64_t end) {
    int64_t local = 0;
    for (int64_t it = begin; it < end; ++it) {
      const int64_t b = it / P, p = it % P;
      const T* xb = x0 + (b / B2) * s1 + (b % B2) * s2;
      u64* nb = n0 + (b * P + p) * Kw * PW;
      u64* zb = z0 + (b * P + p) * Kw * PW;
      for (int r = 0; r < PW; ++r) {
        const int64_t row = p * PW + r;
        int32_t c = 0;
        if (row >= M) {
          for (int64_t k = 0; k < Kw; ++k) nb[k * PW + r] = zb[k * PW + r] = 0;
        } else {
          const T* xr = xb + row * sm;
#if defined(TBV_X86)
          if constexpr (std::is_same<T, float>::value) {
            if (sk == 1 && isa == ISA_AVX512) c = pack_row_avx512(xr, shift, K, mode, thr, nb + r, zb + r);
            else if (sk == 1 && isa == ISA_AVX2) c = pack_row_avx2(xr, shift, K, mode, thr, nb + r, zb + r);
            else c = pack_row_scalar<T>(xr, sk, shift, K, mode, thr, nb + r, zb + r);
          } else {
            c = pack_row_scalar<T>(xr, sk, shift, K, mode, thr, nb + r, zb + r);
          }
#else
          c = pack_row_scalar<T>(xr, sk, shift, K, mode, thr, nb + r, zb + r);
#endif
          local += c < K;
        }
        c0[b * P * PW + row] = c;
      }
    }
    short_rows += local;
  });
  return short_rows.load();
}

}  // namespace

// Returns the number of rows with at least one zero. x is 4-D (B1, B2, M, K); shift (K,) contiguous
// with x's dtype, or none; neg / nz (B1 * B2, P, Kw, 8) int64 and cnt (B1 * B2, P * 8) int32 are
// written in full (padding included).
int64_t pack(const torch::Tensor& x, const c10::optional<torch::Tensor>& shift, int64_t mode, double threshold,
             torch::Tensor neg, torch::Tensor nz, torch::Tensor cnt, int64_t isa) {
  check_isa(isa);
  TORCH_CHECK(x.dim() == 4, "x must be 4-D (B1, B2, M, K)");
  check_planes(neg, "neg"); check_planes(nz, "nz");
  const int64_t Kw = (x.size(3) + 63) / 64, P = (x.size(2) + PW - 1) / PW;
  TORCH_CHECK(neg.size(0) == x.size(0) * x.size(1) && neg.size(1) == P && neg.size(2) == Kw &&
              nz.sizes() == neg.sizes(), "planes have the wrong shape");
  TORCH_CHECK(cnt.is_contiguous() && cnt.scalar_type() == torch::kInt32 && cnt.numel() == neg.size(0) * P * PW,
              "cnt has the wrong shape");
  TORCH_CHECK(mode == 0 || mode == 1, "mode must be 0 (sign) or 1 (mask)");
  if (shift.has_value())
    TORCH_CHECK(shift->scalar_type() == x.scalar_type() && shift->is_contiguous() && shift->numel() == x.size(3),
                "shift must be contiguous (K,) with x's dtype");
  if (x.scalar_type() == torch::kFloat32) {
    const float* s = shift.has_value() ? shift->data_ptr<float>() : nullptr;
    return pack_impl<float>(x, s, static_cast<int>(mode), threshold, neg, nz, cnt, static_cast<int>(isa));
  }
  TORCH_CHECK(x.scalar_type() == torch::kFloat64, "x must be float32 or float64");
  const double* s = shift.has_value() ? shift->data_ptr<double>() : nullptr;
  return pack_impl<double>(x, s, static_cast<int>(mode), threshold, neg, nz, cnt, static_cast<int>(isa));
}

// The on-disk format (uint8 (N, ceil(K / 8)), bit 1 = +1, bit 0 = -1, big bit order within a byte,
// zeros as flat indices) straight into the planes. Returns the number of rows with a zero.
int64_t from_sign_bits(const torch::Tensor& bits, int64_t K, const torch::Tensor& zeros, torch::Tensor neg,
                       torch::Tensor nz, torch::Tensor cnt) {
  TORCH_CHECK(bits.dim() == 2 && bits.scalar_type() == torch::kUInt8 && bits.is_contiguous(),
              "bits must be contiguous uint8 (N, ceil(K / 8))");
  const int64_t N = bits.size(0), nbytes = bits.size(1);
  TORCH_CHECK(nbytes == (K + 7) / 8, "bits has ", nbytes, " bytes per row, K = ", K, " needs ", (K + 7) / 8);
  check_planes(neg, "neg"); check_planes(nz, "nz");
  const int64_t P = neg.size(1), Kw = neg.size(2);
  TORCH_CHECK(neg.size(0) == 1 && P == (N + PW - 1) / PW && Kw == (K + 63) / 64, "planes have the wrong shape");
  TORCH_CHECK(zeros.scalar_type() == torch::kInt64 && zeros.dim() == 1 && zeros.is_contiguous(),
              "zeros must be a contiguous 1-D int64 tensor");
  // byte -> byte with its bits reversed (the file's first element is bit 7; ours is bit 0)
  uint8_t rev[256];
  for (int v = 0; v < 256; ++v) {
    int r = 0;
    for (int i = 0; i < 8; ++i) r |= ((v >> i) & 1) << (7 - i);
    rev[v] = static_cast<uint8_t>(r);
  }
  const uint8_t* src = bits.data_ptr<uint8_t>();
  u64 *n0 = words_mut(neg), *z0 = words_mut(nz);
  int32_t* c0 = cnt.data_ptr<int32_t>();
  at::parallel_for(0, P * PW, 64, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      u64* nr = n0 + (row / PW) * Kw * PW + row % PW;
      u64* zr = z0 + (row / PW) * Kw * PW + row % PW;
      if (row >= N) {
        for (int64_t k = 0; k < Kw; ++k) nr[k * PW] = zr[k * PW] = 0;
        c0[row] = 0;
        continue;
      }
      const uint8_t* s = src + row * nbytes;
      for (int64_t k = 0; k < Kw; ++k) {
        u64 w = 0;
        for (int j = 0; j < 8 && k * 8 + j < nbytes; ++j) w |= static_cast<u64>(rev[s[k * 8 + j]]) << (8 * j);
        const int64_t lim = std::min<int64_t>(64, K - k * 64);
        const u64 valid = lim == 64 ? ~0ull : ((1ull << lim) - 1);
        nr[k * PW] = ~w & valid;
        zr[k * PW] = valid;
      }
      c0[row] = static_cast<int32_t>(K);
    }
  });
  int64_t with_zero = 0;
  const int64_t* zi = zeros.data_ptr<int64_t>();
  for (int64_t i = 0; i < zeros.numel(); ++i) {
    const int64_t idx = zi[i];
    TORCH_CHECK(idx >= 0 && idx < N * K, "zero index ", idx, " is outside the (", N, ", ", K, ") matrix");
    const int64_t row = idx / K, col = idx % K;
    const int64_t off = (row / PW) * Kw * PW + (col / 64) * PW + row % PW;
    const u64 bit = 1ull << (col % 64);
    if (z0[off] & bit) {
      with_zero += c0[row] == K;
      z0[off] &= ~bit;
      n0[off] &= ~bit;
      c0[row] -= 1;
    }
  }
  return with_zero;
}

