// pt2q's fused dequantize + GEMV kernels for its packed int4 / int8 weights (x86: AVX2+FMA, AVX-512).
//
// Ops (namespace pt2q, CPU):
//   int4_linear_avx2, int8_linear_avx2, int4_linear_avx512, int8_linear_avx512
//   (Tensor x, Tensor words, Tensor scales, Tensor zero_terms, int group_size, int out_features) -> Tensor
// x: [M, K] fp32 / bf16 / fp16, K <= the packed K (missing columns count as zeros); the result is [M, N] in
// x's dtype, accumulated in fp32. The layout is described in weight_only_body.h; the Python loader
// (kernels/__init__.py) packs it and registers the fake kernels.
//
// M < kDequantizeRows: every activation row runs the GEMV against the packed words (decode). Larger M
// (prefill): tiles of 64 weight rows are dequantized to fp32 and multiplied with at::mm.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <immintrin.h>
#include <torch/library.h>

#include <cstdint>
#include <algorithm>
#include <cstring>
#include <utility>

namespace pt2q_kernels {

constexpr int64_t kDequantizeRows = 16;
constexpr int64_t kTileRowBlocks = 16;  // 64 weight rows per prefill tile

#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace avx2 {
struct V {
  static constexpr int L = 8;
  using f = __m256;
  using i = __m256i;
  static inline f loadf(const float* p) { return _mm256_loadu_ps(p); }
  static inline i loadi(const int32_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
  static inline i set1i(int v) { return _mm256_set1_epi32(v); }
  static inline i and_(i a, i b) { return _mm256_and_si256(a, b); }
  template <int S>
  static inline i srli(i a) { return _mm256_srli_epi32(a, S); }
  static inline f cvt(i a) { return _mm256_cvtepi32_ps(a); }
  static inline f fma(f a, f b, f c) { return _mm256_fmadd_ps(a, b, c); }
  static inline f fmsub(f a, f b, f c) { return _mm256_fmsub_ps(a, b, c); }
  static inline i srlv(i a, int count) { return _mm256_srl_epi32(a, _mm_cvtsi32_si128(count)); }
  static inline void storef(float* p, f a) { _mm256_storeu_ps(p, a); }
  static inline f bcast(const float* p) { return _mm256_broadcast_ss(p); }
  static inline f zerof() { return _mm256_setzero_ps(); }
  // (sum of t[0], ..., sum of t[3])
  static inline __m128 hsum4(const f (&t)[4]) {
    const f h = _mm256_hadd_ps(_mm256_hadd_ps(t[0], t[1]), _mm256_hadd_ps(t[2], t[3]));
    return _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
  }
};
#include "weight_only_body.h"
}  // namespace avx2
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512dq,avx512vl,avx2,fma")
namespace avx512 {
struct V {
  static constexpr int L = 16;
  using f = __m512;
  using i = __m512i;
  static inline f loadf(const float* p) { return _mm512_loadu_ps(p); }
  static inline i loadi(const int32_t* p) { return _mm512_loadu_si512(p); }
  static inline i set1i(int v) { return _mm512_set1_epi32(v); }
  static inline i and_(i a, i b) { return _mm512_and_si512(a, b); }
  template <int S>
  static inline i srli(i a) { return _mm512_srli_epi32(a, S); }
  static inline f cvt(i a) { return _mm512_cvtepi32_ps(a); }
  static inline f fma(f a, f b, f c) { return _mm512_fmadd_ps(a, b, c); }
  static inline f fmsub(f a, f b, f c) { return _mm512_fmsub_ps(a, b, c); }
  static inline i srlv(i a, int count) { return _mm512_srl_epi32(a, _mm_cvtsi32_si128(count)); }
  static inline void storef(float* p, f a) { _mm512_storeu_ps(p, a); }
  static inline f bcast(const float* p) { return _mm512_set1_ps(*p); }
  static inline f zerof() { return _mm512_setzero_ps(); }
  static inline __m256 fold(f a) {
    return _mm256_add_ps(_mm512_castps512_ps256(a), _mm512_extractf32x8_ps(a, 1));
  }
  static inline __m128 hsum4(const f (&t)[4]) {
    const __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(fold(t[0]), fold(t[1])), _mm256_hadd_ps(fold(t[2]), fold(t[3])));
    return _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
  }
};
#include "weight_only_body.h"
}  // namespace avx512
#pragma GCC pop_options

enum class Isa { kAvx2, kAvx512 };

int lanes(Isa isa) { return isa == Isa::kAvx512 ? 16 : 8; }

const char* isa_name(Isa isa) { return isa == Isa::kAvx512 ? "avx512" : "avx2"; }

void check_cpu(Isa isa) {
  // A guard against SIGILL (e.g. a graph lowered on another machine); pt2q.isa decides which op is used.
  const bool ok = isa == Isa::kAvx512
      ? (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl"))
      : (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"));
  TORCH_CHECK(ok, "pt2q::int*_linear_", isa_name(isa), ": this CPU lacks the ", isa_name(isa),
              " instructions the kernel was packed for; lower the graph again on this machine "
              "(pt2q.backends.inductor.compile picks the kernel from pt2q.isa.detect())");
}

template <typename T>
void prescale_rows(const T* x, int64_t m_rows, int64_t k, int64_t x_stride, int bits, int l, int64_t kp,
                   int64_t group_size, int64_t groups, float* xp, float* xsum) {
  const int p = 32 / bits;
  float factor[8];
  for (int j = 0; j < p; ++j) factor[j] = j == p - 1 ? 1.0f : 1.0f / static_cast<float>(1u << (bits * j));
  at::parallel_for(0, m_rows, 1, [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m) {
      const T* row = x + m * x_stride;
      float* out = xp + m * kp;
      float* sums = xsum + m * groups;
      std::memset(sums, 0, sizeof(float) * groups);
      for (int64_t c = 0; c < kp; ++c) {
        const float v = c < k ? static_cast<float>(row[c]) : 0.0f;
        out[c] = v * factor[(c / l) % p];
        sums[c / group_size] += v;
      }
    }
  });
}

template <typename T>
void store(const float* y, int64_t m_rows, int64_t y_stride, int64_t n, T* out) {
  for (int64_t m = 0; m < m_rows; ++m) {
    for (int64_t c = 0; c < n; ++c) out[m * n + c] = static_cast<T>(y[m * y_stride + c]);
  }
}

at::Tensor linear(Isa isa, int bits, const at::Tensor& x_in, const at::Tensor& words, const at::Tensor& scales,
                  const at::Tensor& zero_terms, int64_t group_size, int64_t out_features) {
  const char* op = bits == 4 ? (isa == Isa::kAvx512 ? "pt2q::int4_linear_avx512" : "pt2q::int4_linear_avx2")
                             : (isa == Isa::kAvx512 ? "pt2q::int8_linear_avx512" : "pt2q::int8_linear_avx2");
  const int l = lanes(isa), p = 32 / bits;
  TORCH_CHECK(x_in.dim() == 2, op, ": x must be 2-D [M, K], got ", x_in.sizes());
  TORCH_CHECK(x_in.scalar_type() == at::kFloat || x_in.scalar_type() == at::kBFloat16 ||
                  x_in.scalar_type() == at::kHalf,
              op, ": x must be float32, bfloat16 or float16, got ", x_in.scalar_type());
  TORCH_CHECK(words.scalar_type() == at::kInt && words.dim() == 4 && words.size(2) == 4 && words.size(3) == l &&
                  words.is_contiguous(),
              op, ": words must be contiguous int32 [N/4, blocks, 4, ", l, "] (packed by "
              "pt2q.backends.inductor.kernels.pack for this ISA), got ", words.scalar_type(), " ", words.sizes());
  const int64_t row_blocks = words.size(0), blocks = words.size(1), kp = blocks * p * l;
  const int64_t groups = scales.size(1);
  TORCH_CHECK(scales.scalar_type() == at::kFloat && zero_terms.scalar_type() == at::kFloat &&
                  scales.is_contiguous() && zero_terms.is_contiguous() && scales.dim() == 3 &&
                  scales.sizes() == zero_terms.sizes() && scales.size(0) == row_blocks && scales.size(2) == 4,
              op, ": scales and zero_terms must be contiguous float32 [N/4, groups, 4] matching words");
  TORCH_CHECK(group_size > 0 && groups == (kp + group_size - 1) / group_size, op, ": ", groups,
              " groups do not cover K=", kp, " in groups of ", group_size);
  TORCH_CHECK(out_features > 0 && out_features <= row_blocks * 4 && out_features > row_blocks * 4 - 4, op,
              ": out_features=", out_features, " does not match ", row_blocks, " blocks of 4 rows");
  TORCH_CHECK(x_in.size(1) <= kp, op, ": x has K=", x_in.size(1), " > the packed K=", kp);
  check_cpu(isa);
  const int64_t m_rows = x_in.size(0), k = x_in.size(1);
  at::Tensor out = at::empty({m_rows, out_features}, x_in.options());
  if (m_rows == 0) return out;

  if (m_rows >= kDequantizeRows) {
    // Prefill: per task, tiles of kTileRowBlocks * 4 weight rows dequantized to fp32 (L2-sized for K of a
    // few thousand) and multiplied with at::mm; the weight never exists in fp32 as a whole.
    at::Tensor xf = x_in.to(at::kFloat);
    if (k < kp) xf = at::constant_pad_nd(xf, {0, kp - k}, 0.0);
    xf = xf.contiguous();
    const int32_t* w = words.data_ptr<int32_t>();
    const float *s = scales.data_ptr<float>(), *z = zero_terms.data_ptr<float>();
    const int64_t tiles = (row_blocks + kTileRowBlocks - 1) / kTileRowBlocks;
    at::parallel_for(0, tiles, 1, [&](int64_t begin, int64_t end) {
      at::Tensor tile = at::empty({kTileRowBlocks * 4, kp}, xf.options());
      for (int64_t t = begin; t < end; ++t) {
        const int64_t nb0 = t * kTileRowBlocks, nb1 = std::min(row_blocks, nb0 + kTileRowBlocks);
        float* tp = tile.data_ptr<float>();
        if (isa == Isa::kAvx512) {
          if (bits == 4) avx512::dequantize_row_blocks<4>(w, s, z, nb0, nb1, kp, group_size, groups, tp);
          else avx512::dequantize_row_blocks<8>(w, s, z, nb0, nb1, kp, group_size, groups, tp);
        } else {
          if (bits == 4) avx2::dequantize_row_blocks<4>(w, s, z, nb0, nb1, kp, group_size, groups, tp);
          else avx2::dequantize_row_blocks<8>(w, s, z, nb0, nb1, kp, group_size, groups, tp);
        }
        const int64_t n0 = nb0 * 4, width = std::min(out_features, nb1 * 4) - n0;
        out.narrow(1, n0, width).copy_(at::mm(xf, tile.narrow(0, 0, width).t()));
      }
    });
    return out;
  }

  const at::Tensor x = x_in.stride(1) == 1 ? x_in : x_in.contiguous();
  at::Tensor xp = at::empty({m_rows, kp}, x.options().dtype(at::kFloat));
  at::Tensor xsum = at::empty({m_rows, groups}, x.options().dtype(at::kFloat));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "pt2q_prescale", [&] {
    prescale_rows<scalar_t>(x.data_ptr<scalar_t>(), m_rows, k, x.stride(0), bits, l, kp, group_size, groups,
                            xp.data_ptr<float>(), xsum.data_ptr<float>());
  });
  const bool direct = x.scalar_type() == at::kFloat && out_features == row_blocks * 4;
  at::Tensor y = direct ? out : at::empty({m_rows, row_blocks * 4}, x.options().dtype(at::kFloat));
  const int32_t* w = words.data_ptr<int32_t>();
  const float *s = scales.data_ptr<float>(), *z = zero_terms.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const int64_t y_stride = row_blocks * 4;
  if (isa == Isa::kAvx512) {
    if (bits == 4) avx512::gemv<4>(xp.data_ptr<float>(), xsum.data_ptr<float>(), m_rows, kp, w, s, z, row_blocks,
                                   group_size, groups, yp, y_stride);
    else avx512::gemv<8>(xp.data_ptr<float>(), xsum.data_ptr<float>(), m_rows, kp, w, s, z, row_blocks,
                         group_size, groups, yp, y_stride);
  } else {
    if (bits == 4) avx2::gemv<4>(xp.data_ptr<float>(), xsum.data_ptr<float>(), m_rows, kp, w, s, z, row_blocks,
                                 group_size, groups, yp, y_stride);
    else avx2::gemv<8>(xp.data_ptr<float>(), xsum.data_ptr<float>(), m_rows, kp, w, s, z, row_blocks,
                       group_size, groups, yp, y_stride);
  }
  if (!direct) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, out.scalar_type(), "pt2q_store", [&] {
      store<scalar_t>(yp, m_rows, y_stride, out_features, out.data_ptr<scalar_t>());
    });
  }
  return out;
}

#define PT2Q_LINEAR_OP(NAME, ISA, BITS)                                                                         \
  at::Tensor NAME(const at::Tensor& x, const at::Tensor& words, const at::Tensor& scales,                    \
                  const at::Tensor& zero_terms, int64_t group_size, int64_t out_features) {                   \
    return linear(ISA, BITS, x, words, scales, zero_terms, group_size, out_features);                       \
  }
PT2Q_LINEAR_OP(int4_linear_avx2, Isa::kAvx2, 4)
PT2Q_LINEAR_OP(int8_linear_avx2, Isa::kAvx2, 8)
PT2Q_LINEAR_OP(int4_linear_avx512, Isa::kAvx512, 4)
PT2Q_LINEAR_OP(int8_linear_avx512, Isa::kAvx512, 8)
#undef PT2Q_LINEAR_OP

}  // namespace pt2q_kernels

#define PT2Q_SCHEMA "(Tensor x, Tensor words, Tensor scales, Tensor zero_terms, int group_size, int out_features) -> Tensor"

TORCH_LIBRARY_FRAGMENT(pt2q, m) {
  m.def("int4_linear_avx2" PT2Q_SCHEMA);
  m.def("int8_linear_avx2" PT2Q_SCHEMA);
  m.def("int4_linear_avx512" PT2Q_SCHEMA);
  m.def("int8_linear_avx512" PT2Q_SCHEMA);
}

TORCH_LIBRARY_IMPL(pt2q, CPU, m) {
  m.impl("int4_linear_avx2", &pt2q_kernels::int4_linear_avx2);
  m.impl("int8_linear_avx2", &pt2q_kernels::int8_linear_avx2);
  m.impl("int4_linear_avx512", &pt2q_kernels::int4_linear_avx512);
  m.impl("int8_linear_avx512", &pt2q_kernels::int8_linear_avx512);
}
