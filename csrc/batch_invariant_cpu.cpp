// Batch-invariant CPU kernels for ppo_fast.batch_invariant(): GEMM, row reductions, attention.
//
// The contract: an output element's value is a function of its own inputs and of the reduced
// length alone, never of M, N, the row's position, the batch, the tile it falls in or the thread
// count. Every reduction here runs in one order fixed by the reduced length:
//   - over K (GEMM, a dot product, a row sum): lane l of one vector accumulator (W lanes, W the
//     CPU's float vector width) takes the FMAs of k ≡ l (mod W) in increasing k; the W lanes are
//     then summed by a fixed halving tree; the last K mod W terms are added one by one after it.
//     Each output has its own accumulator, so a 4×4 register tile and a 1×1 edge tile compute
//     the same bits (a vector FMA and std::fma both round once).
//   - over keys (attention): the valid keys of one query in increasing key index, one at a time;
//     a masked key is skipped, not added as a zero, so left padding and the causal future change
//     nothing, and a prefill query equals the same query decoded against the cache.
// One thread computes an output tile, a row or a query whole (no split-K, no split rows).
// bfloat16 inputs are widened to float32 and accumulated in float32; outputs round once.

#include <torch/extension.h>

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <cmath>
#include <limits>
#include <vector>

namespace {

using at::vec::Vectorized;

// The accumulation type: float32 for float32, bfloat16 and float16; float64 for float64.
template <typename T> struct Acc { using type = float; };
template <> struct Acc<double> { using type = double; };

template <typename A, typename T>
inline Vectorized<A> load(const T* p) {
  if constexpr (std::is_same_v<A, T>) {
    return Vectorized<A>::loadu(p);
  } else {  // a reduced float type, widened
    Vectorized<float> out;
    at::vec::load_to_float<T>(p, out);
    return out;
  }
}
template <typename A, typename T>
inline A widen(T x) { return static_cast<A>(x); }

// The lanes' fixed halving tree: (0+W/2, 1+W/2, …), then again on the first half, down to one.
template <typename A>
inline A tree(const Vectorized<A>& acc) {
  constexpr int lanes = Vectorized<A>::size();
  alignas(64) A t[lanes];
  acc.store(t);
  for (int width = lanes / 2; width >= 1; width /= 2) {
    for (int i = 0; i < width; ++i) t[i] += t[i + width];
  }
  return t[0];
}

#if defined(CPU_CAPABILITY_AVX512)
// tree() of 16 accumulators at once, with shuffles: every addition is one of tree()'s (level 1 adds
// lane i + 8 to lane i, level 2 i + 4, then i + 2, i + 1), so each sum has tree()'s bits and a 1×1
// edge tile, which calls tree(), agrees with a full tile. out[j] = tree(v[j]).
inline void tree16(const Vectorized<float>* v, float* out) {
  __m512 level1[8], level2[4], level3[2];
  for (int p = 0; p < 8; ++p) {  // lanes 0-7: v[2p]'s 8 partial sums, lanes 8-15: v[2p + 1]'s
    const __m512 a = v[2 * p], b = v[2 * p + 1];
    level1[p] = _mm512_add_ps(_mm512_shuffle_f32x4(a, b, 0x44), _mm512_shuffle_f32x4(a, b, 0xEE));
  }
  for (int q = 0; q < 4; ++q) {  // 128-bit lane k: v[4q + k]'s 4 partial sums
    const __m512 a = level1[2 * q], b = level1[2 * q + 1];
    level2[q] = _mm512_add_ps(_mm512_shuffle_f32x4(a, b, 0x88), _mm512_shuffle_f32x4(a, b, 0xDD));
  }
  for (int h = 0; h < 2; ++h) {  // lane k: 2 partial sums of v[8h + k], then 2 of v[8h + 4 + k]
    const __m512 a = level2[2 * h], b = level2[2 * h + 1];
    level3[h] = _mm512_add_ps(_mm512_shuffle_ps(a, b, _MM_SHUFFLE(1, 0, 1, 0)),
                              _mm512_shuffle_ps(a, b, _MM_SHUFFLE(3, 2, 3, 2)));
  }
  // element 4k + g: the sum of v[4g + k]
  const __m512 sums = _mm512_add_ps(_mm512_shuffle_ps(level3[0], level3[1], _MM_SHUFFLE(2, 0, 2, 0)),
                                    _mm512_shuffle_ps(level3[0], level3[1], _MM_SHUFFLE(3, 1, 3, 1)));
  alignas(64) float t[16];
  _mm512_store_ps(t, sums);
  for (int g = 0; g < 4; ++g)
    for (int k = 0; k < 4; ++k) out[4 * g + k] = t[4 * k + g];
}
#endif

// C[m, n] = Σ_k A[m, k]·B[n, k] for an MR×NR tile, K's order as the header says.
template <int MR, int NR, typename T, typename A = typename Acc<T>::type>
inline void dot_tile(const T* A_, int64_t lda, const T* B, int64_t ldb, int64_t K, A* out /* [MR][NR] */) {
  using V = Vectorized<A>;
  constexpr int lanes = V::size();
  V acc[MR][NR];
  for (int r = 0; r < MR; ++r)
    for (int c = 0; c < NR; ++c) acc[r][c] = V(A(0));
  const int64_t body = K - K % lanes;
  for (int64_t k = 0; k < body; k += lanes) {
    V b[NR];
    for (int c = 0; c < NR; ++c) b[c] = load<A>(B + c * ldb + k);
    for (int r = 0; r < MR; ++r) {
      const V a = load<A>(A_ + r * lda + k);
      for (int c = 0; c < NR; ++c) acc[r][c] = at::vec::fmadd(a, b[c], acc[r][c]);
    }
  }
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (MR == 4 && NR == 4 && std::is_same_v<A, float>) {
    tree16(acc[0], out);
    if (K == body) return;
    for (int r = 0; r < MR; ++r)
      for (int c = 0; c < NR; ++c)
        for (int64_t k = body; k < K; ++k)
          out[r * NR + c] = std::fma(widen<A>(A_[r * lda + k]), widen<A>(B[c * ldb + k]), out[r * NR + c]);
    return;
  }
#endif
  for (int r = 0; r < MR; ++r) {
    for (int c = 0; c < NR; ++c) {
      A s = tree<A>(acc[r][c]);
      for (int64_t k = body; k < K; ++k) s = std::fma(widen<A>(A_[r * lda + k]), widen<A>(B[c * ldb + k]), s);
      out[r * NR + c] = s;
    }
  }
}

constexpr int kMR = 4;
constexpr int kNR = Vectorized<float>::size() == 16 ? 4 : 3;  // AVX-512 has 32 vector registers, AVX2 16
constexpr int64_t kColumnBlock = 64;       // B rows swept together over all of M: stay in L2

// out[m, n] = alpha·Σ_k A[m,k]·B[n,k] + beta·bias[m, n] (bias optional, any strides).
template <typename T, typename acc_t = typename Acc<T>::type>
void gemm_nt(const T* A, int64_t lda, const T* B, int64_t ldb, T* C, int64_t ldc, int64_t M, int64_t N,
             int64_t K, acc_t alpha, acc_t beta, const T* bias, int64_t bias_sm, int64_t bias_sn) {
  auto finish = [&](int64_t m, int64_t n, acc_t dot) {
    acc_t value = alpha == acc_t(1) ? dot : alpha * dot;
    if (bias != nullptr) value += beta == acc_t(1) ? widen<acc_t>(bias[m * bias_sm + n * bias_sn])
                                               : beta * widen<acc_t>(bias[m * bias_sm + n * bias_sn]);
    C[m * ldc + n] = static_cast<T>(value);
  };
  const int64_t column_blocks = (N + kColumnBlock - 1) / kColumnBlock;
  const int64_t row_tiles = (M + kMR - 1) / kMR;
  // Work items are (column block, row tile) pairs; which thread takes one changes no bits.
  at::parallel_for(0, column_blocks * row_tiles, 1, [&](int64_t begin, int64_t end) {
    acc_t tile[kMR * kNR];
    for (int64_t item = begin; item < end; ++item) {
      const int64_t n_begin = (item / row_tiles) * kColumnBlock, n_end = std::min(N, n_begin + kColumnBlock);
      const int64_t m0 = (item % row_tiles) * kMR;
      const int64_t m_end = std::min(M, m0 + kMR);
      for (int64_t n0 = n_begin; n0 < n_end; n0 += kNR) {
        if (m_end - m0 == kMR && n0 + kNR <= n_end) {
          dot_tile<kMR, kNR>(A + m0 * lda, lda, B + n0 * ldb, ldb, K, tile);
          for (int r = 0; r < kMR; ++r)
            for (int c = 0; c < kNR; ++c) finish(m0 + r, n0 + c, tile[r * kNR + c]);
        } else {
          for (int64_t m = m0; m < m_end; ++m)
            for (int64_t n = n0; n < std::min(n0 + kNR, n_end); ++n) {
              dot_tile<1, 1>(A + m * lda, lda, B + n * ldb, ldb, K, tile);
              finish(m, n, tile[0]);
            }
        }
      }
    }
  });
}

void check_float(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "batch_invariant: ", name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), "batch_invariant: ", name,
              " must be float32, bfloat16, float16 or float64, got ", t.scalar_type());
}

// A [.., M, K] with unit stride on K (copied if not); B given as [K, N] and read as Bᵀ [N, K].
at::Tensor rows_unit(const at::Tensor& t) { return t.stride(-1) == 1 ? t : t.contiguous(); }

// mm / addmm: out = beta·bias + alpha·(a @ b); bias undefined for mm.
at::Tensor bi_addmm(const c10::optional<at::Tensor>& bias_opt, const at::Tensor& a, const at::Tensor& b,
                    double beta, double alpha) {
  check_float(a, "the first matrix");
  TORCH_CHECK(a.dim() == 2 && b.dim() == 2 && a.size(1) == b.size(0), "batch_invariant mm: shapes ",
              a.sizes(), " and ", b.sizes(), " cannot be multiplied");
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), "batch_invariant mm: dtypes differ (", a.scalar_type(), ", ",
              b.scalar_type(), ")");
  const int64_t M = a.size(0), K = a.size(1), N = b.size(1);
  at::Tensor lhs = rows_unit(a), Bt = rows_unit(b.t());
  at::Tensor out = at::empty({M, N}, a.options());
  at::Tensor bias;
  if (bias_opt.has_value() && bias_opt->defined() && beta != 0.0) {
    bias = bias_opt->to(a.scalar_type()).expand({M, N});
  }
  if (M == 0 || N == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, a.scalar_type(), "batch_invariant_mm", [&] {
    using A = typename Acc<scalar_t>::type;
    gemm_nt<scalar_t>(lhs.data_ptr<scalar_t>(), lhs.stride(0), Bt.data_ptr<scalar_t>(), Bt.stride(0),
                      out.data_ptr<scalar_t>(), N, M, N, K, static_cast<A>(alpha), static_cast<A>(beta),
                      bias.defined() ? bias.data_ptr<scalar_t>() : nullptr, bias.defined() ? bias.stride(0) : 0,
                      bias.defined() ? bias.stride(1) : 0);
  });
  return out;
}

at::Tensor bi_mm(const at::Tensor& a, const at::Tensor& b) { return bi_addmm(c10::nullopt, a, b, 0.0, 1.0); }

// bmm: one GEMM per batch entry, in turn; each GEMM parallelises over its own tiles.
at::Tensor bi_bmm(const at::Tensor& a, const at::Tensor& b) {
  check_float(a, "the first batch of matrices");
  TORCH_CHECK(a.dim() == 3 && b.dim() == 3 && a.size(0) == b.size(0) && a.size(2) == b.size(1),
              "batch_invariant bmm: shapes ", a.sizes(), " and ", b.sizes(), " cannot be multiplied");
  at::Tensor out = at::empty({a.size(0), a.size(1), b.size(2)}, a.options());
  for (int64_t i = 0; i < a.size(0); ++i) out[i].copy_(bi_mm(a[i], b[i]));
  return out;
}

// Row sums over the last dimension of a [rows, L] view, one thread a row, the order of the header.
template <typename T>
void row_sums(const T* x, int64_t rows, int64_t L, float* out) {
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* row = x + r * L;
      constexpr int lanes = Vectorized<float>::size();
      Vectorized<float> acc(0.f);
      const int64_t body = L - L % lanes;
      for (int64_t k = 0; k < body; k += lanes) acc = acc + load<float>(row + k);
      float s = tree<float>(acc);
      for (int64_t k = body; k < L; ++k) s += widen<float>(row[k]);
      out[r] = s;
    }
  });
}

// float64 and integer sums: a sequential loop per row (integers are exact in any order).
template <typename T, typename acc_t>
void row_sums_sequential(const T* x, int64_t rows, int64_t L, acc_t* out) {
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      acc_t s = 0;
      for (int64_t k = 0; k < L; ++k) s += static_cast<acc_t>(x[r * L + k]);
      out[r] = s;
    }
  });
}

// sum / mean of x [rows, L] (contiguous) over L → [rows] in `out_dtype` (x already cast to the
// requested dtype by the caller, as torch's dtype= does).
at::Tensor bi_row_reduce(const at::Tensor& x, bool mean, at::ScalarType out_dtype) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "batch_invariant reduce: expects a contiguous [rows, L] view");
  const int64_t rows = x.size(0), L = x.size(1);
  at::Tensor out;
  const auto type = x.scalar_type();
  if (type == at::kFloat || type == at::kBFloat16 || type == at::kHalf) {
    at::Tensor sums = at::empty({rows}, x.options().dtype(at::kFloat));
    if (type == at::kFloat) row_sums<float>(x.data_ptr<float>(), rows, L, sums.data_ptr<float>());
    else if (type == at::kBFloat16) row_sums<at::BFloat16>(x.data_ptr<at::BFloat16>(), rows, L, sums.data_ptr<float>());
    else row_sums<at::Half>(x.data_ptr<at::Half>(), rows, L, sums.data_ptr<float>());
    if (mean) sums.div_(static_cast<double>(L));  // one rounding in float32, then one to the output dtype
    return sums.to(out_dtype);
  }
  if (type == at::kDouble) {
    at::Tensor sums = at::empty({rows}, x.options());
    row_sums_sequential<double, double>(x.data_ptr<double>(), rows, L, sums.data_ptr<double>());
    if (mean) sums.div_(static_cast<double>(L));
    return sums.to(out_dtype);
  }
  TORCH_CHECK(!mean, "batch_invariant mean: expects a floating-point tensor, got ", type);
  TORCH_CHECK(at::isIntegralType(type, /*includeBool=*/true), "batch_invariant sum: unsupported dtype ", type);
  at::Tensor wide = x.to(at::kLong);
  at::Tensor sums = at::empty({rows}, x.options().dtype(at::kLong));
  row_sums_sequential<int64_t, int64_t>(wide.data_ptr<int64_t>(), rows, L, sums.data_ptr<int64_t>());
  return sums.to(out_dtype);
}

// Attention: q [B, H, T, D], k and v [B, Hkv, S, D] (H a multiple of Hkv: grouped queries share a
// key head), bias float32 broadcastable to [B, H, T, S] (an additive mask: a key whose bias is −inf
// or below −FLT_MAX/2, as transformers' eager masks write it, is masked), or, without a bias, the
// causal rule "query t sees keys 0 … S − T + t". Returns [B, T, H, D] in q's dtype; a query with no
// valid key gets zeros.
template <typename T>
void attention_kernel(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& bias,
                      float scale, at::Tensor& out) {
  const int64_t B = q.size(0), H = q.size(1), Tq = q.size(2), D = q.size(3);
  const int64_t Hkv = k.size(1), S = k.size(2), group = H / Hkv;
  const T* qp = q.data_ptr<T>();
  const T* kp = k.data_ptr<T>();
  const T* vp = v.data_ptr<T>();
  T* op = out.data_ptr<T>();
  const float* bp = bias.defined() ? bias.data_ptr<float>() : nullptr;
  const float masked_below = -std::numeric_limits<float>::max() / 2;
  at::parallel_for(0, B * H * Tq, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores(S), acc(D);
    std::vector<int64_t> keys(S);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / (H * Tq), h = (item / Tq) % H, t = item % Tq, hk = h / group;
      const T* qrow = qp + b * q.stride(0) + h * q.stride(1) + t * q.stride(2);
      const T* kbase = kp + b * k.stride(0) + hk * k.stride(1);
      const T* vbase = vp + b * v.stride(0) + hk * v.stride(1);
      const float* brow = bp ? bp + b * bias.stride(0) + h * bias.stride(1) + t * bias.stride(2) : nullptr;
      const int64_t last = bp ? S - 1 : std::min(S - 1, S - Tq + t);
      int64_t n = 0;
      float top = -std::numeric_limits<float>::infinity();
      for (int64_t j = 0; j <= last; ++j) {
        float extra = 0.f;
        if (brow) {
          extra = brow[j * bias.stride(3)];
          if (!(extra > masked_below)) continue;  // −inf, a lowest-float mask, or NaN
        }
        float dot;
        dot_tile<1, 1, T, float>(qrow, 0, kbase + j * k.stride(2), 0, D, &dot);
        const float s = dot * scale + extra;
        scores[n] = s;
        keys[n++] = j;
        top = std::max(top, s);
      }
      T* orow = op + ((b * Tq + t) * H + h) * D;
      if (n == 0) {
        for (int64_t d = 0; d < D; ++d) orow[d] = static_cast<T>(0.f);
        continue;
      }
      std::fill(acc.begin(), acc.end(), 0.f);
      float total = 0.f;
      for (int64_t i = 0; i < n; ++i) {
        const float p = std::exp(scores[i] - top);
        total += p;
        const T* vrow = vbase + keys[i] * v.stride(2);
        for (int64_t d = 0; d < D; ++d) acc[d] = std::fma(p, widen<float>(vrow[d]), acc[d]);
      }
      for (int64_t d = 0; d < D; ++d) orow[d] = static_cast<T>(acc[d] / total);
    }
  });
}

at::Tensor bi_attention(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
                        const c10::optional<at::Tensor>& bias_opt, double scale) {
  check_float(q_in, "the queries");
  TORCH_CHECK(q_in.dim() == 4 && k_in.dim() == 4 && v_in.dim() == 4, "batch_invariant attention: q, k, v must be "
              "[batch, heads, length, head_dim]; got ", q_in.sizes(), ", ", k_in.sizes(), ", ", v_in.sizes());
  TORCH_CHECK(k_in.scalar_type() == q_in.scalar_type() && v_in.scalar_type() == q_in.scalar_type(),
              "batch_invariant attention: q, k, v must share a dtype");
  TORCH_CHECK(k_in.size(0) == q_in.size(0) && k_in.size(3) == q_in.size(3) && v_in.sizes() == k_in.sizes(),
              "batch_invariant attention: k and v must be [", q_in.size(0), ", heads, length, ", q_in.size(3),
              "]; got ", k_in.sizes(), " and ", v_in.sizes());
  TORCH_CHECK(q_in.size(1) % k_in.size(1) == 0, "batch_invariant attention: ", q_in.size(1),
              " query heads are not a multiple of ", k_in.size(1), " key heads");
  at::Tensor q = rows_unit(q_in), k = rows_unit(k_in), v = rows_unit(v_in);
  at::Tensor bias;
  if (bias_opt.has_value() && bias_opt->defined()) {
    bias = bias_opt->to(at::kFloat).expand({q.size(0), q.size(1), q.size(2), k.size(2)});
  }
  at::Tensor out = at::empty({q.size(0), q.size(2), q.size(1), q.size(3)}, q.options());
  if (out.numel() == 0) return out;
  TORCH_CHECK(q.scalar_type() != at::kDouble, "batch_invariant attention: float64 is not covered");
  AT_DISPATCH_SWITCH(q.scalar_type(), "batch_invariant_attention",
      AT_DISPATCH_CASE(at::kFloat, [&] { attention_kernel<float>(q, k, v, bias, static_cast<float>(scale), out); })
      AT_DISPATCH_CASE(at::kBFloat16, [&] { attention_kernel<at::BFloat16>(q, k, v, bias, static_cast<float>(scale), out); })
      AT_DISPATCH_CASE(at::kHalf, [&] { attention_kernel<at::Half>(q, k, v, bias, static_cast<float>(scale), out); }));
  return out;
}

}  // namespace

void register_batch_invariant(pybind11::module& m) {
  m.def("bi_mm", &bi_mm);
  m.def("bi_addmm", &bi_addmm);
  m.def("bi_bmm", &bi_bmm);
  m.def("bi_row_reduce", &bi_row_reduce);
  m.def("bi_attention", &bi_attention);
}
