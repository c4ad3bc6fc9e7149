// ISA-generic body of pt2q's weight-only GEMV kernels; included by weight_only.cpp once per ISA, inside a
// namespace that defines `V` (the vector type and its operations) and under a `#pragma GCC target`.
// No #include here: everything comes from weight_only.cpp.
//
// Layout (written by pt2q/backends/inductor/kernels/__init__.py::pack), for BITS in {4, 8}, L = V::L lanes,
// P = 32 / BITS codes per 32-bit word, a block = P * L codes of one output row:
//   words  int32 [N/4, blocks, 4, L]: rows interleaved by 4; word (row r, block b, lane l) holds in bits
//          [BITS*j, BITS*(j+1)) the unsigned code of column k = b*P*L + j*L + l.
//   scales float [N/4, G, 4], zero_terms float [N/4, G, 4] = scale * zero_point, per group of columns.
// Then y[n] = sum_g scale[n,g] * sum_{k in g} x[k] * code[n,k] - sum_g zero_term[n,g] * sum_{k in g} x[k].
//
// Position j of a word is extracted without a shift: `word & (mask << BITS*j)` converted to float is
// code * 2^(BITS*j) exactly, and the activation it meets was pre-scaled by 2^-(BITS*j) (exact: a power of
// two), so the product is x * code. The last position is a logical shift right (its mask would be the sign
// bit). Per L codes: one and/shift, one int->float conversion, one FMA; one word load per P*L codes per row.

// Steps per group (SPG > 0): the group is SPG * L columns, a divisor of the block, and the group's sum is
// folded into the total after every SPG-th position. SPG == 0: the group is a whole number of blocks.
template <int BITS, int SPG>
struct RowBlock {
  static constexpr int P = 32 / BITS;
  static constexpr int MASK = (1 << BITS) - 1;

  typename V::f acc[4];
  typename V::f tot[4];

  template <int J>
  inline void step(const typename V::i (&w)[4], const float* xb, const float*& scales) {
    const typename V::f xv = V::loadf(xb + J * V::L);
    for (int r = 0; r < 4; ++r) {
      typename V::i e;
      if constexpr (J == P - 1) {
        e = V::template srli<BITS * J>(w[r]);
      } else {
        e = V::and_(w[r], V::set1i(MASK << (BITS * J)));
      }
      acc[r] = V::fma(V::cvt(e), xv, acc[r]);
    }
    if constexpr (SPG > 0 && (J + 1) % SPG == 0) flush(scales);
  }

  inline void flush(const float*& scales) {
    for (int r = 0; r < 4; ++r) {
      tot[r] = V::fma(acc[r], V::bcast(scales + r), tot[r]);
      acc[r] = V::zerof();
    }
    scales += 4;
  }

  template <int... J>
  inline void block(const typename V::i (&w)[4], const float* xb, const float*& scales,
                    std::integer_sequence<int, J...>) {
    (step<J>(w, xb, scales), ...);
  }

  // Four output rows for one activation row. xp: the pre-scaled activations [blocks * P * L];
  // xsum: the activations' sum per group [G]; words / scales / zero_terms: this row block's slices.
  inline void run(const float* xp, const float* xsum, const int32_t* words, const float* scales,
                  const float* zero_terms, int64_t blocks, int64_t blocks_per_group, int64_t groups,
                  float* out) {
    for (int r = 0; r < 4; ++r) {
      acc[r] = V::zerof();
      tot[r] = V::zerof();
    }
    const float* s = scales;
    int64_t in_group = 0;
    for (int64_t b = 0; b < blocks; ++b) {
      const int32_t* wb = words + b * 4 * V::L;
      const typename V::i w[4] = {V::loadi(wb), V::loadi(wb + V::L), V::loadi(wb + 2 * V::L),
                                  V::loadi(wb + 3 * V::L)};
      block(w, xp + b * P * V::L, s, std::make_integer_sequence<int, P>{});
      if constexpr (SPG == 0) {
        if (++in_group == blocks_per_group) {
          flush(s);
          in_group = 0;
        }
      }
    }
    if constexpr (SPG == 0) {
      if (in_group) flush(s);  // a last group shorter than the others
    }
    // zero-point terms of the 4 rows at once: sum_g zero_term[g, r] * xsum[g]
    __m128 z = _mm_setzero_ps();
    for (int64_t g = 0; g < groups; ++g) {
      z = _mm_fmadd_ps(_mm_loadu_ps(zero_terms + 4 * g), _mm_set1_ps(xsum[g]), z);
    }
    _mm_storeu_ps(out, _mm_sub_ps(V::hsum4(tot), z));
  }
};

template <int BITS, int SPG>
void gemv_rows(const float* xp, const float* xsum, int64_t m_rows, int64_t kp, const int32_t* words,
               const float* scales, const float* zero_terms, int64_t row_blocks, int64_t blocks,
               int64_t blocks_per_group, int64_t groups, float* y, int64_t y_stride) {
  const int64_t words_per_block4 = blocks * 4 * V::L;
  // grain: ~64 output rows per task, so a 2-core machine still splits a 512-row layer
  at::parallel_for(0, row_blocks, 16, [&](int64_t begin, int64_t end) {
    RowBlock<BITS, SPG> rb;
    for (int64_t nb = begin; nb < end; ++nb) {
      for (int64_t m = 0; m < m_rows; ++m) {  // the row block's words stay in L1/L2 across m
        rb.run(xp + m * kp, xsum + m * groups, words + nb * words_per_block4, scales + nb * groups * 4,
               zero_terms + nb * groups * 4, blocks, blocks_per_group, groups, y + m * y_stride + nb * 4);
      }
    }
  });
}

// fp32 weight rows of row blocks [nb0, nb1) into out [(nb1 - nb0) * 4, kp]: code * scale - zero_term, the
// prefill path's tile (then multiplied by at::mm). One division per step for the group index.
template <int BITS>
void dequantize_row_blocks(const int32_t* words, const float* scales, const float* zero_terms, int64_t nb0,
                           int64_t nb1, int64_t kp, int64_t group_size, int64_t groups, float* out) {
  constexpr int P = 32 / BITS;
  constexpr int MASK = (1 << BITS) - 1;
  const int64_t blocks = kp / (P * V::L);
  for (int64_t nb = nb0; nb < nb1; ++nb) {
    const int32_t* w = words + nb * blocks * 4 * V::L;
    const float* s = scales + nb * groups * 4;
    const float* z = zero_terms + nb * groups * 4;
    float* rows = out + (nb - nb0) * 4 * kp;
    for (int64_t b = 0; b < blocks; ++b) {
      for (int r = 0; r < 4; ++r) {
        const typename V::i word = V::loadi(w + (b * 4 + r) * V::L);
        for (int j = 0; j < P; ++j) {  // unrolled by the compiler: P is a constant
          const int64_t column = b * P * V::L + j * V::L;
          const int64_t g = column / group_size;
          const typename V::i code = V::and_(V::srlv(word, BITS * j), V::set1i(MASK));
          V::storef(rows + r * kp + column,
                    V::fmsub(V::cvt(code), V::bcast(s + g * 4 + r), V::bcast(z + g * 4 + r)));
        }
      }
    }
  }
}

// Dispatch on the group shape: steps per group inside a block, or whole blocks per group.
template <int BITS>
void gemv(const float* xp, const float* xsum, int64_t m_rows, int64_t kp, const int32_t* words,
          const float* scales, const float* zero_terms, int64_t row_blocks, int64_t group_size, int64_t groups,
          float* y, int64_t y_stride) {
  constexpr int64_t block = (32 / BITS) * V::L;
  const int64_t blocks = kp / block;
  if (group_size % block == 0) {
    gemv_rows<BITS, 0>(xp, xsum, m_rows, kp, words, scales, zero_terms, row_blocks, blocks, group_size / block,
                       groups, y, y_stride);
    return;
  }
  switch (group_size % V::L ? 0 : group_size / V::L) {
    case 1: gemv_rows<BITS, 1>(xp, xsum, m_rows, kp, words, scales, zero_terms, row_blocks, blocks, 0, groups,
                               y, y_stride); return;
    case 2: gemv_rows<BITS, 2>(xp, xsum, m_rows, kp, words, scales, zero_terms, row_blocks, blocks, 0, groups,
                               y, y_stride); return;
    case 4: if constexpr (32 / BITS > 4) {
              gemv_rows<BITS, 4>(xp, xsum, m_rows, kp, words, scales, zero_terms, row_blocks, blocks, 0, groups,
                                 y, y_stride);
              return;
            }
            break;
    default: break;
  }
  TORCH_CHECK(false, "pt2q weight-only kernel: group size ", group_size, " is neither a multiple nor a divisor of ",
              "the ", block, "-column block (in steps of ", V::L, "); the lowering should not have chosen it");
}
