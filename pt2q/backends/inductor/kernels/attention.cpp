// pt2q's fused attention for CPUs with AVX512-BF16: softmax(q k^T * scale + mask) v in one pass per head,
// the two matmuls as bf16 dot products (vdpbf16ps, fp32 accumulation), the softmax in fp32.
//
// Op (namespace pt2q, CPU):
//   attention_bf16(Tensor q, Tensor k, Tensor v, Tensor? mask, float scale, bool is_causal) -> Tensor
// q [B, H, S, D], k and v [B, H, T, D], fp32 or bf16, any strides with the last dimension contiguous (else
// copied); D a multiple of 16, at most kMaxHeadDim. mask: broadcastable to [B, H, S, T], additive (float)
// or bool (True: the key takes part, as in SDPA). The result is [B, H, S, D] in q's dtype, laid out as [B, S, H, D] (a transposed view), the
// layout ATen's CPU flash attention returns and the one the next reshape wants. A row that every key is
// masked out of (max score -inf) gives zeros.
//
// Why: ATen's CPU SDPA for short sequences and narrow heads (BERT-class: T 128, D 32) runs its small
// blocked GEMMs in fp32 at a fraction of peak; here each head's K and V are converted to bf16 pairs once,
// and a row block of scores is computed, normalised and multiplied by V while it is in L1.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace pt2q_attention {

constexpr int64_t kMaxHeadDim = 256;
constexpr int kRows = 4;         // query rows per block (4 rows x 4 key vectors = 16 accumulators)
constexpr int kKeyVectors = 4;   // 16-key vectors of scores per step
constexpr int kOutVectors = 2;   // 16-column vectors of output per step

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512dq,avx512vl,avx512bf16,avx2,fma")

// e^x for x <= 0: 2^(x log2 e) split into 2^n * 2^f, f in [-0.5, 0.5] by a degree-6 polynomial
// (relative error ~2e-7); x is clamped at -87 so 2^n stays a normal float.
inline __m512 exp_ps(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
  const __m512 t = _mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f));
  const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(t, n);
  __m512 p = _mm512_set1_ps(1.535336188319500e-4f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.339887440266574e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.618437357674640e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.550332471162809e-2f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.402264791363012e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.931472028550421e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
  const __m512i e = _mm512_slli_epi32(_mm512_cvtps_epi32(n), 23);
  return _mm512_castsi512_ps(_mm512_add_epi32(_mm512_castps_si512(p), e));
}

inline uint16_t to_bf16(float value) {  // round to nearest even, as vcvtneps2bf16
  uint32_t bits;
  std::memcpy(&bits, &value, 4);
  bits += 0x7fff + ((bits >> 16) & 1);
  return static_cast<uint16_t>(bits >> 16);
}

// n fp32 values times `mul` to bf16 (n a multiple of 16: D is)
inline void to_bf16_row(const float* src, uint16_t* dst, int64_t n, float mul) {
  const __m512 factor = _mm512_set1_ps(mul);
  for (int64_t i = 0; i < n; i += 16) {
    const __m256bh packed = _mm512_cvtneps_pbh(_mm512_mul_ps(_mm512_loadu_ps(src + i), factor));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i), reinterpret_cast<const __m256i&>(packed));
  }
}

struct Head {
  const float* q; int64_t q_row;
  const float* k; int64_t k_row;
  const float* v; int64_t v_row;
  const float* mask; int64_t mask_row, mask_col;  // mask == nullptr: none
  float* out; int64_t out_row;
};

struct Scratch {
  std::vector<uint16_t> keys, values, probs;
  std::vector<float> scores;
  Scratch(int64_t keys16, int64_t d)
      : keys(keys16 * d), values(keys16 * d), probs(kRows * keys16), scores(kRows * keys16) {}
};

void attend(const Head& h, int64_t S, int64_t T, int64_t D, float scale, bool causal, Scratch& scratch) {
  const int64_t key_blocks = (T + 15) / 16, T16 = key_blocks * 16, pairs = D / 2, key_pairs = T16 / 2;
  // keys: [block][d pair][16 keys] 32-bit words of two bf16 (d, d + 1): one zmm per block and d pair
  uint32_t* key_words = reinterpret_cast<uint32_t*>(scratch.keys.data());
  uint16_t row[kMaxHeadDim], row2[kMaxHeadDim];
  for (int64_t j = 0; j < T16; ++j) {
    if (j < T) to_bf16_row(h.k + j * h.k_row, row, D, 1.0f); else std::memset(row, 0, D * 2);
    const uint32_t* words = reinterpret_cast<const uint32_t*>(row);
    for (int64_t p = 0; p < pairs; ++p) key_words[((j / 16) * pairs + p) * 16 + j % 16] = words[p];
  }
  // values: [key pair][d][2]: bf16 of keys 2t and 2t + 1 side by side, 16 columns per zmm
  uint16_t* values = scratch.values.data();
  for (int64_t t = 0; t < key_pairs; ++t) {
    const int64_t j0 = 2 * t, j1 = 2 * t + 1;
    if (j0 < T) to_bf16_row(h.v + j0 * h.v_row, row, D, 1.0f); else std::memset(row, 0, D * 2);
    if (j1 < T) to_bf16_row(h.v + j1 * h.v_row, row2, D, 1.0f); else std::memset(row2, 0, D * 2);
    uint16_t* dst = values + t * D * 2;
    for (int64_t d = 0; d < D; ++d) { dst[2 * d] = row[d]; dst[2 * d + 1] = row2[d]; }
  }
  float* scores = scratch.scores.data();
  uint16_t* probs = scratch.probs.data();
  uint32_t query[kRows][kMaxHeadDim / 2];
  for (int64_t i0 = 0; i0 < S; i0 += kRows) {
    const int64_t rows = std::min<int64_t>(kRows, S - i0);
    for (int r = 0; r < kRows; ++r)
      to_bf16_row(h.q + std::min(i0 + r, S - 1) * h.q_row, reinterpret_cast<uint16_t*>(query[r]), D, scale);
    // a block's keys reach at most its last row (causal)
    const int64_t visible = causal ? std::min(T, i0 + rows) : T;
    const int64_t visible_blocks = (visible + 15) / 16;
    for (int64_t jb = 0; jb < visible_blocks; jb += kKeyVectors) {
      const int64_t count = std::min<int64_t>(kKeyVectors, visible_blocks - jb);
      __m512 acc[kRows][kKeyVectors];
      for (int r = 0; r < kRows; ++r)
        for (int c = 0; c < kKeyVectors; ++c) acc[r][c] = _mm512_setzero_ps();
      for (int64_t p = 0; p < pairs; ++p) {
        __m512bh keys[kKeyVectors];
        for (int c = 0; c < count; ++c) {
          const __m512i loaded = _mm512_loadu_si512(key_words + ((jb + c) * pairs + p) * 16);
          keys[c] = reinterpret_cast<const __m512bh&>(loaded);
        }
        for (int r = 0; r < kRows; ++r) {
          const __m512i broadcast = _mm512_set1_epi32(static_cast<int>(query[r][p]));
          const __m512bh a = reinterpret_cast<const __m512bh&>(broadcast);
          for (int c = 0; c < count; ++c) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], a, keys[c]);
        }
      }
      for (int r = 0; r < kRows; ++r)
        for (int c = 0; c < count; ++c) _mm512_storeu_ps(scores + r * T16 + (jb + c) * 16, acc[r][c]);
    }
    float inverse[kRows];
    for (int64_t r = 0; r < rows; ++r) {
      float* s = scores + r * T16;
      const int64_t i = i0 + r, end = causal ? std::min(T, i + 1) : T;
      const float* m = h.mask ? h.mask + i * h.mask_row : nullptr;
      __m512 vmax = _mm512_set1_ps(-INFINITY);
      int64_t j = 0;
      if (!m || h.mask_col == 1) {
        for (; j + 16 <= end; j += 16) {
          __m512 x = _mm512_loadu_ps(s + j);
          if (m) { x = _mm512_add_ps(x, _mm512_loadu_ps(m + j)); _mm512_storeu_ps(s + j, x); }
          vmax = _mm512_max_ps(vmax, x);
        }
      }
      float row_max = _mm512_reduce_max_ps(vmax);
      for (; j < end; ++j) {
        if (m) s[j] += m[j * h.mask_col];
        row_max = std::max(row_max, s[j]);
      }
      uint16_t* prob = probs + r * T16;
      if (row_max == -INFINITY) {  // every key masked out: a zero row
        std::memset(prob, 0, T16 * 2);
        inverse[r] = 0.0f;
        continue;
      }
      const __m512 vrow_max = _mm512_set1_ps(row_max);
      __m512 vsum = _mm512_setzero_ps();
      j = 0;
      for (; j + 16 <= end; j += 16) {
        const __m512 e = exp_ps(_mm512_sub_ps(_mm512_loadu_ps(s + j), vrow_max));
        vsum = _mm512_add_ps(vsum, e);
        const __m256bh packed = _mm512_cvtneps_pbh(e);
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(prob + j), reinterpret_cast<const __m256i&>(packed));
      }
      float sum = _mm512_reduce_add_ps(vsum);
      for (; j < end; ++j) {
        const float e = std::exp(s[j] - row_max);
        sum += e;
        prob[j] = to_bf16(e);
      }
      for (; j < T16; ++j) prob[j] = 0;  // padding keys, and those a causal row does not see
      inverse[r] = 1.0f / sum;
    }
    for (int64_t r = rows; r < kRows; ++r) {
      std::memset(probs + r * T16, 0, T16 * 2);
      inverse[r] = 0.0f;
    }
    // out = probs v / sum, over the key pairs any row of the block sees
    const int64_t visible_pairs = (visible + 1) / 2;
    for (int64_t d0 = 0; d0 < D / 16; d0 += kOutVectors) {
      const int64_t count = std::min<int64_t>(kOutVectors, D / 16 - d0);
      __m512 acc[kRows][kOutVectors];
      for (int r = 0; r < kRows; ++r)
        for (int c = 0; c < kOutVectors; ++c) acc[r][c] = _mm512_setzero_ps();
      for (int64_t t = 0; t < visible_pairs; ++t) {
        __m512bh vals[kOutVectors];
        for (int c = 0; c < count; ++c) {
          const __m512i loaded = _mm512_loadu_si512(values + (t * D + (d0 + c) * 16) * 2);
          vals[c] = reinterpret_cast<const __m512bh&>(loaded);
        }
        for (int r = 0; r < kRows; ++r) {
          uint32_t pair;
          std::memcpy(&pair, probs + r * T16 + 2 * t, 4);
          const __m512i broadcast = _mm512_set1_epi32(static_cast<int>(pair));
          const __m512bh a = reinterpret_cast<const __m512bh&>(broadcast);
          for (int c = 0; c < count; ++c) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], a, vals[c]);
        }
      }
      for (int64_t r = 0; r < rows; ++r)
        for (int c = 0; c < count; ++c)
          _mm512_storeu_ps(h.out + (i0 + r) * h.out_row + (d0 + c) * 16,
                           _mm512_mul_ps(acc[r][c], _mm512_set1_ps(inverse[r])));
    }
  }
}

#pragma GCC pop_options

at::Tensor attention_bf16(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
                          const c10::optional<at::Tensor>& mask_in, double scale, bool is_causal) {
  TORCH_CHECK(q_in.dim() == 4 && k_in.dim() == 4 && v_in.dim() == 4,
              "pt2q::attention_bf16: q, k, v must be 4-D [B, H, S, D]");
  TORCH_CHECK(q_in.scalar_type() == k_in.scalar_type() && q_in.scalar_type() == v_in.scalar_type() &&
                  (q_in.scalar_type() == at::kFloat || q_in.scalar_type() == at::kBFloat16),
              "pt2q::attention_bf16: q, k, v must share one dtype, float32 or bfloat16");
  const int64_t B = q_in.size(0), H = q_in.size(1), S = q_in.size(2), D = q_in.size(3), T = k_in.size(2);
  TORCH_CHECK(k_in.size(0) == B && k_in.size(1) == H && k_in.size(3) == D && v_in.sizes() == k_in.sizes(),
              "pt2q::attention_bf16: k and v must be [B, H, T, D] with q's B, H and D");
  TORCH_CHECK(D % 16 == 0 && D <= kMaxHeadDim, "pt2q::attention_bf16: the head dimension must be a multiple "
              "of 16 and at most ", kMaxHeadDim, ", got ", D);
  auto prepare = [](const at::Tensor& t) {
    at::Tensor f = t.scalar_type() == at::kFloat ? t : t.to(at::kFloat);
    return f.stride(-1) == 1 ? f : f.contiguous();
  };
  const at::Tensor q = prepare(q_in), k = prepare(k_in), v = prepare(v_in);
  at::Tensor mask;
  if (mask_in.has_value() && mask_in->defined()) {
    if (mask_in->scalar_type() == at::kBool)  // True: the key takes part (SDPA's meaning)
      mask = at::zeros({}, q.options()).masked_fill(mask_in->logical_not(), -INFINITY).expand({B, H, S, T});
    else {
      TORCH_CHECK(mask_in->is_floating_point(), "pt2q::attention_bf16: the mask must be bool or additive float");
      mask = mask_in->to(at::kFloat).expand({B, H, S, T});
    }
  }
  at::Tensor out = at::empty({B, S, H, D}, q.options()).transpose(1, 2);
  if (T == 0 || S == 0) return out.zero_().to(q_in.scalar_type());
  const int64_t T16 = (T + 15) / 16 * 16;
  const float* mask_data = mask.defined() ? mask.data_ptr<float>() : nullptr;
  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    Scratch scratch(T16, D);
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / H, h = bh % H;
      Head head{q.data_ptr<float>() + b * q.stride(0) + h * q.stride(1), q.stride(2),
                k.data_ptr<float>() + b * k.stride(0) + h * k.stride(1), k.stride(2),
                v.data_ptr<float>() + b * v.stride(0) + h * v.stride(1), v.stride(2),
                mask_data ? mask_data + b * mask.stride(0) + h * mask.stride(1) : nullptr,
                mask_data ? mask.stride(2) : 0, mask_data ? mask.stride(3) : 0,
                out.data_ptr<float>() + b * out.stride(0) + h * out.stride(1), out.stride(2)};
      attend(head, S, T, D, static_cast<float>(scale), is_causal, scratch);
    }
  });
  return q_in.scalar_type() == at::kFloat ? out : out.to(q_in.scalar_type());
}

}  // namespace pt2q_attention

TORCH_LIBRARY_FRAGMENT(pt2q, m) {
  m.def("attention_bf16(Tensor q, Tensor k, Tensor v, Tensor? mask, float scale, bool is_causal) -> Tensor");
}

TORCH_LIBRARY_IMPL(pt2q, CPU, m) { m.impl("attention_bf16", &pt2q_attention::attention_bf16); }
