// Bit-packed products of ternary signs {-1, 0, +1}: exact integer results.
//
// Layout ("panels"): a packed operand of R rows and K columns is two bit planes, `neg` (1 where the
// value is -1) and `nz` (1 where it is not 0), each int64 of shape (batch, P, Kw, 8) with
// P = ceil(R / 8), Kw = ceil(K / 64): word k of row r is at [r / 8][k][r % 8], and bit t of that
// word is column 64 k + t. Interleaving 8 rows per word index lets a kernel load one 512-bit vector
// per (panel, k), i.e. 8 output columns at once, and broadcast one word of the other operand
// against it (an outer product over the packed K axis), so no horizontal sums are needed and small
// K (64 at BinaryViT's first stage) runs at full width. Padding rows and columns are 0 in both
// planes, `neg` is 0 wherever `nz` is 0, and `cnt` holds each row's number of nonzeros.
//
// Per pair of words the product of ternary vectors a, b is
//   sum a_i b_i = |nz_a & nz_b| - 2 |nz_a & nz_b & (neg_a ^ neg_b)|,
// which collapses to one popcount when a side has no zeros (its nz is all ones on the K columns):
//   XOR    (no zeros):        K      - 2 |neg_a ^ neg_b|
//   MASK_A (zeros in a only): cnt_a  - 2 |nz_a & (neg_a ^ neg_b)|
//   MASK_B (zeros in b only): cnt_b  - 2 |nz_b & (neg_a ^ neg_b)|
//   BOTH:                     |nz_a & nz_b| - 2 |nz_a & nz_b & (neg_a ^ neg_b)|
// Padding columns have neg = 0 on both sides, so they never add a disagreement.
//
// One shared object holds every instruction-set path (per-function target attributes); the
#include "packed_common.h"

using namespace tbv;

namespace {

constexpr int TILE_LD = 24;  // columns of the int32 tile a block writes before its epilogue

// Everything one block (8 rows x up to 24 columns of the output) needs.
struct Block {
  const u64 *an, *az;     // A panel: [Kw][8]
  const int32_t* acnt;    // A row counts of this panel (8)
  const u64 *bn, *bz;     // first B panel of the block: [Kw][8], panels Kw * 8 words apart
  const int32_t* bcnt;    // B row counts from the block's first column
  int64_t Kw;
  int32_t K;
  int rows, cols;         // valid rows / columns of the block
  void* out;              // output at the block's (row, column) origin
  int64_t ldo;
  const void* scale;      // at the block's first column
  const void* bias;       // at the block's origin, column stride 1
  int64_t ldb;            // bias row stride (0: one row for all)
  const void* slope;      // PReLU epilogue at the block's first column (null: none): y -> max(y, slope y + offset)
  const void* offset;
  const void* shortcut;   // added to y before the PReLU (null: none): row origin of the block, column
  int64_t lds;            //   (col0 + j) % period, so a (M, period) shortcut repeats along the columns
  int64_t period;
  int64_t col0;           // the block's first output column
  void* means;            // group means (null: none): row origin of the block; column g is the mean
  int64_t ldm;            //   of output columns g E .. g E + E - 1 (E divides 8, so no group crosses a block)
  int group;              // E
  unsigned char* sneg;    // packed signs of the results (null: none): the row panel's first byte of each
  unsigned char* snz;     //   plane; a block that packs them itself (AVX-512, float) writes them there
};

// Byte offset of (row r, output panel) in a row panel of packed signs: word [panel / 8][r], byte
// panel % 8 (see pack_tile).
AI int64_t sign_byte(int64_t panel, int r) { return ((panel / 8) * PW + r) * 8 + panel % 8; }

// The means of each group of E consecutive output columns of the block, read back from the output
// just written (still in the L1 cache): the FFN's pool_E shortcut without another pass over memory.
template <typename OutT>
AI void group_means(const Block& b) {
  if constexpr (!std::is_same<OutT, int32_t>::value) {
    if (!b.means) return;
    const OutT* out = static_cast<const OutT*>(b.out);
    OutT* means = static_cast<OutT*>(b.means) + b.col0 / b.group;
    const OutT inv = OutT(1) / OutT(b.group);
    for (int r = 0; r < b.rows; ++r) {
      const OutT* o = out + r * b.ldo;
      for (int j = 0; j < b.cols; j += b.group) {
        OutT sum = 0;
        for (int e = 0; e < b.group; ++e) sum += o[j + e];
        means[r * b.ldm + j / b.group] = sum * inv;
      }
    }
  }
}

// Signs of the block's results as packed bits (the next binary layer's activations), read from the
// tile the block wrote: for each row and 8-column output panel, one byte of each plane. Panel q of a
// row is byte q % 8 of that row's word q / 8 (little-endian), so blocks write disjoint bytes and no
// word is shared between threads. A NaN packs as 0, as pack_signs does.
template <typename OutT>
AI void pack_tile(const OutT* tile, int ld, const Block& b, unsigned char* neg, unsigned char* nz) {
  if constexpr (!std::is_same<OutT, int32_t>::value) {
    const int64_t col_panel0 = b.col0 / PW;
    for (int r = 0; r < b.rows; ++r) {
      const OutT* t = tile + r * ld;
      for (int c = 0; c * PW < b.cols; ++c) {
        const int n = std::min(PW, b.cols - c * PW);
        unsigned n_bits = 0, z_bits = 0;
        for (int j = 0; j < n; ++j) {
          const OutT v = t[c * PW + j];
          n_bits |= static_cast<unsigned>(v < 0) << j;
          z_bits |= static_cast<unsigned>(v < 0 || v > 0) << j;
        }
        const int64_t byte = sign_byte(col_panel0 + c, r);
        neg[byte] = static_cast<unsigned char>(n_bits);
        nz[byte] = static_cast<unsigned char>(z_bits);
      }
    }
  }
}

#if defined(TBV_X86)
// The means of groups of 4 or 8 columns of one full 8 x 8 float panel (row r in row[r]) from a tree
// of horizontal adds, whose two top levels hold each row's sums of 4 and of 8 columns; means[r * ldm
// + g] receives row r's group g of the panel.
TGT_AVX2 AI void panel_means_avx2(const __m256 row[PW], int group, float* means, int64_t ldm) {
  const __m256 inv = _mm256_set1_ps(1.0f / static_cast<float>(group));
  const __m256 s0 = _mm256_hadd_ps(row[0], row[1]), s1 = _mm256_hadd_ps(row[2], row[3]);
  const __m256 s2 = _mm256_hadd_ps(row[4], row[5]), s3 = _mm256_hadd_ps(row[6], row[7]);
  // rows 0-3 (t0) and 4-7 (t1): [sums of columns 0-3 | sums of columns 4-7]
  const __m256 t0 = _mm256_hadd_ps(s0, s1), t1 = _mm256_hadd_ps(s2, s3);
  const __m256 g0 = _mm256_permute2f128_ps(t0, t1, 0x20), g1 = _mm256_permute2f128_ps(t0, t1, 0x31);
  alignas(32) float t[2][PW];
  if (group == 8) {
    _mm256_store_ps(t[0], _mm256_mul_ps(_mm256_add_ps(g0, g1), inv));
    for (int r = 0; r < PW; ++r) means[r * ldm] = t[0][r];
  } else {
    _mm256_store_ps(t[0], _mm256_mul_ps(g0, inv));
    _mm256_store_ps(t[1], _mm256_mul_ps(g1, inv));
    for (int r = 0; r < PW; ++r) {
      means[r * ldm] = t[0][r];
      means[r * ldm + 1] = t[1][r];
    }
  }
}

// Whether a block's means can come from panel_means_avx2.
AI bool panel_means_fit(const Block& b) {
  return b.rows == PW && b.cols % PW == 0 && (b.group == 4 || b.group == 8);
}

// The same two steps for float results with AVX2: the signs from compare masks, and the means
// from panel_means_avx2.
TGT_AVX2 void finish_float_avx2(const Block& b, unsigned char* neg, unsigned char* nz) {
  const float* out = static_cast<const float*>(b.out);
  const __m256 zero = _mm256_setzero_ps();
  if (neg) {
    const int64_t col_panel0 = b.col0 / PW;
    for (int r = 0; r < b.rows; ++r) {
      for (int c = 0; c * PW < b.cols; ++c) {
        const unsigned valid = (1u << std::min(PW, b.cols - c * PW)) - 1;
        const __m256 v = _mm256_loadu_ps(out + r * b.ldo + c * PW);
        const int64_t byte = sign_byte(col_panel0 + c, r);
        neg[byte] = static_cast<unsigned char>(_mm256_movemask_ps(_mm256_cmp_ps(v, zero, _CMP_LT_OQ)) & valid);
        nz[byte] = static_cast<unsigned char>(_mm256_movemask_ps(_mm256_cmp_ps(v, zero, _CMP_NEQ_OQ)) & valid);
      }
    }
  }
  if (!b.means) return;
  if (!panel_means_fit(b)) {
    group_means<float>(b);
    return;
  }
  float* means = static_cast<float*>(b.means) + b.col0 / b.group;
  for (int c = 0; c * PW < b.cols; ++c) {
    __m256 row[PW];
    for (int r = 0; r < PW; ++r) row[r] = _mm256_loadu_ps(out + r * b.ldo + c * PW);
    panel_means_avx2(row, b.group, means + c * (PW / b.group), b.ldm);
  }
}
#endif

// The shortcut of output column col of the block's row r (period is a multiple of 8 or N, so an
// aligned run of 8 columns never wraps).
template <typename OutT>
AI const OutT* shortcut_at(const Block& b, int r, int64_t col) {
  return static_cast<const OutT*>(b.shortcut) + r * b.lds + col % b.period;
}

// ---- epilogue: int32 tile -> output (int32, or acc * scale + bias in float / double)
template <typename OutT>
AI void epilogue(const int32_t* __restrict__ tile, const Block& b) {
  OutT* __restrict__ out = static_cast<OutT*>(b.out);
  if constexpr (std::is_same<OutT, int32_t>::value) {
    for (int r = 0; r < b.rows; ++r)
      for (int j = 0; j < b.cols; ++j) out[r * b.ldo + j] = tile[r * TILE_LD + j];
  } else {
    const OutT* s = static_cast<const OutT*>(b.scale);
    const OutT* bias = static_cast<const OutT*>(b.bias);
    for (int r = 0; r < b.rows; ++r) {
      OutT* o = out + r * b.ldo;
      const OutT* br = bias + r * b.ldb;
      const int32_t* t = tile + r * TILE_LD;
      for (int j = 0; j < b.cols; ++j) o[j] = static_cast<OutT>(t[j]) * s[j] + br[j];
      if (b.shortcut)
        for (int j = 0; j < b.cols; ++j) o[j] += *shortcut_at<OutT>(b, r, b.col0 + j);
      if (b.slope) {
        const OutT* sl = static_cast<const OutT*>(b.slope);
        const OutT* of = static_cast<const OutT*>(b.offset);
        for (int j = 0; j < b.cols; ++j) o[j] = std::max(o[j], o[j] * sl[j] + of[j]);
      }
    }
  }
}

// ---- portable: __builtin_popcountll, 4 x 4 register blocks over one 8 x 8 panel pair
template <int MODE>
AI void mk_portable(const Block& b, int32_t* tile) {
  for (int r0 = 0; r0 < PW; r0 += 4) {
    for (int c0 = 0; c0 < PW; c0 += 4) {
      uint32_t acc[4][4] = {}, accp[4][4] = {};
      for (int64_t k = 0; k < b.Kw; ++k) {
        const u64* an = b.an + k * PW + r0;
        const u64* az = b.az + k * PW + r0;
        const u64* bn = b.bn + k * PW + c0;
        const u64* bz = b.bz + k * PW + c0;
        for (int r = 0; r < 4; ++r) {
          for (int c = 0; c < 4; ++c) {
            u64 x = an[r] ^ bn[c];
            if (MODE == MASK_A) x &= az[r];
            if (MODE == MASK_B) x &= bz[c];
            if (MODE == BOTH) {
              const u64 p = az[r] & bz[c];
              x &= p;
              accp[r][c] += __builtin_popcountll(p);
            }
            acc[r][c] += __builtin_popcountll(x);
          }
        }
      }
      for (int r = 0; r < 4; ++r) {
        for (int c = 0; c < 4; ++c) {
          int32_t base = MODE == XOR ? b.K : MODE == MASK_A ? b.acnt[r0 + r]
                       : MODE == MASK_B ? b.bcnt[c0 + c] : static_cast<int32_t>(accp[r][c]);
          tile[(r0 + r) * TILE_LD + c0 + c] = base - 2 * static_cast<int32_t>(acc[r][c]);
        }
      }
    }
  }
}

template <int MODE, int C, typename OutT>
void block_portable(const Block& b) {
  int32_t tile[PW * TILE_LD];
  mk_portable<MODE>(b, tile);
  epilogue<OutT>(tile, b);
}

#if defined(TBV_X86)
// The same code with the POPCNT instruction (every x86-64 CPU since 2008 has it; without the
// target attribute GCC calls a table-driven library routine).
template <int MODE, int C, typename OutT>
TGT_POPCNT void block_portable_popcnt(const Block& b) {
  int32_t tile[PW * TILE_LD];
  mk_portable<MODE>(b, tile);
  epilogue<OutT>(tile, b);
}

// ---- AVX2: nibble-LUT popcount (vpshufb) into byte counters, vpsadbw every <= 31 words

// 8 int32 results of row r -> the output (int32, or * scale + bias); partial blocks one by one.
template <typename OutT>
TGT_AVX2 AI void store8_avx2(__m256i v, const Block& b, int r) {
  OutT* out = static_cast<OutT*>(b.out) + r * b.ldo;
  const OutT* s = static_cast<const OutT*>(b.scale);
  const OutT* bias = b.bias ? static_cast<const OutT*>(b.bias) + r * b.ldb : nullptr;
  const OutT* sl = static_cast<const OutT*>(b.slope);
  const OutT* of = static_cast<const OutT*>(b.offset);
  if (b.cols < PW) {
    alignas(32) int32_t t[PW];
    _mm256_store_si256(reinterpret_cast<__m256i*>(t), v);
    for (int j = 0; j < b.cols; ++j) {
      if constexpr (std::is_same<OutT, int32_t>::value) {
        out[j] = t[j];
      } else {
        OutT y = static_cast<OutT>(t[j]) * s[j] + bias[j];
        if (b.shortcut) y += *shortcut_at<OutT>(b, r, b.col0 + j);
        out[j] = sl ? std::max(y, y * sl[j] + of[j]) : y;
      }
    }
  } else if constexpr (std::is_same<OutT, int32_t>::value) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), v);
  } else if constexpr (std::is_same<OutT, float>::value) {
    __m256 y = _mm256_fmadd_ps(_mm256_cvtepi32_ps(v), _mm256_loadu_ps(s), _mm256_loadu_ps(bias));
    if (b.shortcut) y = _mm256_add_ps(y, _mm256_loadu_ps(shortcut_at<float>(b, r, b.col0)));
    if (sl) y = _mm256_max_ps(y, _mm256_fmadd_ps(y, _mm256_loadu_ps(sl), _mm256_loadu_ps(of)));
    _mm256_storeu_ps(out, y);
  } else {
    const __m256d lo = _mm256_cvtepi32_pd(_mm256_castsi256_si128(v));
    const __m256d hi = _mm256_cvtepi32_pd(_mm256_extracti128_si256(v, 1));
    __m256d y0 = _mm256_fmadd_pd(lo, _mm256_loadu_pd(s), _mm256_loadu_pd(bias));
    __m256d y1 = _mm256_fmadd_pd(hi, _mm256_loadu_pd(s + 4), _mm256_loadu_pd(bias + 4));
    if (b.shortcut) {
      const double* sc = shortcut_at<double>(b, r, b.col0);
      y0 = _mm256_add_pd(y0, _mm256_loadu_pd(sc));
      y1 = _mm256_add_pd(y1, _mm256_loadu_pd(sc + 4));
    }
    if (sl) {
      y0 = _mm256_max_pd(y0, _mm256_fmadd_pd(y0, _mm256_loadu_pd(sl), _mm256_loadu_pd(of)));
      y1 = _mm256_max_pd(y1, _mm256_fmadd_pd(y1, _mm256_loadu_pd(sl + 4), _mm256_loadu_pd(of + 4)));
    }
    _mm256_storeu_pd(out, y0);
    _mm256_storeu_pd(out + 4, y1);
  }
}

template <int MODE, typename OutT>
TGT_AVX2 AI void mk_avx2(const Block& b) {
  // Rows per pass: 4 x 2 byte accumulators (8 columns), half that when two counts are kept.
  constexpr int R = MODE == BOTH ? 2 : 4;
  const __m256i lut = popcnt_lut_avx2();
  const __m256i low = _mm256_set1_epi8(0x0f);
  const __m256i zero = _mm256_setzero_si256();
  for (int r0 = 0; r0 < PW; r0 += R) {
    // 64-bit lane counts of columns 0-3 and 4-7 per row, kept in registers (a round trip through
    // memory per row costs as much as the product itself when K is a few hundred)
    __m256i acc[R][2], accp[R][2];
    for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = accp[r][0] = accp[r][1] = zero;
    for (int64_t k0 = 0; k0 < b.Kw; k0 += 31) {  // a byte counter takes at most 31 x 8
      const int64_t k1 = std::min<int64_t>(b.Kw, k0 + 31);
      __m256i a8[R][2], p8[R][2];
      for (int r = 0; r < R; ++r) a8[r][0] = a8[r][1] = p8[r][0] = p8[r][1] = zero;
      for (int64_t k = k0; k < k1; ++k) {
        const __m256i b0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b.bn + k * PW));
        const __m256i b1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b.bn + k * PW + 4));
        __m256i z0 = zero, z1 = zero;
        if (MODE == MASK_B || MODE == BOTH) {
          z0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b.bz + k * PW));
          z1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b.bz + k * PW + 4));
        }
        for (int r = 0; r < R; ++r) {
          const __m256i a = _mm256_set1_epi64x(static_cast<long long>(b.an[k * PW + r0 + r]));
          __m256i x0 = _mm256_xor_si256(a, b0), x1 = _mm256_xor_si256(a, b1);
          if (MODE == MASK_A || MODE == BOTH) {
            const __m256i az = _mm256_set1_epi64x(static_cast<long long>(b.az[k * PW + r0 + r]));
            if (MODE == MASK_A) {
              x0 = _mm256_and_si256(x0, az);
              x1 = _mm256_and_si256(x1, az);
            } else {
              const __m256i q0 = _mm256_and_si256(az, z0), q1 = _mm256_and_si256(az, z1);
              x0 = _mm256_and_si256(x0, q0);
              x1 = _mm256_and_si256(x1, q1);
              p8[r][0] = _mm256_add_epi8(p8[r][0], popcnt8_avx2(q0, lut, low));
              p8[r][1] = _mm256_add_epi8(p8[r][1], popcnt8_avx2(q1, lut, low));
            }
          } else if (MODE == MASK_B) {
            x0 = _mm256_and_si256(x0, z0);
            x1 = _mm256_and_si256(x1, z1);
          }
          a8[r][0] = _mm256_add_epi8(a8[r][0], popcnt8_avx2(x0, lut, low));
          a8[r][1] = _mm256_add_epi8(a8[r][1], popcnt8_avx2(x1, lut, low));
        }
      }
      for (int r = 0; r < R; ++r) {
        for (int h = 0; h < 2; ++h) {
          acc[r][h] = _mm256_add_epi64(acc[r][h], _mm256_sad_epu8(a8[r][h], zero));
          if (MODE == BOTH) accp[r][h] = _mm256_add_epi64(accp[r][h], _mm256_sad_epu8(p8[r][h], zero));
        }
      }
    }
    // counts -> 8 int32 per row in registers, then the epilogue
    for (int r = 0; r < R && r0 + r < b.rows; ++r) {
      __m256i base0, base1;
      if (MODE == XOR) {
        base0 = base1 = _mm256_set1_epi64x(b.K);
      } else if (MODE == MASK_A) {
        base0 = base1 = _mm256_set1_epi64x(b.acnt[r0 + r]);
      } else if (MODE == MASK_B) {
        base0 = _mm256_cvtepi32_epi64(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b.bcnt)));
        base1 = _mm256_cvtepi32_epi64(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b.bcnt + 4)));
      } else {
        base0 = accp[r][0];
        base1 = accp[r][1];
      }
      const __m256i v0 = _mm256_sub_epi64(base0, _mm256_slli_epi64(acc[r][0], 1));
      const __m256i v1 = _mm256_sub_epi64(base1, _mm256_slli_epi64(acc[r][1], 1));
      store8_avx2<OutT>(counts_to_epi32_avx2(v0, v1), b, r0 + r);
    }
  }
}

template <int MODE, int C, typename OutT>
TGT_AVX2 void block_avx2(const Block& b) {
  mk_avx2<MODE, OutT>(b);
}

// ---- AVX-512 VPOPCNTDQ: 8 rows x C panels (8 C columns) of 64-bit lane counters; the epilogue
// works on the counters in registers (a round trip through a tile costs as much as the product
// itself when K is a few hundred).
// The float epilogue's per-column operands of one output panel, loaded once for all its rows.
struct PanelPs {
  __m256 scale, bias, slope, offset;
};

// 8 float results of one row from their counts: y = acc * scale + bias (+ shortcut), then the PReLU.
TGT_AVX512 AI __m256 epilogue8_ps(__m512i v, const PanelPs& p, __m256 bias, const float* shortcut, bool prelu,
                                  __mmask8 m) {
  __m256 r = _mm256_fmadd_ps(_mm512_cvtepi64_ps(v), p.scale, bias);
  if (shortcut) r = _mm256_add_ps(r, _mm256_maskz_loadu_ps(m, shortcut));
  if (prelu) r = _mm256_max_ps(r, _mm256_fmadd_ps(r, p.slope, p.offset));
  return r;
}

TGT_AVX512 AI void store8_ps(float* out, __m256 y, __mmask8 m) {
  // a plain store where it can: a later load of the result (a fallback's means) cannot be forwarded
  // from a masked store and would wait for it to reach the cache
  if (m == 0xff) _mm256_storeu_ps(out, y);
  else _mm256_mask_storeu_ps(out, m, y);
}

// int32 or double results of one row (float ones: epilogue8_ps)
template <typename OutT>
TGT_AVX512 AI void store8_avx512(__m512i v, OutT* out, const OutT* scale, const OutT* bias, const OutT* shortcut,
                                 const OutT* slope, const OutT* offset, __mmask8 m) {
  if constexpr (std::is_same<OutT, int32_t>::value) {
    _mm512_mask_cvtepi64_storeu_epi32(out, m, v);
  } else {
    const __m512d f = _mm512_cvtepi64_pd(v);
    __m512d r = _mm512_fmadd_pd(f, _mm512_maskz_loadu_pd(m, scale), _mm512_maskz_loadu_pd(m, bias));
    if (shortcut) r = _mm512_add_pd(r, _mm512_maskz_loadu_pd(m, shortcut));
    if (slope) r = _mm512_max_pd(r, _mm512_fmadd_pd(r, _mm512_maskz_loadu_pd(m, slope), _mm512_maskz_loadu_pd(m, offset)));
    if (m == 0xff) _mm512_storeu_pd(out, r);
    else _mm512_mask_storeu_pd(out, m, r);
  }
}

// The epilogue of block_avx512: counts -> results, stored (int32, float, double) and, for float,
// finished in registers: packed signs (b.sneg) and the means of column groups. FFN1: every condition
// of a binary FFN's first layer holds (see block_avx512), so that no branch or store is left in it.
template <int MODE, int C, typename OutT, bool FFN1>
TGT_AVX512 AI void finish_block_avx512(const Block& b, const __m512i (&acc)[PW][C],
                                       const __m512i (&accp)[PW][MODE == BOTH ? C : 1], const __m512i (&base_b)[C],
                                       const __mmask8 (&masks)[C]) {
  OutT* out = static_cast<OutT*>(b.out);
  const OutT* scale = static_cast<const OutT*>(b.scale);
  const OutT* bias = static_cast<const OutT*>(b.bias);
  const OutT* slope = static_cast<const OutT*>(b.slope);
  const OutT* offset = static_cast<const OutT*>(b.offset);
  constexpr bool is_float = std::is_same<OutT, float>::value;
  // Float results are finished here while in registers: their signs packed (b.sneg) and the means
  // of their column groups, panel by panel (a store and reload of the block costs about as much as
  // its product at K = 64).
  const bool panel_means = FFN1 || (is_float && b.means && panel_means_fit(b));
  // the block's fields as locals: the byte stores of the signs could alias the block itself, which
  // would otherwise make the compiler reload every field after each of them
  const int rows = FFN1 ? PW : b.rows;
  const int32_t K = b.K;
  const int32_t* const acnt = b.acnt;
  const int64_t ldo = b.ldo, ldb = FFN1 ? 0 : b.ldb, lds = b.lds, col_panel0 = b.col0 / PW;
  unsigned char* const sneg = b.sneg;
  unsigned char* const snz = b.snz;
  const __m256 zero = _mm256_setzero_ps();
  for (int c = 0; c < C; ++c) {
    // the shortcut's column, once per panel (its period is a multiple of 8: no wrap inside a panel)
    const OutT* shortcut_c =
        FFN1 || b.shortcut ? static_cast<const OutT*>(b.shortcut) + (b.col0 + PW * c) % b.period : nullptr;
    const OutT* s = scale ? scale + PW * c : nullptr;
    const OutT* sl = FFN1 || slope ? slope + PW * c : nullptr;
    const OutT* of = FFN1 || slope ? offset + PW * c : nullptr;
    const __mmask8 m = FFN1 ? 0xff : masks[c];
    PanelPs ps;
    if constexpr (is_float) {
      ps.scale = _mm256_maskz_loadu_ps(m, s);
      ps.bias = _mm256_maskz_loadu_ps(m, bias + PW * c);  // row 0's; the only one when ldb == 0
      ps.slope = sl ? _mm256_maskz_loadu_ps(m, sl) : zero;
      ps.offset = sl ? _mm256_maskz_loadu_ps(m, of) : zero;
    }
    __m256 panel[PW];
    for (int r = 0; r < rows; ++r) {
      __m512i base;
      if (MODE == XOR) base = _mm512_set1_epi64(K);
      else if (MODE == MASK_A) base = _mm512_set1_epi64(acnt[r]);
      else if (MODE == MASK_B) base = base_b[c];
      else base = accp[r][MODE == BOTH ? c : 0];
      const __m512i v = _mm512_sub_epi64(base, _mm512_slli_epi64(acc[r][c], 1));
      OutT* o = out + r * ldo + PW * c;
      const OutT* sc = FFN1 || shortcut_c ? shortcut_c + r * lds : nullptr;
      if constexpr (is_float) {
        const __m256 bias_r = ldb ? _mm256_maskz_loadu_ps(m, bias + r * ldb + PW * c) : ps.bias;
        const __m256 y = epilogue8_ps(v, ps, bias_r, sc, FFN1 || sl != nullptr, m);
        if (!FFN1) store8_ps(o, y, m);
        if (FFN1 || sneg) {  // a NaN packs as 0, as pack_signs does
          const int64_t byte = sign_byte(col_panel0 + c, r);
          sneg[byte] = _mm256_mask_cmp_ps_mask(m, y, zero, _CMP_LT_OQ);
          snz[byte] = _mm256_mask_cmp_ps_mask(m, y, zero, _CMP_NEQ_OQ);
        }
        panel[r] = y;
      } else {
        store8_avx512<OutT>(v, o, s, bias ? bias + r * ldb + PW * c : nullptr, sc, sl, of, m);
      }
    }
    if (panel_means)
      panel_means_avx2(panel, b.group, static_cast<float*>(b.means) + (b.col0 + PW * c) / b.group, b.ldm);
  }
  if constexpr (is_float && !FFN1) {
    if (b.means && !panel_means) group_means<float>(b);
  }
}

template <int MODE, int C, typename OutT>
TGT_AVX512 void block_avx512(const Block& b) {
  __m512i acc[PW][C], accp[PW][MODE == BOTH ? C : 1];
  for (int r = 0; r < PW; ++r)
    for (int c = 0; c < C; ++c) {
      acc[r][c] = _mm512_setzero_si512();
      if (MODE == BOTH) accp[r][c] = _mm512_setzero_si512();
    }
  const int64_t pstride = b.Kw * PW;
  const u64* an = b.an;
  const u64* az = b.az;
  for (int64_t k = 0; k < b.Kw; ++k, an += PW, az += PW) {
    __m512i bn[C], bz[C];
    for (int c = 0; c < C; ++c) {
      bn[c] = _mm512_loadu_si512(b.bn + c * pstride + k * PW);
      if (MODE == MASK_B || MODE == BOTH) bz[c] = _mm512_loadu_si512(b.bz + c * pstride + k * PW);
    }
    for (int r = 0; r < PW; ++r) {
      const __m512i a = _mm512_set1_epi64(static_cast<long long>(an[r]));
      __m512i za = a;
      if (MODE == MASK_A || MODE == BOTH) za = _mm512_set1_epi64(static_cast<long long>(az[r]));
      for (int c = 0; c < C; ++c) {
        __m512i x;
        if (MODE == XOR) {
          x = _mm512_xor_si512(a, bn[c]);
        } else if (MODE == MASK_A) {
          x = _mm512_ternarylogic_epi64(za, a, bn[c], 0x60);  // za & (a ^ bn)
        } else if (MODE == MASK_B) {
          x = _mm512_ternarylogic_epi64(bz[c], a, bn[c], 0x60);
        } else {
          const __m512i p = _mm512_and_si512(za, bz[c]);
          x = _mm512_ternarylogic_epi64(p, a, bn[c], 0x60);
          accp[r][c] = _mm512_add_epi64(accp[r][c], _mm512_popcnt_epi64(p));
        }
        acc[r][c] = _mm512_add_epi64(acc[r][c], _mm512_popcnt_epi64(x));
      }
    }
  }
  __mmask8 masks[C];
  __m512i base_b[C];
  for (int c = 0; c < C; ++c) {
    const int n = std::max(0, std::min(PW, b.cols - PW * c));
    masks[c] = static_cast<__mmask8>((1u << n) - 1);
    if (MODE == MASK_B)
      base_b[c] = _mm512_cvtepi32_epi64(_mm256_maskz_loadu_epi32(masks[c], b.bcnt + PW * c));
  }
  if constexpr (std::is_same<OutT, float>::value) {
    // A binary FFN's first layer: shortcut, PReLU, packed signs and vectorised means on full panels,
    // with one bias row; its results are never stored, and the compiler sees every condition fixed.
    if (b.sneg && b.shortcut && b.slope && b.means && b.ldb == 0 && b.cols == PW * C && panel_means_fit(b)) {
      finish_block_avx512<MODE, C, OutT, true>(b, acc, accp, base_b, masks);
      return;
    }
  }
  finish_block_avx512<MODE, C, OutT, false>(b, acc, accp, base_b, masks);
}
#endif  // TBV_X86

// Each row's count of nonzeros from the nz plane; returns how many of the M rows have a zero.
AI int64_t count_rows(const u64* nz, int64_t panels, int64_t Kw, int64_t M, int64_t N, int32_t* cnt) {
  int64_t with_zero = 0;
  for (int64_t p = 0; p < panels; ++p) {
    for (int r = 0; r < PW; ++r) {
      int32_t count = 0;
      for (int64_t k = 0; k < Kw; ++k) count += __builtin_popcountll(nz[(p * Kw + k) * PW + r]);
      cnt[p * PW + r] = count;
      if (p * PW + r < M && count != N) ++with_zero;
    }
  }
  return with_zero;
}

#if defined(TBV_X86)
// the same with the POPCNT instruction (see block_portable_popcnt)
TGT_POPCNT int64_t count_rows_popcnt(const u64* nz, int64_t panels, int64_t Kw, int64_t M, int64_t N, int32_t* cnt) {
  return count_rows(nz, panels, Kw, M, N, cnt);
}
#endif

int64_t count_nonzeros(const u64* nz, int64_t panels, int64_t Kw, int64_t M, int64_t N, int32_t* cnt, bool popcnt) {
#if defined(TBV_X86)
  if (popcnt) return count_rows_popcnt(nz, panels, Kw, M, N, cnt);
#endif
  (void)popcnt;
  return count_rows(nz, panels, Kw, M, N, cnt);
}

using BlockFn = void (*)(const Block&);
// After a block: the means of its column groups and its signs as packed bits (neg null: none), both
// read from the results just written to b.out (still in the L1 cache).
using FinishFn = void (*)(const Block&, unsigned char*, unsigned char*);

template <typename OutT>
void finish_portable(const Block& b, unsigned char* neg, unsigned char* nz) {
  if (neg) pack_tile<OutT>(static_cast<const OutT*>(b.out), static_cast<int>(b.ldo), b, neg, nz);
  group_means<OutT>(b);
}

// Blocks of 1..cmax panels for one (isa, mode, output type).
template <int MODE, typename OutT>
int block_table(int isa, BlockFn* fns) {
#if defined(TBV_X86)
  if (isa == ISA_AVX512) {
    if (MODE == BOTH) {  // two counters per lane: one panel per block keeps them in registers
      fns[0] = block_avx512<MODE, 1, OutT>;
      return 1;
    }
    fns[0] = block_avx512<MODE, 1, OutT>;
    fns[1] = block_avx512<MODE, 2, OutT>;
    fns[2] = block_avx512<MODE, 3, OutT>;
    return 3;
  }
  if (isa == ISA_AVX2) {
    fns[0] = block_avx2<MODE, 1, OutT>;
    return 1;
  }
  if (has_popcnt()) {
    fns[0] = block_portable_popcnt<MODE, 1, OutT>;
    return 1;
  }
#endif
  fns[0] = block_portable<MODE, 1, OutT>;
  return 1;
}

template <typename OutT>
int block_table_mode(int isa, int mode, BlockFn* fns) {
  switch (mode) {
    case XOR: return block_table<XOR, OutT>(isa, fns);
    case MASK_A: return block_table<MASK_A, OutT>(isa, fns);
    case MASK_B: return block_table<MASK_B, OutT>(isa, fns);
    default: return block_table<BOTH, OutT>(isa, fns);
  }
}

}  // namespace

// out[b, i, j] = sum_k a[b, i, k] * b[b, j, k]   (int32), or y = that times scale[j] plus bias[b, i, j],
// plus, with a shortcut (M, P) (batch 1, P a multiple of 8 dividing N, or N), shortcut[i, j % P];
// then, with prelu_slope and prelu_offset, max(y, slope[j] * y + offset[j]) (a PReLU with a carried
// constant, for slopes <= 1; see the deploy runtime's FoldedPReLU); with means (M, G) (batch 1, unit
// column stride, E = N / G dividing 8), also means[i, g] = the mean of out[i, g E .. g E + E - 1].
// a planes (Ba, P, Kw, 8) and b planes (Bb, Q, Kw, 8), Ba and Bb each 1 or the batch of out;
// out (batch, M, N) or (M, N) with unit column stride; bias (N,), or expanded to out's shape (zero
// strides allowed).
int64_t sign_gemm(const torch::Tensor& aneg, const torch::Tensor& anz, const torch::Tensor& acnt, bool a_zeros,
               const torch::Tensor& bneg, const torch::Tensor& bnz, const torch::Tensor& bcnt, bool b_zeros,
               int64_t K, torch::Tensor out, const c10::optional<torch::Tensor>& scale,
               c10::optional<torch::Tensor> bias, const c10::optional<torch::Tensor>& shortcut,
               const c10::optional<torch::Tensor>& prelu_slope, const c10::optional<torch::Tensor>& prelu_offset,
               const c10::optional<torch::Tensor>& means, const c10::optional<torch::Tensor>& signs_neg,
               const c10::optional<torch::Tensor>& signs_nz, const c10::optional<torch::Tensor>& signs_cnt,
               int64_t isa) {
  check_isa(isa);
  check_planes(aneg, "a.neg"); check_planes(anz, "a.nz"); check_planes(bneg, "b.neg"); check_planes(bnz, "b.nz");
  const bool to_signs = signs_neg.has_value();
  TORCH_CHECK(to_signs == signs_nz.has_value() && to_signs == signs_cnt.has_value(),
              "packed sign output needs neg, nz and cnt");
  // With a packed sign output, out only gives the result's shape and dtype (it may have zero strides).
  if (out.dim() == 2) out = out.unsqueeze(0);
  TORCH_CHECK(out.dim() == 3 && (out.stride(2) == 1 || to_signs), "out must be 3-D with unit column stride");
  const int64_t batch = out.size(0), M = out.size(1), N = out.size(2);
  if (bias.has_value() && bias->dim() == 1) {
    TORCH_CHECK(bias->size(0) == N && bias->is_contiguous(), "a 1-D bias must be contiguous (N,)");
    bias = bias->expand({batch, M, N});
  }
  const int64_t Kw = aneg.size(2), P = aneg.size(1), Q = bneg.size(1);
  TORCH_CHECK(bneg.size(2) == Kw && Kw == (K + 63) / 64, "a and b disagree on the packed K");
  TORCH_CHECK(P * PW >= M && Q * PW >= N, "out is larger than the packed operands");
  TORCH_CHECK(aneg.size(0) == 1 || aneg.size(0) == batch, "a's batch must be 1 or out's");
  TORCH_CHECK(bneg.size(0) == 1 || bneg.size(0) == batch, "b's batch must be 1 or out's");
  TORCH_CHECK(acnt.scalar_type() == torch::kInt32 && bcnt.scalar_type() == torch::kInt32 &&
              acnt.is_contiguous() && bcnt.is_contiguous(), "row counts must be contiguous int32");
  const auto dtype = out.scalar_type();
  const bool is_float = dtype == torch::kFloat32 || dtype == torch::kFloat64;
  TORCH_CHECK(is_float || dtype == torch::kInt32, "out must be int32, float32 or float64");
  TORCH_CHECK(is_float == (scale.has_value() && bias.has_value()), "float output needs scale and bias, int32 none");
  if (is_float) {
    TORCH_CHECK(scale->scalar_type() == dtype && bias->scalar_type() == dtype, "scale and bias must have out's dtype");
    TORCH_CHECK(scale->dim() == 1 && scale->size(0) == N && scale->is_contiguous(), "scale must be contiguous (N,)");
    TORCH_CHECK(bias->dim() == 3 && bias->size(0) == batch && bias->size(1) == M && bias->size(2) == N &&
                (bias->stride(2) == 1 || N == 1), "bias must be expanded to out's shape with unit column stride");
  }
  if (shortcut.has_value()) {
    TORCH_CHECK(is_float && batch == 1, "a shortcut needs a float output of batch 1");
    const int64_t P = shortcut->dim() == 2 ? shortcut->size(1) : 0;
    TORCH_CHECK(shortcut->scalar_type() == dtype && P > 0 && shortcut->size(0) == M &&
                (shortcut->stride(1) == 1 || P == 1) && N % P == 0 && (P % PW == 0 || P == N),
                "shortcut must be (M, P) of out's dtype with unit column stride, P == N or a multiple of 8 dividing N");
  }
  int group = 1;
  if (means.has_value()) {
    TORCH_CHECK(is_float && batch == 1 && means->scalar_type() == dtype && means->dim() == 2 &&
                means->size(0) == M && means->size(1) > 0 && N % means->size(1) == 0 &&
                (means->stride(1) == 1 || means->size(1) == 1),
                "means must be (M, G) of out's dtype with unit column stride, G dividing N, for batch 1");
    group = static_cast<int>(N / means->size(1));
    TORCH_CHECK(PW % group == 0, "group means need groups of 1, 2, 4 or 8 columns, not ", group);
  }
  TORCH_CHECK(prelu_slope.has_value() == prelu_offset.has_value(), "the PReLU epilogue needs slope and offset");
  if (prelu_slope.has_value()) {
    TORCH_CHECK(is_float, "the PReLU epilogue needs a float output");
    for (const auto* t : {&*prelu_slope, &*prelu_offset})
      TORCH_CHECK(t->scalar_type() == dtype && t->dim() == 1 && t->size(0) == N && t->is_contiguous(),
                  "PReLU slope and offset must be contiguous (N,) tensors of out's dtype");
  }
  if (to_signs) {
    TORCH_CHECK(is_float && batch == 1, "a packed sign output needs a float result of batch 1");
    check_planes(*signs_neg, "signs.neg");
    check_planes(*signs_nz, "signs.nz");
    TORCH_CHECK(signs_neg->size(0) == 1 && signs_neg->sizes() == signs_nz->sizes() &&
                signs_neg->size(1) == (M + PW - 1) / PW && signs_neg->size(2) == (N + 63) / 64,
                "signs planes must be (1, ceil(M / 8), ceil(N / 64), 8)");
    TORCH_CHECK(signs_cnt->scalar_type() == torch::kInt32 && signs_cnt->is_contiguous() &&
                signs_cnt->numel() == signs_neg->size(1) * PW, "signs cnt must be contiguous int32 (8 ceil(M / 8))");
  }
  if (M == 0 || N == 0 || batch == 0) return 0;
  const int mode = (a_zeros ? 1 : 0) + (b_zeros ? 2 : 0);

  BlockFn fns[3];
  int cmax;
  if (dtype == torch::kInt32) cmax = block_table_mode<int32_t>(static_cast<int>(isa), mode, fns);
  else if (dtype == torch::kFloat32) cmax = block_table_mode<float>(static_cast<int>(isa), mode, fns);
  else cmax = block_table_mode<double>(static_cast<int>(isa), mode, fns);

  const int64_t Pm = (M + PW - 1) / PW, Qn = (N + PW - 1) / PW;
  const int64_t a_bs = aneg.size(0) == 1 ? 0 : P * Kw * PW, b_bs = bneg.size(0) == 1 ? 0 : Q * Kw * PW;
  const int64_t ac_bs = aneg.size(0) == 1 ? 0 : acnt.size(-1), bc_bs = bneg.size(0) == 1 ? 0 : bcnt.size(-1);
  // Split the columns too when there are few row panels, so that every thread has work.
  const int64_t threads = at::get_num_threads();
  int64_t chunks = 1;
  if (batch * Pm < 4 * threads) chunks = std::min<int64_t>((Qn + cmax - 1) / cmax, (4 * threads + batch * Pm - 1) / (batch * Pm));
  const int64_t per_chunk = ((Qn + chunks - 1) / chunks + cmax - 1) / cmax * cmax;
  chunks = (Qn + per_chunk - 1) / per_chunk;

  const u64 *an0 = words(aneg), *az0 = words(anz), *bn0 = words(bneg), *bz0 = words(bnz);
  const int32_t *ac0 = acnt.data_ptr<int32_t>(), *bc0 = bcnt.data_ptr<int32_t>();
  char* out0 = static_cast<char*>(out.data_ptr());
  const int64_t esize = out.element_size();
  const char* scale0 = is_float ? static_cast<const char*>(scale->data_ptr()) : nullptr;
  const char* bias0 = is_float ? static_cast<const char*>(bias->data_ptr()) : nullptr;
  const int64_t sb_b = is_float ? bias->stride(0) : 0, sb_m = is_float ? bias->stride(1) : 0;
  const char* shortcut0 = shortcut.has_value() ? static_cast<const char*>(shortcut->data_ptr()) : nullptr;
  const int64_t lds = shortcut.has_value() ? shortcut->stride(0) : 0;
  const int64_t period = shortcut.has_value() ? shortcut->size(1) : 1;
  const char* slope0 = prelu_slope.has_value() ? static_cast<const char*>(prelu_slope->data_ptr()) : nullptr;
  const char* offset0 = prelu_offset.has_value() ? static_cast<const char*>(prelu_offset->data_ptr()) : nullptr;

  FinishFn finish = dtype == torch::kFloat64 ? finish_portable<double> : finish_portable<float>;
#if defined(TBV_X86)
  if (dtype == torch::kFloat32 && isa >= ISA_AVX2) finish = finish_float_avx2;
#endif
  // the AVX-512 blocks finish float results themselves (block_avx512)
  const bool block_finishes = isa == ISA_AVX512 && dtype == torch::kFloat32;
  const bool finishing = (to_signs || means.has_value()) && !block_finishes;
  const int64_t Kw_out = to_signs ? signs_neg->size(2) : 0;
  unsigned char* sneg0 = to_signs ? reinterpret_cast<unsigned char*>(signs_neg->data_ptr<int64_t>()) : nullptr;
  unsigned char* snz0 = to_signs ? reinterpret_cast<unsigned char*>(signs_nz->data_ptr<int64_t>()) : nullptr;
  if (to_signs && (M % PW || N % 64)) {  // padding rows and columns are 0; blocks write only real ones
    signs_neg->zero_();
    signs_nz->zero_();
  }

  at::parallel_for(0, batch * Pm * chunks, 1, [&](int64_t begin, int64_t end) {
    alignas(64) double tile[PW * TILE_LD];  // a block's float results on their way to packed signs
    for (int64_t it = begin; it < end; ++it) {
      const int64_t bi = it / (Pm * chunks), p = (it / chunks) % Pm, ch = it % chunks;
      Block blk;
      blk.scale = blk.bias = blk.slope = blk.offset = blk.shortcut = nullptr;
      blk.sneg = blk.snz = nullptr;
      blk.lds = lds;
      blk.period = period;
      if (shortcut0) blk.shortcut = shortcut0 + esize * (p * PW * lds);
      blk.group = group;
      blk.ldm = means.has_value() ? means->stride(0) : 0;
      blk.means = means.has_value() ? static_cast<char*>(means->data_ptr()) + esize * (p * PW * blk.ldm) : nullptr;
      blk.an = an0 + bi * a_bs + p * Kw * PW;
      blk.az = az0 + bi * a_bs + p * Kw * PW;
      blk.acnt = ac0 + bi * ac_bs + p * PW;
      blk.Kw = Kw;
      blk.K = static_cast<int32_t>(K);
      blk.rows = static_cast<int>(std::min<int64_t>(PW, M - p * PW));
      blk.ldo = out.stride(1);
      blk.ldb = sb_m;
      const int64_t q1 = std::min(Qn, (ch + 1) * per_chunk);
      for (int64_t q = ch * per_chunk; q < q1; q += cmax) {
        const int c = static_cast<int>(std::min<int64_t>(cmax, q1 - q));
        blk.bn = bn0 + bi * b_bs + q * Kw * PW;
        blk.bz = bz0 + bi * b_bs + q * Kw * PW;
        blk.bcnt = bc0 + bi * bc_bs + q * PW;
        blk.cols = static_cast<int>(std::min<int64_t>(PW * c, N - q * PW));
        blk.col0 = q * PW;
        blk.out = out0 + esize * (bi * out.stride(0) + p * PW * out.stride(1) + q * PW);
        if (is_float) {
          blk.scale = scale0 + esize * (q * PW);
          blk.bias = bias0 + esize * (bi * sb_b + p * PW * sb_m + q * PW);
          if (slope0) {
            blk.slope = slope0 + esize * (q * PW);
            blk.offset = offset0 + esize * (q * PW);
          }
        }
        if (to_signs) {
          blk.out = tile;
          blk.ldo = TILE_LD;
          if (block_finishes) {
            blk.sneg = sneg0 + p * Kw_out * PW * 8;
            blk.snz = snz0 + p * Kw_out * PW * 8;
          }
        }
        fns[c - 1](blk);
        if (finishing) {
          const int64_t at = p * Kw_out * PW * 8;  // the row panel's first byte of the packed signs
          finish(blk, to_signs ? sneg0 + at : nullptr, to_signs ? snz0 + at : nullptr);
        }
      }
    }
  });
  if (!to_signs) return 0;
  return count_nonzeros(words(*signs_nz), Pm, Kw_out, M, N, signs_cnt->data_ptr<int32_t>(), has_popcnt());
}

// Empty planes and row counts of a packed operand of (batch, rows, cols): one call instead of three
// tensor allocations from Python, whose overhead costs more than packing a small operand.
std::vector<torch::Tensor> new_planes(int64_t batch, int64_t rows, int64_t cols) {
  TORCH_CHECK(batch >= 0 && rows >= 0 && cols >= 0, "planes need non-negative sizes");
  const int64_t panels = (rows + PW - 1) / PW, words = (cols + 63) / 64;
  const auto i64 = torch::TensorOptions().dtype(torch::kInt64);
  return {torch::empty({batch, panels, words, PW}, i64), torch::empty({batch, panels, words, PW}, i64),
          torch::empty({batch, panels * PW}, torch::TensorOptions().dtype(torch::kInt32))};
}

std::vector<int64_t> supported_isas() {
  std::vector<int64_t> out;
  for (int i = ISA_AVX512; i >= ISA_PORTABLE; --i)
    if (isa_supported(i)) out.push_back(i);
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "timm-binaryvit bit-packed sign products";
  m.def("sign_gemm", &sign_gemm, "exact product of packed ternary operands");
  m.def("pack", &pack, "fused shift + sign (or compare) + pack");
  m.def("from_sign_bits", &from_sign_bits, "packed file bits -> kernel planes");
  m.def("new_planes", &new_planes, "empty planes and row counts of a packed operand");
  m.def("supported_isas", &supported_isas, "isa codes this CPU runs, best first");
  m.def("binary_attention", &binary_attention, "binary attention (dots, softmax mask, context) in one pass");
  m.def("approx_sign_backward", &approx_sign_backward, "ApproxSign's pseudo-gradient in one pass");
  m.def("prelu_backward", &prelu_backward, "PReLU backward with its column sums in one pass");
}
