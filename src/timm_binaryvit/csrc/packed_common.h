// Shared definitions of the packed-sign kernels (see packed_gemm.cpp for the layout).
#pragma once
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <type_traits>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define TBV_X86 1
#define TGT_POPCNT __attribute__((target("popcnt")))
#define TGT_AVX2 __attribute__((target("avx2,popcnt,fma")))
#define TGT_AVX512 __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx512vpopcntdq,popcnt,fma")))
#endif
#define AI inline __attribute__((always_inline))

namespace tbv {

using u64 = uint64_t;

enum Isa { ISA_PORTABLE = 0, ISA_AVX2 = 1, ISA_AVX512 = 2 };
enum Mode { XOR = 0, MASK_A = 1, MASK_B = 2, BOTH = 3 };

constexpr int PW = 8;        // rows per panel

inline bool isa_supported(int isa) {
#if defined(TBV_X86)
  __builtin_cpu_init();
  if (isa == ISA_AVX2)
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("popcnt") && __builtin_cpu_supports("fma");
  if (isa == ISA_AVX512)
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl") &&
           __builtin_cpu_supports("avx512vpopcntdq") && __builtin_cpu_supports("popcnt") &&
           __builtin_cpu_supports("fma");
#endif
  return isa == ISA_PORTABLE;
}

inline bool has_popcnt() {
#if defined(TBV_X86)
  __builtin_cpu_init();
  return __builtin_cpu_supports("popcnt");
#else
  return false;
#endif
}

inline const u64* words(const torch::Tensor& t) { return reinterpret_cast<const u64*>(t.data_ptr<int64_t>()); }
inline u64* words_mut(torch::Tensor& t) { return reinterpret_cast<u64*>(t.data_ptr<int64_t>()); }

inline void check_isa(int64_t isa) {
  TORCH_CHECK(isa >= ISA_PORTABLE && isa <= ISA_AVX512, "unknown isa code ", isa);
  TORCH_CHECK(isa_supported(static_cast<int>(isa)), "this CPU (or build) does not support isa code ", isa);
}

inline void check_planes(const torch::Tensor& t, const char* what) {
  TORCH_CHECK(t.dim() == 4 && t.size(3) == PW && t.scalar_type() == torch::kInt64 && t.is_contiguous(),
              what, " must be a contiguous int64 tensor of shape (batch, panels, words, 8)");
}

#if defined(TBV_X86)
// AVX2 has no vector popcount: each byte's count from two 4-bit table lookups (vpshufb).
TGT_AVX2 AI __m256i popcnt8_avx2(__m256i x, __m256i lut, __m256i low) {
  const __m256i lo = _mm256_and_si256(x, low);
  const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(x, 4), low);
  return _mm256_add_epi8(_mm256_shuffle_epi8(lut, lo), _mm256_shuffle_epi8(lut, hi));
}

TGT_AVX2 AI __m256i popcnt_lut_avx2() {
  return _mm256_setr_epi8(0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4, 0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4);
}

// Two vectors of four small signed 64-bit counts (columns 0-3, 4-7) as eight int32 in column order:
// each count's low half is its int32, so interleave the low halves (c0 c4 c1 c5 ...) and permute.
TGT_AVX2 AI __m256i counts_to_epi32_avx2(__m256i v0, __m256i v1) {
  return _mm256_permutevar8x32_epi32(_mm256_blend_epi32(v0, _mm256_slli_epi64(v1, 32), 0xaa),
                                     _mm256_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7));
}
#endif


}  // namespace tbv

int64_t pack(const torch::Tensor& x, const c10::optional<torch::Tensor>& shift, int64_t mode, double threshold,
             torch::Tensor neg, torch::Tensor nz, torch::Tensor cnt, int64_t isa);
int64_t from_sign_bits(const torch::Tensor& bits, int64_t K, const torch::Tensor& zeros, torch::Tensor neg,
                       torch::Tensor nz, torch::Tensor cnt);
void binary_attention(const torch::Tensor& qn, const torch::Tensor& qz, const torch::Tensor& qcnt, bool q_zeros,
                      const torch::Tensor& kn, const torch::Tensor& kz, const torch::Tensor& kcnt, bool k_zeros,
                      const torch::Tensor& vn, const torch::Tensor& vz, bool v_zeros, int64_t K, int64_t Nk,
                      double scale, double threshold, torch::Tensor out, int64_t isa);
void approx_sign_backward(const torch::Tensor& grad, const torch::Tensor& x, torch::Tensor out, double factor);
void prelu_backward(const torch::Tensor& grad, const torch::Tensor& z, const torch::Tensor& slope, torch::Tensor grad_z,
                    const c10::optional<torch::Tensor>& slope_sum, const c10::optional<torch::Tensor>& gz_sum);
