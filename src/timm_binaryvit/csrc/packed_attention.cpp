// Binary attention in one pass per query row, on packed operands (layout: packed_gemm.cpp):
//
//   ctx[b, i, c] = sum_j [softmax_j(scale * dot(q_i, k_j)) > threshold] * v[b, c, j]
//
// with q, k and v ternary signs. The scores are never written: a dot product of two sign vectors of
// length K is an integer in [-K, K], so exp(scale * (dot_j - max_j dot_j)) takes one of 2 K + 1
// values, tabulated once per call. Per row: the dots (XOR / AND + popcount), their maximum, the
// softmax denominator Z from the table, and the mask, which is exactly the keys with
// e[max - dot_j] / Z > threshold: as e decreases, those are the dots above one integer cutoff. The
// mask's bits then meet sign(v) as in mask_sign_bmm. Probabilities are computed in double, so a mask
// bit differs from a float32 softmax only where that probability lies within float32 rounding of the
// threshold.
#include "packed_common.h"

#include <cmath>
#include <vector>

using namespace tbv;

namespace {

struct Attention {
  const u64 *qn, *qz, *kn, *kz, *vn, *vz;  // this batch entry's planes
  const int32_t *qcnt, *kcnt;
  int64_t Nk, d, Kw, Kwv;
  int32_t K;
  const double* e;  // e[t] = exp(-scale t), t = 0 .. 2 K
  double threshold;
  int32_t* out;     // this batch entry's (N, d) output
  int64_t ldo;
};

inline int popcount64(u64 x) { return __builtin_popcountll(x); }

// The lowest dot product a row's mask keeps, given its largest dot dmax and softmax denominator Z:
// the key of dot dmax - t has probability e[t] / Z, which decreases with t (dmax + 1: none). The
// mask is decided by e[t] / Z > threshold exactly; a scan with one division per step would be a
// chain of divisions, so the scan compares e[t] with threshold * Z instead, and the exact test then
// moves the cut the step or two by which the two roundings can disagree.
AI int32_t lowest_kept(const Attention& a, int32_t dmax, double Z) {
  const double limit = a.threshold * Z;
  int32_t cut = -1;
  while (cut < 2 * a.K && a.e[cut + 1] > limit) ++cut;
  while (cut >= 0 && !(a.e[cut] / Z > a.threshold)) --cut;
  while (cut < 2 * a.K && a.e[cut + 1] / Z > a.threshold) ++cut;
  return dmax - cut;
}

// One query row i: its dots with every key, the mask, the context.
template <bool QZ, bool KZ, bool VZ>
AI void attention_row(const Attention& a, int64_t i, int32_t* dots, u64* mask) {
  const int64_t qo = (i / PW) * a.Kw * PW + i % PW;  // word w of row i at qo + w PW
  int32_t dmax = -a.K;
  for (int64_t j = 0; j < a.Nk; ++j) {
    const int64_t ko = (j / PW) * a.Kw * PW + j % PW;
    int32_t differ = 0, both = 0;
    for (int64_t w = 0; w < a.Kw; ++w) {
      u64 x = a.qn[qo + w * PW] ^ a.kn[ko + w * PW];
      if (QZ && KZ) {
        const u64 nz = a.qz[qo + w * PW] & a.kz[ko + w * PW];
        x &= nz;
        both += popcount64(nz);
      } else if (QZ) {
        x &= a.qz[qo + w * PW];
      } else if (KZ) {
        x &= a.kz[ko + w * PW];
      }
      differ += popcount64(x);
    }
    const int32_t nonzero = QZ && KZ ? both : QZ ? a.qcnt[i] : KZ ? a.kcnt[j] : a.K;
    const int32_t dot = nonzero - 2 * differ;
    dots[j] = dot;
    dmax = std::max(dmax, dot);
  }
  double Z = 0;
  for (int64_t j = 0; j < a.Nk; ++j) Z += a.e[dmax - dots[j]];
  std::fill(mask, mask + a.Kwv, u64(0));
  const int32_t lowest = lowest_kept(a, dmax, Z);  // the mask is dot >= lowest
  for (int64_t j = 0; j < a.Nk; ++j) mask[j >> 6] |= u64(dots[j] >= lowest) << (j & 63);
  int32_t selected = 0;
  if (!VZ)
    for (int64_t w = 0; w < a.Kwv; ++w) selected += popcount64(mask[w]);
  int32_t* out = a.out + i * a.ldo;
  for (int64_t c = 0; c < a.d; ++c) {
    const int64_t vo = (c / PW) * a.Kwv * PW + c % PW;
    int32_t negative = 0, nonzero = 0;
    for (int64_t w = 0; w < a.Kwv; ++w) {
      negative += popcount64(mask[w] & a.vn[vo + w * PW]);
      if (VZ) nonzero += popcount64(mask[w] & a.vz[vo + w * PW]);
    }
    out[c] = (VZ ? nonzero : selected) - 2 * negative;
  }
}

template <bool QZ, bool KZ, bool VZ>
void rows_portable(const Attention& a, int64_t i0, int64_t i1, int32_t* dots, u64* mask) {
  for (int64_t i = i0; i < i1; ++i) attention_row<QZ, KZ, VZ>(a, i, dots, mask);
}

#if defined(TBV_X86)
// the same code with the POPCNT instruction (see block_portable_popcnt in packed_gemm.cpp)
template <bool QZ, bool KZ, bool VZ>
TGT_POPCNT void rows_popcnt(const Attention& a, int64_t i0, int64_t i1, int32_t* dots, u64* mask) {
  for (int64_t i = i0; i < i1; ++i) attention_row<QZ, KZ, VZ>(a, i, dots, mask);
}
#endif

#if defined(TBV_X86)
// ---- AVX2: the same steps 8 keys (dots) or 8 channels (context) at a time, each a pair of 4 x 64-bit
// counters from the nibble-table popcount; the softmax denominator in four partial sums (one chain of
// dependent additions would take longer than the dots)
template <bool QZ, bool KZ, bool VZ>
TGT_AVX2 void rows_avx2(const Attention& a, int64_t i0, int64_t i1, int32_t* dots, u64* mask) {
  const int64_t Pk = (a.Nk + PW - 1) / PW, Pd = (a.d + PW - 1) / PW;
  const __m256i lut = popcnt_lut_avx2(), low = _mm256_set1_epi8(0x0f), zero = _mm256_setzero_si256();
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  // the popcount of each 64-bit lane of x
  auto count = [&](__m256i x) TGT_AVX2 { return _mm256_sad_epu8(popcnt8_avx2(x, lut, low), zero); };
  for (int64_t i = i0; i < i1; ++i) {
    const int64_t qo = (i / PW) * a.Kw * PW + i % PW;
    __m256i top = _mm256_set1_epi32(-a.K);
    for (int64_t jp = 0; jp < Pk; ++jp) {
      __m256i differ[2] = {zero, zero}, both[2] = {zero, zero};
      const int64_t ko = jp * a.Kw * PW;
      for (int64_t w = 0; w < a.Kw; ++w) {
        const __m256i q = _mm256_set1_epi64x(static_cast<long long>(a.qn[qo + w * PW]));
        const __m256i qz = QZ ? _mm256_set1_epi64x(static_cast<long long>(a.qz[qo + w * PW])) : zero;
        for (int h = 0; h < 2; ++h) {
          const int64_t o = ko + w * PW + 4 * h;
          __m256i x = _mm256_xor_si256(q, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a.kn + o)));
          if (QZ && KZ) {
            const __m256i nz = _mm256_and_si256(qz, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a.kz + o)));
            x = _mm256_and_si256(x, nz);
            both[h] = _mm256_add_epi64(both[h], count(nz));
          } else if (QZ) {
            x = _mm256_and_si256(x, qz);
          } else if (KZ) {
            x = _mm256_and_si256(x, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a.kz + o)));
          }
          differ[h] = _mm256_add_epi64(differ[h], count(x));
        }
      }
      __m256i nonzero[2];
      for (int h = 0; h < 2; ++h) {
        if (QZ && KZ) nonzero[h] = both[h];
        else if (QZ) nonzero[h] = _mm256_set1_epi64x(a.qcnt[i]);
        else if (KZ) nonzero[h] = _mm256_cvtepi32_epi64(_mm_loadu_si128(reinterpret_cast<const __m128i*>(a.kcnt + jp * PW + 4 * h)));
        else nonzero[h] = _mm256_set1_epi64x(a.K);
      }
      const __m256i dot = counts_to_epi32_avx2(_mm256_sub_epi64(nonzero[0], _mm256_slli_epi64(differ[0], 1)),
                                               _mm256_sub_epi64(nonzero[1], _mm256_slli_epi64(differ[1], 1)));
      const __m256i valid = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int32_t>(std::min<int64_t>(PW, a.Nk - jp * PW))), lane);
      top = _mm256_max_epi32(top, _mm256_blendv_epi8(top, dot, valid));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dots + jp * PW), dot);
    }
    __m128i top4 = _mm_max_epi32(_mm256_castsi256_si128(top), _mm256_extracti128_si256(top, 1));
    top4 = _mm_max_epi32(top4, _mm_shuffle_epi32(top4, 0x4e));
    top4 = _mm_max_epi32(top4, _mm_shuffle_epi32(top4, 0xb1));
    const int32_t dmax = _mm_cvtsi128_si32(top4);
    double z[4] = {0, 0, 0, 0};
    int64_t j = 0;
    for (; j + 4 <= a.Nk; j += 4)
      for (int l = 0; l < 4; ++l) z[l] += a.e[dmax - dots[j + l]];
    for (; j < a.Nk; ++j) z[0] += a.e[dmax - dots[j]];
    const double Z = (z[0] + z[1]) + (z[2] + z[3]);
    const __m256i above = _mm256_set1_epi32(lowest_kept(a, dmax, Z) - 1);  // the mask is dot > above
    int32_t selected = 0;
    for (int64_t w = 0; w < a.Kwv; ++w) {
      u64 word = 0;
      for (int g = 0; g < 8; ++g) {
        const int64_t j0 = 64 * w + 8 * g;
        if (j0 >= a.Nk) break;
        const __m256i kept = _mm256_cmpgt_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(dots + j0)), above);
        u64 bits = static_cast<u64>(_mm256_movemask_ps(_mm256_castsi256_ps(kept)));
        if (a.Nk - j0 < 8) bits &= (u64(1) << (a.Nk - j0)) - 1;  // the buffer holds older dots there
        word |= bits << (8 * g);
      }
      mask[w] = word;
      selected += popcount64(word);
    }
    int32_t* out = a.out + i * a.ldo;
    for (int64_t pc = 0; pc < Pd; ++pc) {
      __m256i negative[2] = {zero, zero}, nonzero[2] = {zero, zero};
      const int64_t vo = pc * a.Kwv * PW;
      for (int64_t w = 0; w < a.Kwv; ++w) {
        const __m256i m = _mm256_set1_epi64x(static_cast<long long>(mask[w]));
        for (int h = 0; h < 2; ++h) {
          const int64_t o = vo + w * PW + 4 * h;
          negative[h] = _mm256_add_epi64(negative[h], count(_mm256_and_si256(m, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a.vn + o)))));
          if (VZ)
            nonzero[h] = _mm256_add_epi64(nonzero[h], count(_mm256_and_si256(m, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a.vz + o)))));
        }
      }
      if (!VZ) nonzero[0] = nonzero[1] = _mm256_set1_epi64x(selected);
      const __m256i result = counts_to_epi32_avx2(_mm256_sub_epi64(nonzero[0], _mm256_slli_epi64(negative[0], 1)),
                                                  _mm256_sub_epi64(nonzero[1], _mm256_slli_epi64(negative[1], 1)));
      const int64_t n = std::min<int64_t>(PW, a.d - pc * PW);
      if (n == PW) {
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + pc * PW), result);
      } else {
        alignas(32) int32_t tmp[PW];
        _mm256_store_si256(reinterpret_cast<__m256i*>(tmp), result);
        std::copy(tmp, tmp + n, out + pc * PW);
      }
    }
  }
}
#endif

#if defined(TBV_X86)
// ---- AVX-512 VPOPCNTDQ: the same steps 8 keys (dots) or 8 channels (context) at a time; the
// dots buffer holds Kwv * 64 entries, so 16-wide compares never read past it
template <bool QZ, bool KZ, bool VZ>
TGT_AVX512 void rows_avx512(const Attention& a, int64_t i0, int64_t i1, int32_t* dots, u64* mask) {
  const int64_t Pk = (a.Nk + PW - 1) / PW, Pd = (a.d + PW - 1) / PW;
  for (int64_t i = i0; i < i1; ++i) {
    const int64_t qo = (i / PW) * a.Kw * PW + i % PW;
    __m512i top = _mm512_set1_epi64(-a.K);
    for (int64_t jp = 0; jp < Pk; ++jp) {
      __m512i differ = _mm512_setzero_si512(), both = _mm512_setzero_si512();
      const int64_t ko = jp * a.Kw * PW;
      for (int64_t w = 0; w < a.Kw; ++w) {
        __m512i x = _mm512_xor_si512(_mm512_set1_epi64(static_cast<long long>(a.qn[qo + w * PW])),
                                     _mm512_loadu_si512(a.kn + ko + w * PW));
        if (QZ && KZ) {
          const __m512i nz = _mm512_and_si512(_mm512_set1_epi64(static_cast<long long>(a.qz[qo + w * PW])),
                                              _mm512_loadu_si512(a.kz + ko + w * PW));
          x = _mm512_and_si512(x, nz);
          both = _mm512_add_epi64(both, _mm512_popcnt_epi64(nz));
        } else if (QZ) {
          x = _mm512_and_si512(x, _mm512_set1_epi64(static_cast<long long>(a.qz[qo + w * PW])));
        } else if (KZ) {
          x = _mm512_and_si512(x, _mm512_loadu_si512(a.kz + ko + w * PW));
        }
        differ = _mm512_add_epi64(differ, _mm512_popcnt_epi64(x));
      }
      __m512i nonzero;
      if (QZ && KZ) nonzero = both;
      else if (QZ) nonzero = _mm512_set1_epi64(a.qcnt[i]);
      else if (KZ) nonzero = _mm512_cvtepi32_epi64(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(a.kcnt + jp * PW)));
      else nonzero = _mm512_set1_epi64(a.K);
      const __m512i dot = _mm512_sub_epi64(nonzero, _mm512_slli_epi64(differ, 1));
      const __mmask8 valid = static_cast<__mmask8>((1u << std::min<int64_t>(PW, a.Nk - jp * PW)) - 1);
      top = _mm512_mask_max_epi64(top, valid, top, dot);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dots + jp * PW), _mm512_cvtepi64_epi32(dot));
    }
    const int32_t dmax = static_cast<int32_t>(_mm512_reduce_max_epi64(top));
    __m512d z = _mm512_setzero_pd();
    const __m256i vmax = _mm256_set1_epi32(dmax);
    for (int64_t jp = 0; jp < Pk; ++jp) {
      const __mmask8 valid = static_cast<__mmask8>((1u << std::min<int64_t>(PW, a.Nk - jp * PW)) - 1);
      const __m256i t = _mm256_sub_epi32(vmax, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(dots + jp * PW)));
      z = _mm512_add_pd(z, _mm512_mask_i32gather_pd(_mm512_setzero_pd(), valid, t, a.e, 8));
    }
    const double Z = _mm512_reduce_add_pd(z);
    const __m512i lowest = _mm512_set1_epi32(lowest_kept(a, dmax, Z));
    int32_t selected = 0;
    for (int64_t w = 0; w < a.Kwv; ++w) {
      u64 word = 0;
      for (int h = 0; h < 4; ++h) {
        const int64_t j0 = 64 * w + 16 * h;
        if (j0 >= a.Nk) break;
        const __mmask16 valid = static_cast<__mmask16>(a.Nk - j0 >= 16 ? 0xffff : (1u << (a.Nk - j0)) - 1);
        const __mmask16 m = _mm512_mask_cmp_epi32_mask(valid, _mm512_loadu_si512(dots + j0), lowest, _MM_CMPINT_NLT);
        word |= static_cast<u64>(m) << (16 * h);
      }
      mask[w] = word;
      selected += popcount64(word);
    }
    int32_t* out = a.out + i * a.ldo;
    for (int64_t pc = 0; pc < Pd; ++pc) {
      __m512i negative = _mm512_setzero_si512(), nonzero = _mm512_setzero_si512();
      const int64_t vo = pc * a.Kwv * PW;
      for (int64_t w = 0; w < a.Kwv; ++w) {
        const __m512i m = _mm512_set1_epi64(static_cast<long long>(mask[w]));
        negative = _mm512_add_epi64(negative, _mm512_popcnt_epi64(_mm512_and_si512(m, _mm512_loadu_si512(a.vn + vo + w * PW))));
        if (VZ)
          nonzero = _mm512_add_epi64(nonzero, _mm512_popcnt_epi64(_mm512_and_si512(m, _mm512_loadu_si512(a.vz + vo + w * PW))));
      }
      if (!VZ) nonzero = _mm512_set1_epi64(selected);
      const __mmask8 valid = static_cast<__mmask8>((1u << std::min<int64_t>(PW, a.d - pc * PW)) - 1);
      _mm512_mask_cvtepi64_storeu_epi32(out + pc * PW, valid, _mm512_sub_epi64(nonzero, _mm512_slli_epi64(negative, 1)));
    }
  }
}
#endif

using RowsFn = void (*)(const Attention&, int64_t, int64_t, int32_t*, u64*);

template <bool QZ, bool KZ, bool VZ>
RowsFn rows_fn(int isa) {
#if defined(TBV_X86)
  if (isa == ISA_AVX512) return rows_avx512<QZ, KZ, VZ>;
  if (isa == ISA_AVX2) return rows_avx2<QZ, KZ, VZ>;
  if (has_popcnt()) return rows_popcnt<QZ, KZ, VZ>;
#endif
  (void)isa;
  return rows_portable<QZ, KZ, VZ>;
}

RowsFn pick_rows(bool qz, bool kz, bool vz, int isa) {
  const int code = (qz ? 4 : 0) + (kz ? 2 : 0) + (vz ? 1 : 0);
  switch (code) {
    case 0: return rows_fn<false, false, false>(isa);
    case 1: return rows_fn<false, false, true>(isa);
    case 2: return rows_fn<false, true, false>(isa);
    case 3: return rows_fn<false, true, true>(isa);
    case 4: return rows_fn<true, false, false>(isa);
    case 5: return rows_fn<true, false, true>(isa);
    case 6: return rows_fn<true, true, false>(isa);
    default: return rows_fn<true, true, true>(isa);
  }
}

}  // namespace

// q planes (B, ceil(N / 8), Kw, 8) and k planes (B, ceil(Nk / 8), Kw, 8) of K columns; v planes
// (B, ceil(d / 8), ceil(Nk / 64), 8), v transposed (channels by keys, pack_signs_transposed); out
// int32 (B, N, d) with unit column stride. scale positive and finite.
void binary_attention(const torch::Tensor& qn, const torch::Tensor& qz, const torch::Tensor& qcnt, bool q_zeros,
                      const torch::Tensor& kn, const torch::Tensor& kz, const torch::Tensor& kcnt, bool k_zeros,
                      const torch::Tensor& vn, const torch::Tensor& vz, bool v_zeros, int64_t K, int64_t Nk,
                      double scale, double threshold, torch::Tensor out, int64_t isa) {
  check_isa(isa);
  check_planes(qn, "q.neg"); check_planes(qz, "q.nz"); check_planes(kn, "k.neg"); check_planes(kz, "k.nz");
  check_planes(vn, "v.neg"); check_planes(vz, "v.nz");
  TORCH_CHECK(out.dim() == 3 && out.scalar_type() == torch::kInt32 && (out.stride(2) == 1 || out.size(2) == 1),
              "out must be a 3-D int32 tensor with unit column stride");
  const int64_t B = out.size(0), N = out.size(1), d = out.size(2);
  const int64_t Kw = (K + 63) / 64, Kwv = (Nk + 63) / 64;
  TORCH_CHECK(K > 0 && Nk > 0, "the attention needs at least one key and one channel of q and k");
  TORCH_CHECK(scale > 0 && std::isfinite(scale), "the score scale must be positive and finite, got ", scale);
  TORCH_CHECK(qn.size(0) == B && kn.size(0) == B && vn.size(0) == B, "q, k, v and out must have the same batch");
  TORCH_CHECK(qn.size(2) == Kw && kn.size(2) == Kw, "q and k must be packed with ", K, " columns");
  TORCH_CHECK(qn.size(1) * PW >= N && kn.size(1) * PW >= Nk, "q or k has fewer rows than out or Nk");
  TORCH_CHECK(vn.size(1) * PW >= d && vn.size(2) == Kwv, "v must be packed transposed: (d, Nk)");
  TORCH_CHECK(qcnt.scalar_type() == torch::kInt32 && kcnt.scalar_type() == torch::kInt32 &&
              qcnt.is_contiguous() && kcnt.is_contiguous(), "row counts must be contiguous int32");
  if (B == 0 || N == 0 || d == 0) return;

  std::vector<double> e(2 * K + 1);
  for (int64_t t = 0; t <= 2 * K; ++t) e[t] = std::exp(-scale * static_cast<double>(t));
  const RowsFn rows = pick_rows(q_zeros, k_zeros, v_zeros, static_cast<int>(isa));
  const int64_t Pq = (N + PW - 1) / PW;
  const u64 *qn0 = words(qn), *qz0 = words(qz), *kn0 = words(kn), *kz0 = words(kz), *vn0 = words(vn),
            *vz0 = words(vz);
  const int32_t *qc0 = qcnt.data_ptr<int32_t>(), *kc0 = kcnt.data_ptr<int32_t>();
  const int64_t q_bs = qn.size(1) * Kw * PW, k_bs = kn.size(1) * Kw * PW, v_bs = vn.size(1) * Kwv * PW;
  int32_t* out0 = out.data_ptr<int32_t>();
  at::parallel_for(0, B * Pq, 1, [&](int64_t begin, int64_t end) {
    std::vector<int32_t> dots(Kwv * 64);
    std::vector<u64> mask(Kwv);
    for (int64_t it = begin; it < end; ++it) {
      const int64_t b = it / Pq, p = it % Pq;
      Attention a;
      a.qn = qn0 + b * q_bs; a.qz = qz0 + b * q_bs;
      a.kn = kn0 + b * k_bs; a.kz = kz0 + b * k_bs;
      a.vn = vn0 + b * v_bs; a.vz = vz0 + b * v_bs;
      a.qcnt = qc0 + b * qcnt.size(-1); a.kcnt = kc0 + b * kcnt.size(-1);
      a.Nk = Nk; a.d = d; a.Kw = Kw; a.Kwv = Kwv;
      a.K = static_cast<int32_t>(K);
      a.e = e.data();
      a.threshold = threshold;
      a.out = out0 + b * out.stride(0);
      a.ldo = out.stride(1);
      rows(a, p * PW, std::min(N, (p + 1) * PW), dots.data(), mask.data());
    }
  });
}
