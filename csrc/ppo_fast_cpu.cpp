// The `native` backend: CPU kernels for the ops of ppo_fast's dispatch table.
//
// Token log-probs and entropy, with s = z / τ over a row of V logits and m = max_j s_j:
//   lse  = m + log Σ_j e^{s_j − m}
//   logp = s_y − lse
//   H    = lse − Σ_j p_j s_j = log Σ e^{d_j} − Σ e^{d_j} d_j / Σ e^{d_j},   d_j = s_j − m
//   Σp²  = Σ_j e^{2 d_j} / (Σ_j e^{d_j})²
// Backward, with g = ∂L/∂logp and h = ∂L/∂H:
//   ∂L/∂z_j = ( g·(1[j = y] − p_j) − h·p_j·(s_j − (lse − H)) ) / τ
//
// GAE over packed sequences, walking each one backwards (ppo_fast.reference.gae):
//   A_t = r_t + γ·V_next − V_t + γλ·A_next;  masked tokens keep V_next and A_next and give 0.
//
// Batch invariance: one thread owns a row (a sequence for GAE) and reduces it in an order that
// depends on V alone, so a row's numbers never depend on the thread count or on the other rows.
// A row whose label is ignore_index is never read.

#include <torch/extension.h>

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <cmath>
#include <cstdlib>
#include <string>
#include <limits>
#include <mutex>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace {

using at::vec::Vectorized;

// Byte offset-free row addressing for a tensor [..., V] with a unit stride on V and any strides on
// the leading dimensions (a shifted logits[:, :-1] view is read where it lies, without a copy).
struct Rows {
  std::vector<int64_t> sizes, strides;  // leading dimensions only
  int64_t offset(int64_t row) const {
    int64_t at = 0;
    for (int64_t d = static_cast<int64_t>(sizes.size()) - 1; d >= 0; --d) {
      at += (row % sizes[d]) * strides[d];
      row /= sizes[d];
    }
    return at;
  }
};

Rows rows_of(const at::Tensor& t) {
  Rows rows;
  for (int64_t d = 0; d + 1 < t.dim(); ++d) {
    rows.sizes.push_back(t.size(d));
    rows.strides.push_back(t.stride(d));
  }
  return rows;
}

// s = z·inv_temp of one row in the compute type: into `buffer` unless the row can be read as is.
template <typename in_t, typename acc_t>
const acc_t* scaled_row(const in_t* z, int64_t V, acc_t inv_temp, std::vector<acc_t>& buffer) {
  if constexpr (std::is_same_v<in_t, acc_t>) {
    if (inv_temp == acc_t(1)) return z;
  }
  buffer.resize(V);
  for (int64_t j = 0; j < V; ++j) buffer[j] = static_cast<acc_t>(z[j]) * inv_temp;
  return buffer.data();
}

// e^x for a vector: float through ATen's 20-ULP polynomial (about twice SLEEF's 1-ULP speed; a
// relative error of ~2e-6, below float32's rounding of the sums it feeds), double through SLEEF.
template <typename acc_t>
Vectorized<acc_t> vexp(const Vectorized<acc_t>& x) {
  if constexpr (std::is_same_v<acc_t, float>) {
    return x.exp_u20();
  } else {
    return x.exp();
  }
}

template <typename acc_t>
acc_t row_max(const acc_t* s, int64_t V) {
  using Vec = Vectorized<acc_t>;
  return at::vec::reduce_all<acc_t>([](Vec& a, Vec& b) { return at::vec::maximum(a, b); }, s, V);
}

struct RowStats {
  double sum, weighted, squares;  // Σ e^d, Σ e^d·d, Σ e^{2d}
};

template <typename acc_t>
void row_sums(const acc_t* s, int64_t V, acc_t m, bool with_entropy, bool with_squares, acc_t* out) {
  using Vec = Vectorized<acc_t>;
  const Vec vm(m), lowest(std::numeric_limits<acc_t>::lowest());
  Vec sum(0), weighted(0), squares(0);
  int64_t j = 0;
  for (; j + Vec::size() <= V; j += Vec::size()) {
    // d is floored at the lowest finite value: e^d is then 0 and e^d·d is 0, never 0·(−inf).
    Vec d = at::vec::maximum(Vec::loadu(s + j) - vm, lowest);
    Vec e = vexp(d);
    sum = sum + e;
    if (with_entropy) weighted = at::vec::fmadd(e, d, weighted);
    if (with_squares) squares = at::vec::fmadd(e, e, squares);
  }
  acc_t total = at::vec::vec_reduce_all<acc_t>([](Vec& a, Vec& b) { return a + b; }, sum);
  acc_t total_weighted = at::vec::vec_reduce_all<acc_t>([](Vec& a, Vec& b) { return a + b; }, weighted);
  acc_t total_squares = at::vec::vec_reduce_all<acc_t>([](Vec& a, Vec& b) { return a + b; }, squares);
  for (; j < V; ++j) {
    acc_t d = std::max(s[j] - m, std::numeric_limits<acc_t>::lowest());
    acc_t e = std::exp(d);
    total += e;
    total_weighted += e * d;
    total_squares += e * e;
  }
  out[0] = total;
  out[1] = total_weighted;
  out[2] = total_squares;
}

template <typename acc_t>
struct RowResult {
  acc_t logp, entropy, lse, squares;
};

// One row's log-prob, entropy, log-sum-exp and Σp². A label outside [0, V) (only possible when the
// public checks are skipped, as under torch.compile) is never read: the row's results are NaN, as
// on the other backends, and the backward turns the NaN lse into a NaN gradient.
template <typename in_t, typename acc_t>
RowResult<acc_t> row_forward(const in_t* z, int64_t V, int64_t label, acc_t inv_temp, bool with_entropy,
                             bool with_squares, std::vector<acc_t>& buffer) {
  constexpr acc_t nan = std::numeric_limits<acc_t>::quiet_NaN();
  if (label < 0 || label >= V) return {nan, nan, nan, nan};
  const acc_t* s = scaled_row<in_t, acc_t>(z, V, inv_temp, buffer);
  const acc_t m = row_max(s, V);
  // A +inf in s (a +inf logit, or a finite one over a tiny temperature) would make every e^{s_j − m}
  // 0 or NaN: lse is +inf, as on the other backends, and the public function reports the row.
  if (m == std::numeric_limits<acc_t>::infinity()) return {s[label] - m, nan, m, nan};
  acc_t sums[3];
  row_sums(s, V, m, with_entropy, with_squares, sums);
  const acc_t log_sum = std::log(sums[0]);
  const acc_t lse = m + log_sum;
  return {s[label] - lse, with_entropy ? log_sum - sums[1] / sums[0] : acc_t(0), lse,
          with_squares ? sums[2] / (sums[0] * sums[0]) : acc_t(0)};
}

template <typename in_t, typename acc_t>
void logprobs_forward_kernel(const at::Tensor& logits, const at::Tensor& labels, double inv_temp_d,
                             int64_t ignore_index, bool with_entropy, bool with_squares, at::Tensor& logp,
                             at::Tensor& entropy, at::Tensor& lse, at::Tensor& squares) {
  const int64_t V = logits.size(-1);
  const int64_t N = labels.numel();
  const Rows rows = rows_of(logits);
  const in_t* base = logits.data_ptr<in_t>();
  const int64_t* y = labels.data_ptr<int64_t>();
  acc_t* out_logp = logp.data_ptr<acc_t>();
  acc_t* out_entropy = entropy.data_ptr<acc_t>();
  acc_t* out_lse = lse.data_ptr<acc_t>();
  acc_t* out_squares = with_squares ? squares.data_ptr<acc_t>() : nullptr;
  const acc_t inv_temp = static_cast<acc_t>(inv_temp_d);
  at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> buffer;
    for (int64_t r = begin; r < end; ++r) {
      if (y[r] == ignore_index) {
        out_logp[r] = out_entropy[r] = out_lse[r] = 0;
        if (with_squares) out_squares[r] = 0;
        continue;
      }
      const RowResult<acc_t> result =
          row_forward<in_t, acc_t>(base + rows.offset(r), V, y[r], inv_temp, with_entropy, with_squares, buffer);
      out_lse[r] = result.lse;
      out_logp[r] = result.logp;
      out_entropy[r] = result.entropy;
      if (with_squares) out_squares[r] = result.squares;
    }
  });
}

void check_rows(const at::Tensor& logits, const at::Tensor& labels) {
  TORCH_CHECK(logits.device().is_cpu(), "the native backend runs on CPU tensors");
  TORCH_CHECK(logits.dim() >= 1 && logits.stride(-1) == 1, "logits must have a unit stride on the vocabulary");
  TORCH_CHECK(labels.scalar_type() == at::kLong && labels.is_contiguous(), "labels must be contiguous int64");
  TORCH_CHECK(labels.numel() * logits.size(-1) == logits.numel(), "labels must have the shape logits.shape[:-1]");
}

std::vector<at::Tensor> token_logprobs_forward(const at::Tensor& logits, const at::Tensor& labels,
                                               double inv_temp, int64_t ignore_index, bool with_entropy,
                                               bool with_sum_pi_squared) {
  check_rows(logits, labels);
  const auto acc = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto options = logits.options().dtype(acc);
  const auto lead = labels.sizes();
  at::Tensor logp = at::empty(lead, options), entropy = at::empty(lead, options), lse = at::empty(lead, options);
  at::Tensor squares = with_sum_pi_squared ? at::empty(lead, options) : at::empty({0}, options);
  switch (logits.scalar_type()) {
    case at::kDouble:
      logprobs_forward_kernel<double, double>(logits, labels, inv_temp, ignore_index, with_entropy,
                                              with_sum_pi_squared, logp, entropy, lse, squares);
      break;
    case at::kFloat:
      logprobs_forward_kernel<float, float>(logits, labels, inv_temp, ignore_index, with_entropy,
                                            with_sum_pi_squared, logp, entropy, lse, squares);
      break;
    case at::kBFloat16:
      logprobs_forward_kernel<at::BFloat16, float>(logits, labels, inv_temp, ignore_index, with_entropy,
                                                   with_sum_pi_squared, logp, entropy, lse, squares);
      break;
    case at::kHalf:
      logprobs_forward_kernel<at::Half, float>(logits, labels, inv_temp, ignore_index, with_entropy,
                                               with_sum_pi_squared, logp, entropy, lse, squares);
      break;
    default:
      TORCH_CHECK(false, "logits must be float64, float32, bfloat16 or float16, got ", logits.scalar_type());
  }
  if (with_sum_pi_squared) return {logp, entropy, lse, squares};
  return {logp, entropy, lse};
}

template <typename in_t, typename acc_t>
void logprobs_backward_kernel(at::Tensor& dlogits, const at::Tensor& logits, const at::Tensor& labels,
                              const at::Tensor& lse, const at::Tensor& entropy, const at::Tensor& grad_logp,
                              const c10::optional<at::Tensor>& grad_entropy, double inv_temp_d,
                              int64_t ignore_index) {
  const int64_t V = logits.size(-1);
  const int64_t N = labels.numel();
  const Rows in_rows = rows_of(logits), out_rows = rows_of(dlogits);
  const in_t* base = logits.data_ptr<in_t>();
  in_t* out = dlogits.data_ptr<in_t>();
  const int64_t* y = labels.data_ptr<int64_t>();
  const acc_t* row_lse = lse.data_ptr<acc_t>();
  const acc_t* row_entropy = entropy.data_ptr<acc_t>();
  const acc_t* g = grad_logp.data_ptr<acc_t>();
  const acc_t* h = grad_entropy.has_value() ? grad_entropy->data_ptr<acc_t>() : nullptr;
  const acc_t inv_temp = static_cast<acc_t>(inv_temp_d);
  using Vec = Vectorized<acc_t>;
  at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> buffer, result;
    for (int64_t r = begin; r < end; ++r) {
      in_t* d_row = out + out_rows.offset(r);
      if (y[r] == ignore_index) {
        std::fill(d_row, d_row + V, in_t(0));
        continue;
      }
      // The row is read (into the buffer when it is converted) before any of it is written: the
      // gradient may go into the logits' own storage.
      const acc_t* s = scaled_row<in_t, acc_t>(base + in_rows.offset(r), V, inv_temp, buffer);
      const acc_t gr = g[r], hr = h ? h[r] : acc_t(0), l = row_lse[r], entropy_r = row_entropy[r];
      acc_t* d = nullptr;
      if constexpr (std::is_same_v<in_t, acc_t>) {
        d = d_row;
      } else {
        result.resize(V);
        d = result.data();
      }
      const Vec vl(l), vg(gr), vh(hr), ventropy(entropy_r), vtemp(inv_temp),
          lowest(std::numeric_limits<acc_t>::lowest());
      int64_t j = 0;
      for (; j + Vec::size() <= V; j += Vec::size()) {
        Vec sj = Vec::loadu(s + j);
        Vec p = vexp(sj - vl);
        // s_j − Σ p·s as log p_j + H: no term of the logits' size, whose rounding would swamp it.
        Vec centred = at::vec::maximum((sj - vl) + ventropy, lowest);
        Vec dj = (Vec(0) - p * vg - p * centred * vh) * vtemp;
        dj.store(d + j);
      }
      for (; j < V; ++j) {
        acc_t p = std::exp(s[j] - l);
        acc_t centred = std::max((s[j] - l) + entropy_r, std::numeric_limits<acc_t>::lowest());
        d[j] = (acc_t(0) - p * gr - p * centred * hr) * inv_temp;
      }
      if (y[r] >= 0 && y[r] < V) d[y[r]] += gr * inv_temp;
      if constexpr (!std::is_same_v<in_t, acc_t>) {
        for (int64_t k = 0; k < V; ++k) d_row[k] = static_cast<in_t>(d[k]);
      }
    }
  });
}

void token_logprobs_backward(at::Tensor dlogits, const at::Tensor& logits, const at::Tensor& labels,
                             const at::Tensor& lse, const at::Tensor& entropy, const at::Tensor& grad_logp,
                             const c10::optional<at::Tensor>& grad_entropy, double inv_temp, int64_t ignore_index) {
  check_rows(logits, labels);
  TORCH_CHECK(dlogits.sizes() == logits.sizes() && dlogits.scalar_type() == logits.scalar_type() &&
                  dlogits.stride(-1) == 1,
              "dlogits must be like logits");
  const auto acc = lse.scalar_type();
  TORCH_CHECK(entropy.scalar_type() == acc && grad_logp.scalar_type() == acc && lse.is_contiguous() &&
                  entropy.is_contiguous() && grad_logp.is_contiguous(),
              "lse, entropy and grad_logp must be contiguous in the compute dtype");
  TORCH_CHECK(!grad_entropy.has_value() || (grad_entropy->scalar_type() == acc && grad_entropy->is_contiguous()),
              "grad_entropy must be contiguous in the compute dtype");
  switch (logits.scalar_type()) {
    case at::kDouble:
      logprobs_backward_kernel<double, double>(dlogits, logits, labels, lse, entropy, grad_logp, grad_entropy,
                                               inv_temp, ignore_index);
      break;
    case at::kFloat:
      logprobs_backward_kernel<float, float>(dlogits, logits, labels, lse, entropy, grad_logp, grad_entropy,
                                             inv_temp, ignore_index);
      break;
    case at::kBFloat16:
      logprobs_backward_kernel<at::BFloat16, float>(dlogits, logits, labels, lse, entropy, grad_logp,
                                                    grad_entropy, inv_temp, ignore_index);
      break;
    case at::kHalf:
      logprobs_backward_kernel<at::Half, float>(dlogits, logits, labels, lse, entropy, grad_logp, grad_entropy,
                                                inv_temp, ignore_index);
      break;
    default:
      TORCH_CHECK(false, "logits must be float64, float32, bfloat16 or float16, got ", logits.scalar_type());
  }
}

// The full KL to the reference over the whole vocabulary (ppo_fast/ops/full_kl.py), with
// s = z / τ the policy's row, r = z_ref / τ the reference's, x = s − max s, x_ref = r − max r:
//   d = Σ e^x,  d_ref = Σ e^{x_ref},  a = Σ_{ρ_v > 0} e^x (x − x_ref),  d_a = Σ_{ρ_v > 0} e^x
//   KL = Σ π (log π − log ρ) = (a + d_a (log d_ref − log d)) / d
// and +inf where a token the reference bans (r_v = −inf) has π_v > 0. The same pass gives the
// policy's log-prob of the label and its entropy, with the sums of row_sums (so the bits of the
// token_logprobs kernels): H = log d − Σ e^x x / d. Backward, with g = ∂L/∂KL, g_y = ∂L/∂logp and
// h = ∂L/∂H:
//   ∂L/∂z_v = ( g π_v (log π_v − log ρ_v − KL) + g_y (1[v = y] − π_v) − h π_v (log π_v + H) ) / τ
// (the π_v terms are 0 where π_v = 0). Both rows are read once each way; the logits of either
// model are never copied beyond a row.

// One row of any float dtype as s = z·inv_temp in the compute type: into `buffer` unless the row
// can be read as it is.
template <typename acc_t>
const acc_t* scaled_row_of(const at::Tensor& t, int64_t offset, int64_t V, acc_t inv_temp,
                           std::vector<acc_t>& buffer) {
  switch (t.scalar_type()) {
    case at::kDouble:
      return scaled_row<double, acc_t>(t.data_ptr<double>() + offset, V, inv_temp, buffer);
    case at::kFloat:
      return scaled_row<float, acc_t>(t.data_ptr<float>() + offset, V, inv_temp, buffer);
    case at::kBFloat16:
      return scaled_row<at::BFloat16, acc_t>(t.data_ptr<at::BFloat16>() + offset, V, inv_temp, buffer);
    default:
      return scaled_row<at::Half, acc_t>(t.data_ptr<at::Half>() + offset, V, inv_temp, buffer);
  }
}

template <typename acc_t, typename out_t>
void store_row(out_t* out, const acc_t* d, int64_t V) {
  for (int64_t j = 0; j < V; ++j) out[j] = static_cast<out_t>(d[j]);
}

// d (V values in the compute type) into row `offset` of `out`, in out's dtype.
template <typename acc_t>
void store_row_of(at::Tensor& out, int64_t offset, const acc_t* d, int64_t V) {
  switch (out.scalar_type()) {
    case at::kDouble:
      return store_row(out.data_ptr<double>() + offset, d, V);
    case at::kFloat:
      return store_row(out.data_ptr<float>() + offset, d, V);
    case at::kBFloat16:
      return store_row(out.data_ptr<at::BFloat16>() + offset, d, V);
    default:
      return store_row(out.data_ptr<at::Half>() + offset, d, V);
  }
}

template <typename acc_t>
struct KlRow {
  acc_t kl, lse, ref_lse, logp, entropy;
};

// A row whose maximum is not finite (NaN anywhere, a +inf, or every entry −inf) has no
// distribution: its log-sum-exp is that maximum (NaN, +inf, −inf, as torch.logsumexp gives) and
// the KL is NaN, which the public function reports, naming the model whose row it is.
// A label outside [0, V) (only possible when the public checks are skipped, as under
// torch.compile) is never read: its log-prob is NaN, as in row_forward.
template <typename acc_t>
KlRow<acc_t> full_kl_row(const acc_t* s, const acc_t* r, int64_t V, int64_t label) {
  using Vec = Vectorized<acc_t>;
  constexpr acc_t inf = std::numeric_limits<acc_t>::infinity(), lowest = std::numeric_limits<acc_t>::lowest();
  constexpr acc_t nan = std::numeric_limits<acc_t>::quiet_NaN();
  const acc_t m = row_max(s, V), m_ref = row_max(r, V);
  const bool in_row = label >= 0 && label < V;
  if (!std::isfinite(m) || !std::isfinite(m_ref)) {
    return {nan, m, m_ref, in_row ? s[label] - m : nan, nan};
  }
  const Vec vm(m), vm_ref(m_ref), vlowest(lowest), vneg_inf(-inf), zero(0);
  Vec d(0), weighted(0), d_ref(0), a(0), d_a(0), banned_top(-inf);
  int64_t j = 0;
  for (; j + Vec::size() <= V; j += Vec::size()) {
    const Vec sj = Vec::loadu(s + j), rj = Vec::loadu(r + j);
    // Floored at the lowest finite value: e^x is then 0 and e^x·x is 0, never 0·(−inf).
    const Vec x = at::vec::maximum(sj - vm, vlowest), x_ref = at::vec::maximum(rj - vm_ref, vlowest);
    const Vec e = vexp(x);
    d = d + e;
    weighted = at::vec::fmadd(e, x, weighted);
    d_ref = d_ref + vexp(x_ref);
    const Vec ref_banned = rj == vneg_inf;
    a = at::vec::fmadd(e, Vec::blendv(x - x_ref, zero, ref_banned), a);
    d_a = d_a + Vec::blendv(e, zero, ref_banned);
    banned_top = at::vec::maximum(banned_top, Vec::blendv(vneg_inf, sj, ref_banned));
  }
  auto sum = [](Vec& u, Vec& v) { return u + v; };
  acc_t total = at::vec::vec_reduce_all<acc_t>(sum, d), total_ref = at::vec::vec_reduce_all<acc_t>(sum, d_ref);
  acc_t total_weighted = at::vec::vec_reduce_all<acc_t>(sum, weighted);
  acc_t total_a = at::vec::vec_reduce_all<acc_t>(sum, a), total_d_a = at::vec::vec_reduce_all<acc_t>(sum, d_a);
  acc_t top = at::vec::vec_reduce_all<acc_t>([](Vec& u, Vec& v) { return at::vec::maximum(u, v); }, banned_top);
  for (; j < V; ++j) {
    const acc_t x = std::max(s[j] - m, lowest), x_ref = std::max(r[j] - m_ref, lowest);
    const acc_t e = std::exp(x);
    total += e;
    total_weighted += e * x;
    total_ref += std::exp(x_ref);
    if (r[j] == -inf) {
      top = std::max(top, s[j]);
    } else {
      total_a += e * (x - x_ref);
      total_d_a += e;
    }
  }
  const acc_t log_d = std::log(total), log_d_ref = std::log(total_ref), lse = m + log_d;
  const acc_t kl = std::exp(top - lse) > 0 ? inf : (total_a + total_d_a * (log_d_ref - log_d)) / total;
  return {kl, lse, m_ref + log_d_ref, in_row ? s[label] - lse : nan, log_d - total_weighted / total};
}

bool row_dtype(at::ScalarType t) {
  return t == at::kDouble || t == at::kFloat || t == at::kBFloat16 || t == at::kHalf;
}

void check_kl_rows(const at::Tensor& logits, const at::Tensor& ref_logits, const at::Tensor& labels) {
  for (const at::Tensor* t : {&logits, &ref_logits}) {
    TORCH_CHECK(t->device().is_cpu(), "the native backend runs on CPU tensors");
    TORCH_CHECK(t->dim() >= 1 && t->stride(-1) == 1, "logits and ref_logits must have a unit stride on the vocabulary");
    TORCH_CHECK(row_dtype(t->scalar_type()), "logits must be float64, float32, bfloat16 or float16, got ",
                t->scalar_type());
  }
  TORCH_CHECK(ref_logits.sizes() == logits.sizes(), "ref_logits must have the logits' shape");
  TORCH_CHECK(labels.scalar_type() == at::kLong && labels.is_contiguous(), "labels must be contiguous int64");
  TORCH_CHECK(labels.numel() * logits.size(-1) == logits.numel(), "labels must have the shape logits.shape[:-1]");
}

template <typename acc_t>
void full_kl_forward_kernel(const at::Tensor& logits, const at::Tensor& ref_logits, const at::Tensor& labels,
                            double inv_temp_d, int64_t ignore_index, std::vector<at::Tensor>& out) {
  const int64_t V = logits.size(-1), N = labels.numel();
  const Rows rows = rows_of(logits), ref_rows = rows_of(ref_logits);
  const int64_t* y = labels.data_ptr<int64_t>();
  acc_t *out_kl = out[0].data_ptr<acc_t>(), *out_lse = out[1].data_ptr<acc_t>(),
        *out_ref_lse = out[2].data_ptr<acc_t>(), *out_logp = out[3].data_ptr<acc_t>(),
        *out_entropy = out[4].data_ptr<acc_t>();
  const acc_t inv_temp = static_cast<acc_t>(inv_temp_d);
  at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> buffer, ref_buffer;
    for (int64_t row = begin; row < end; ++row) {
      if (y[row] == ignore_index) {
        out_kl[row] = out_lse[row] = out_ref_lse[row] = out_logp[row] = out_entropy[row] = 0;
        continue;
      }
      const acc_t* s = scaled_row_of<acc_t>(logits, rows.offset(row), V, inv_temp, buffer);
      const acc_t* r = scaled_row_of<acc_t>(ref_logits, ref_rows.offset(row), V, inv_temp, ref_buffer);
      const KlRow<acc_t> result = full_kl_row(s, r, V, y[row]);
      out_kl[row] = result.kl;
      out_lse[row] = result.lse;
      out_ref_lse[row] = result.ref_lse;
      out_logp[row] = result.logp;
      out_entropy[row] = result.entropy;
    }
  });
}

// {kl, lse, ref_lse, logp, entropy}, each of the labels' shape in the compute dtype.
std::vector<at::Tensor> full_kl_forward(const at::Tensor& logits, const at::Tensor& ref_logits,
                                        const at::Tensor& labels, double inv_temp, int64_t ignore_index) {
  check_kl_rows(logits, ref_logits, labels);
  const bool in_double = logits.scalar_type() == at::kDouble;
  auto options = logits.options().dtype(in_double ? at::kDouble : at::kFloat);
  std::vector<at::Tensor> out;
  for (int i = 0; i < 5; ++i) out.push_back(at::empty(labels.sizes(), options));
  if (in_double) {
    full_kl_forward_kernel<double>(logits, ref_logits, labels, inv_temp, ignore_index, out);
  } else {
    full_kl_forward_kernel<float>(logits, ref_logits, labels, inv_temp, ignore_index, out);
  }
  return out;
}

// The gradient of g·KL + g_y·logp + h·H, with the forward's KL, log-sum-exps and entropy (g_y and
// h are 0 for a KL alone: their terms add exact zeros).
template <typename acc_t>
void full_kl_backward_kernel(at::Tensor& dlogits, const at::Tensor& logits, const at::Tensor& ref_logits,
                             const at::Tensor& labels, const std::vector<at::Tensor>& per_token, double inv_temp_d,
                             int64_t ignore_index) {
  using Vec = Vectorized<acc_t>;
  const int64_t V = logits.size(-1), N = labels.numel();
  const Rows rows = rows_of(logits), ref_rows = rows_of(ref_logits), out_rows = rows_of(dlogits);
  const int64_t* y = labels.data_ptr<int64_t>();
  const acc_t *row_kl = per_token[0].data_ptr<acc_t>(), *row_lse = per_token[1].data_ptr<acc_t>(),
              *row_ref_lse = per_token[2].data_ptr<acc_t>(), *row_entropy = per_token[3].data_ptr<acc_t>(),
              *g = per_token[4].data_ptr<acc_t>(), *g_y = per_token[5].data_ptr<acc_t>(),
              *h = per_token[6].data_ptr<acc_t>();
  const acc_t inv_temp = static_cast<acc_t>(inv_temp_d);
  const bool direct = dlogits.scalar_type() == per_token[0].scalar_type();  // dlogits in the compute type
  at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> buffer, ref_buffer, result(direct ? 0 : V);
    for (int64_t row = begin; row < end; ++row) {
      acc_t* d = direct ? dlogits.data_ptr<acc_t>() + out_rows.offset(row) : result.data();
      if (y[row] == ignore_index) {
        std::fill(d, d + V, acc_t(0));
      } else {
        // Both rows are read (into the buffers when converted) element by element before the
        // element is written: dlogits may be the logits or the reference's logits.
        const acc_t* s = scaled_row_of<acc_t>(logits, rows.offset(row), V, inv_temp, buffer);
        const acc_t* r = scaled_row_of<acc_t>(ref_logits, ref_rows.offset(row), V, inv_temp, ref_buffer);
        const acc_t l = row_lse[row], l_ref = row_ref_lse[row], k = row_kl[row], entropy = row_entropy[row];
        const acc_t c = g[row] * inv_temp, c_y = g_y[row] * inv_temp, c_h = h[row] * inv_temp;
        const Vec vl(l), vl_ref(l_ref), vk(k), vc(c), vc_y(c_y), vc_h(c_h), ventropy(entropy),
            vlowest(std::numeric_limits<acc_t>::lowest()), zero(0);
        int64_t j = 0;
        for (; j + Vec::size() <= V; j += Vec::size()) {
          const Vec log_p = Vec::loadu(s + j) - vl;
          const Vec p = vexp(at::vec::maximum(log_p, vlowest));
          // π_v = 0 gives 0 whatever ρ_v is (log π − log ρ may be −inf − −inf there).
          const Vec gap = log_p - (Vec::loadu(r + j) - vl_ref) - vk;
          Vec::blendv(p * (gap * vc - vc_y - (log_p + ventropy) * vc_h), zero, p == zero).store(d + j);
        }
        for (; j < V; ++j) {
          const acc_t log_p = s[j] - l;
          const acc_t p = std::exp(std::max(log_p, std::numeric_limits<acc_t>::lowest()));
          d[j] = p == 0 ? acc_t(0) : p * ((log_p - (r[j] - l_ref) - k) * c - c_y - (log_p + entropy) * c_h);
        }
        if (y[row] >= 0 && y[row] < V) d[y[row]] += c_y;
      }
      if (!direct) store_row_of(dlogits, out_rows.offset(row), d, V);
    }
  });
}

void full_kl_backward(at::Tensor dlogits, const at::Tensor& logits, const at::Tensor& ref_logits,
                      const at::Tensor& labels, const at::Tensor& kl, const at::Tensor& lse,
                      const at::Tensor& ref_lse, const at::Tensor& entropy, const at::Tensor& grad_kl,
                      const at::Tensor& grad_logp, const at::Tensor& grad_entropy, double inv_temp,
                      int64_t ignore_index) {
  check_kl_rows(logits, ref_logits, labels);
  TORCH_CHECK(dlogits.sizes() == logits.sizes() && row_dtype(dlogits.scalar_type()) && dlogits.stride(-1) == 1,
              "dlogits must have the logits' shape, a float dtype and a unit stride on the vocabulary");
  const auto acc = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const std::vector<at::Tensor> per_token = {kl, lse, ref_lse, entropy, grad_kl, grad_logp, grad_entropy};
  for (const at::Tensor& t : per_token) {
    TORCH_CHECK(t.scalar_type() == acc && t.is_contiguous() && t.numel() == labels.numel(),
                "kl, lse, ref_lse, entropy, grad_kl, grad_logp and grad_entropy must be contiguous ", acc, " of ",
                labels.numel(), " tokens");
  }
  if (acc == at::kDouble) {
    full_kl_backward_kernel<double>(dlogits, logits, ref_logits, labels, per_token, inv_temp, ignore_index);
  } else {
    full_kl_backward_kernel<float>(dlogits, logits, ref_logits, labels, per_token, inv_temp, ignore_index);
  }
}

// The PPO actor loss per token, fused into the row pass (kernels/ppo_loss.py has the same math).
// With logp and H from the row and Δ = logp − old_logp:
//   ratio = e^{clamp(Δ, ±20)},  pg = max(−A·ratio, −A·clip(ratio, 1 − ε_low, 1 + ε_high))
//   dual clip (c > 1), A < 0: pg = min(pg, −A·c);  truncated IS: pg ·= min(e^{clamp(old − rollout, ±20)}, cap)
//   token_loss = pg + β·kl(logp, ref) − η·H,  and ∂token_loss/∂logp for the backward.
enum KlMode { kNoKl = 0, kK1 = 1, kAbs = 2, kK2 = 3, kK3 = 4, kK1Plus = 5, kK3Plus = 6 };

KlMode kl_mode_of(const std::string& name) {
  if (name == "k1") return kK1;
  if (name == "abs") return kAbs;
  if (name == "k2") return kK2;
  if (name == "k3") return kK3;
  if (name == "k1+") return kK1Plus;
  if (name == "k3+") return kK3Plus;
  TORCH_CHECK(false, "kl_estimator must be one of k1, abs, k2, k3, k1+, k3+, got '", name, "'");
}

struct PpoScalars {
  double clip_low, clip_high, dual_clip, tis_cap, kl_coef, entropy_coef;
  bool has_dual_clip;
  KlMode kl_mode;
};

template <typename acc_t>
struct PpoToken {
  acc_t loss, dloss, pg, kl, log_ratio;
  int8_t flags;
};

template <typename acc_t>
PpoToken<acc_t> ppo_token(acc_t logp, acc_t entropy, acc_t old_logp, acc_t adv, const acc_t* ref,
                          const acc_t* rollout, const PpoScalars& c) {
  constexpr acc_t bound = 20, k3_bound = 10;
  const acc_t raw_log_ratio = logp - old_logp;
  const bool ratio_in = raw_log_ratio >= -bound && raw_log_ratio <= bound;
  const acc_t log_ratio = std::min(std::max(raw_log_ratio, -bound), bound);
  const acc_t ratio = std::exp(log_ratio);
  const acc_t unclipped = -adv * ratio;
  const acc_t clipped_loss =
      -adv * std::min(std::max(ratio, acc_t(1 - c.clip_low)), acc_t(1 + c.clip_high));
  const bool clipped = clipped_loss > unclipped;
  acc_t pg = clipped ? clipped_loss : unclipped;
  acc_t dpg = (clipped || !ratio_in) ? acc_t(0) : unclipped;
  bool clipped_lower = false;
  if (c.has_dual_clip) {
    const acc_t cap = -adv * acc_t(c.dual_clip);
    clipped_lower = adv < 0 && pg > cap;
    if (clipped_lower) {
      pg = cap;
      dpg = 0;
    }
  }
  if (rollout) {
    const acc_t is_log_ratio = std::min(std::max(old_logp - *rollout, -bound), bound);
    const acc_t weight = std::min(std::exp(is_log_ratio), acc_t(c.tis_cap));
    pg *= weight;
    dpg *= weight;
  }
  acc_t kl = 0, dkl = 0;
  if (ref && c.kl_mode != kNoKl) {
    const acc_t diff = logp - *ref;
    switch (c.kl_mode) {
      case kK1:
        kl = diff;
        dkl = 1;
        break;
      case kAbs:
        kl = std::abs(diff);
        dkl = diff > 0 ? acc_t(1) : (diff < 0 ? acc_t(-1) : acc_t(0));
        break;
      case kK2:
        kl = acc_t(0.5) * diff * diff;
        dkl = diff;
        break;
      case kK1Plus:
        kl = diff;
        dkl = diff;
        break;
      default: {  // k3 and k3+: e^x − x − 1, x = clamp(ref − logp, ±20), the value clamped to ±10
        const bool x_in = -diff >= -bound && -diff <= bound;
        const acc_t x = std::min(std::max(-diff, -bound), bound);
        const acc_t raw = std::exp(x) - x - 1;
        kl = std::min(std::max(raw, -k3_bound), k3_bound);
        if (c.kl_mode == kK3Plus) {
          dkl = diff;
        } else {
          dkl = (x_in && raw >= -k3_bound && raw <= k3_bound) ? acc_t(1) - std::exp(x) : acc_t(0);
        }
      }
    }
  }
  const acc_t kl_coef = static_cast<acc_t>(c.kl_coef), entropy_coef = static_cast<acc_t>(c.entropy_coef);
  return {pg + kl_coef * kl - entropy_coef * entropy, dpg + kl_coef * dkl, pg, kl, log_ratio,
          static_cast<int8_t>((clipped ? 1 : 0) + (clipped_lower ? 2 : 0))};
}

template <typename in_t, typename acc_t>
void ppo_forward_kernel(const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& old_logp,
                        const at::Tensor& advantages, const c10::optional<at::Tensor>& ref_logp,
                        const c10::optional<at::Tensor>& rollout_logp, double inv_temp_d, int64_t ignore_index,
                        const PpoScalars& scalars, std::vector<at::Tensor>& out) {
  const int64_t V = logits.size(-1);
  const int64_t N = labels.numel();
  const Rows rows = rows_of(logits);
  const in_t* base = logits.data_ptr<in_t>();
  const int64_t* y = labels.data_ptr<int64_t>();
  const acc_t* old = old_logp.data_ptr<acc_t>();
  const acc_t* adv = advantages.data_ptr<acc_t>();
  const acc_t* ref = ref_logp.has_value() ? ref_logp->data_ptr<acc_t>() : nullptr;
  const acc_t* rollout = rollout_logp.has_value() ? rollout_logp->data_ptr<acc_t>() : nullptr;
  acc_t *loss = out[0].data_ptr<acc_t>(), *dloss = out[1].data_ptr<acc_t>(), *logp = out[2].data_ptr<acc_t>(),
        *entropy = out[3].data_ptr<acc_t>(), *lse = out[4].data_ptr<acc_t>(), *pg = out[5].data_ptr<acc_t>(),
        *kl = out[6].data_ptr<acc_t>(), *log_ratio = out[7].data_ptr<acc_t>();
  int8_t* flags = out[8].data_ptr<int8_t>();
  const acc_t inv_temp = static_cast<acc_t>(inv_temp_d);
  at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> buffer;
    for (int64_t r = begin; r < end; ++r) {
      if (y[r] == ignore_index) {
        loss[r] = dloss[r] = logp[r] = entropy[r] = lse[r] = pg[r] = kl[r] = log_ratio[r] = 0;
        flags[r] = 0;
        continue;
      }
      const RowResult<acc_t> row =
          row_forward<in_t, acc_t>(base + rows.offset(r), V, y[r], inv_temp, true, false, buffer);
      const PpoToken<acc_t> token = ppo_token<acc_t>(row.logp, row.entropy, old[r], adv[r], ref ? ref + r : nullptr,
                                                     rollout ? rollout + r : nullptr, scalars);
      loss[r] = token.loss;
      dloss[r] = token.dloss;
      logp[r] = row.logp;
      entropy[r] = row.entropy;
      lse[r] = row.lse;
      pg[r] = token.pg;
      kl[r] = token.kl;
      log_ratio[r] = token.log_ratio;
      flags[r] = token.flags;
    }
  });
}

std::vector<at::Tensor> ppo_loss_forward(const at::Tensor& logits, const at::Tensor& labels,
                                         const at::Tensor& old_logp, const at::Tensor& advantages,
                                         const c10::optional<at::Tensor>& ref_logp,
                                         const c10::optional<at::Tensor>& rollout_logp,
                                         const std::vector<double>& coefficients, int64_t ignore_index,
                                         const std::string& kl_estimator) {
  // The loss options packed once, in the order of ppo_fast/ops/ppo_loss.py's LossCoefficients:
  // inv_temp, clip_low, clip_high, dual_clip (0: off; it is > 1 when on), tis_cap, kl_coef, entropy_coef.
  TORCH_CHECK(coefficients.size() == 7, "coefficients must hold 7 values, got ", coefficients.size());
  const double inv_temp = coefficients[0];
  check_rows(logits, labels);
  const auto acc = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  for (const at::Tensor* t : {&old_logp, &advantages, ref_logp ? &*ref_logp : nullptr,
                              rollout_logp ? &*rollout_logp : nullptr}) {
    TORCH_CHECK(t == nullptr || (t->scalar_type() == acc && t->is_contiguous() && t->numel() == labels.numel()),
                "old_logp, advantages, ref_logp and rollout_logp must be contiguous ", acc, " of ",
                labels.numel(), " tokens");
  }
  const PpoScalars scalars{coefficients[1], coefficients[2], coefficients[3], coefficients[4], coefficients[5],
                           coefficients[6], coefficients[3] > 0, ref_logp.has_value() ? kl_mode_of(kl_estimator) : kNoKl};
  auto options = logits.options().dtype(acc);
  std::vector<at::Tensor> out;
  for (int i = 0; i < 8; ++i) out.push_back(at::empty(labels.sizes(), options));
  out.push_back(at::empty(labels.sizes(), options.dtype(at::kChar)));
  switch (logits.scalar_type()) {
    case at::kDouble:
      ppo_forward_kernel<double, double>(logits, labels, old_logp, advantages, ref_logp, rollout_logp, inv_temp,
                                         ignore_index, scalars, out);
      break;
    case at::kFloat:
      ppo_forward_kernel<float, float>(logits, labels, old_logp, advantages, ref_logp, rollout_logp, inv_temp,
                                       ignore_index, scalars, out);
      break;
    case at::kBFloat16:
      ppo_forward_kernel<at::BFloat16, float>(logits, labels, old_logp, advantages, ref_logp, rollout_logp,
                                              inv_temp, ignore_index, scalars, out);
      break;
    case at::kHalf:
      ppo_forward_kernel<at::Half, float>(logits, labels, old_logp, advantages, ref_logp, rollout_logp, inv_temp,
                                          ignore_index, scalars, out);
      break;
    default:
      TORCH_CHECK(false, "logits must be float64, float32, bfloat16 or float16, got ", logits.scalar_type());
  }
  return out;
}

// An uninitialised contiguous tensor of the shape and dtype of `like`, for a [tokens, vocab]
// gradient. Large ones are backed by 2 MiB pages (madvise, where the kernel's transparent huge
// pages allow it), and the last one freed is kept for the next: a fresh buffer is faulted in and
// zeroed by the kernel page by page on its first write, which on a 0.5 GB dlogits took longer than
// the backward kernel itself. Training allocates one such buffer per backward, each about the size
// of the last, so keeping one moves no peak: the kept buffer becomes the next dlogits. Held
// between steps, it is given back by release_gradient_cache() (ppo_fast.native.release_cache).
constexpr size_t kHugePage = size_t(2) << 20;
constexpr size_t kPooledBytes = 8 * kHugePage;

struct KeptBuffer {
  std::mutex lock;
  void* data = nullptr;
  size_t capacity = 0;
};

KeptBuffer& kept_buffer() {
  static KeptBuffer* kept = new KeptBuffer();  // never destroyed: deleters may run at exit
  return *kept;
}

void release_gradient_cache() {
  KeptBuffer& kept = kept_buffer();
  std::lock_guard<std::mutex> guard(kept.lock);
  std::free(kept.data);
  kept.data = nullptr;
  kept.capacity = 0;
}

void keep_or_free(void* data, size_t capacity) {
  KeptBuffer& kept = kept_buffer();
  std::lock_guard<std::mutex> guard(kept.lock);
  if (kept.data == nullptr) {
    kept.data = data;
    kept.capacity = capacity;
  } else {
    std::free(data);
  }
}

at::Tensor empty_gradient_like(const at::Tensor& like) {
  const auto sizes = like.sizes();
  const auto dtype = like.scalar_type();
  const size_t bytes = static_cast<size_t>(c10::multiply_integers(sizes)) * c10::elementSize(dtype);
  auto options = at::TensorOptions().dtype(dtype);
  if (bytes < kPooledBytes) return at::empty(sizes, options);
  const size_t rounded = (bytes + kHugePage - 1) / kHugePage * kHugePage;
  void* data = nullptr;
  size_t capacity = rounded;
  {
    KeptBuffer& kept = kept_buffer();
    std::lock_guard<std::mutex> guard(kept.lock);
    // Taken when it fits without wasting more than half of it; otherwise given back.
    if (kept.data != nullptr && kept.capacity >= rounded && kept.capacity <= 2 * rounded) {
      data = kept.data;
      capacity = kept.capacity;
    } else {
      std::free(kept.data);
    }
    kept.data = nullptr;
    kept.capacity = 0;
  }
  if (data == nullptr) {
    data = std::aligned_alloc(kHugePage, rounded);
    TORCH_CHECK(data != nullptr, "could not allocate ", bytes, " bytes for a gradient");
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    madvise(data, rounded, MADV_HUGEPAGE);
#endif
  }
  return at::from_blob(data, sizes, [capacity](void* p) { keep_or_free(p, capacity); }, options);
}

template <typename acc_t>
void gae_kernel(const at::Tensor& rewards, const at::Tensor& values, const at::Tensor& mask,
                const at::Tensor& cu_seqlens, double gamma_d, double lam_d, at::Tensor& adv, at::Tensor& ret) {
  const acc_t* r = rewards.data_ptr<acc_t>();
  const acc_t* v = values.data_ptr<acc_t>();
  const bool* m = mask.data_ptr<bool>();
  const int64_t* cu = cu_seqlens.data_ptr<int64_t>();
  acc_t* a = adv.data_ptr<acc_t>();
  acc_t* R = ret.data_ptr<acc_t>();
  const acc_t gamma = static_cast<acc_t>(gamma_d), gamma_lam = static_cast<acc_t>(gamma_d * lam_d);
  at::parallel_for(0, cu_seqlens.numel() - 1, 1, [&](int64_t begin, int64_t end) {
    for (int64_t seq = begin; seq < end; ++seq) {
      acc_t next_value = 0, next_adv = 0;
      for (int64_t t = cu[seq + 1] - 1; t >= cu[seq]; --t) {
        // Selects, not a branch (masks are irregular): a masked token's values are computed with
        // and never chosen, so whatever padding holds (NaN, inf) reaches no output.
        const bool keep = m[t];
        const acc_t value = v[t];
        const acc_t adv_t = r[t] + gamma * next_value - value + gamma_lam * next_adv;
        next_value = keep ? value : next_value;
        next_adv = keep ? adv_t : next_adv;
        a[t] = keep ? adv_t : acc_t(0);
        R[t] = keep ? adv_t + value : acc_t(0);
      }
    }
  });
}

std::vector<at::Tensor> gae_forward(const at::Tensor& rewards, const at::Tensor& values, const at::Tensor& mask,
                                    const at::Tensor& cu_seqlens, double gamma, double lam) {
  TORCH_CHECK(rewards.device().is_cpu(), "the native backend runs on CPU tensors");
  TORCH_CHECK(rewards.dim() == 1 && values.sizes() == rewards.sizes() && mask.sizes() == rewards.sizes(),
              "rewards, values and mask must be 1-D packed tokens of one shape");
  TORCH_CHECK(rewards.scalar_type() == values.scalar_type() && rewards.is_contiguous() && values.is_contiguous(),
              "rewards and values must be contiguous in the compute dtype");
  TORCH_CHECK(mask.scalar_type() == at::kBool && mask.is_contiguous(), "mask must be contiguous bool");
  TORCH_CHECK(cu_seqlens.scalar_type() == at::kLong && cu_seqlens.is_contiguous(), "cu_seqlens must be int64");
  // Checked here too: under torch.compile the public check is skipped, and a wrong boundary would
  // have the kernel read and write outside the tokens.
  const int64_t* cu = cu_seqlens.data_ptr<int64_t>();
  const int64_t bounds = cu_seqlens.numel();
  TORCH_CHECK(bounds >= 1 && cu[0] == 0 && cu[bounds - 1] == rewards.numel(),
              "cu_seqlens must run from 0 to the number of tokens (", rewards.numel(), ")");
  for (int64_t i = 0; i + 1 < bounds; ++i) {
    TORCH_CHECK(cu[i + 1] >= cu[i], "cu_seqlens must not decrease, got ", cu[i], " then ", cu[i + 1]);
  }
  at::Tensor adv = at::empty_like(rewards), ret = at::empty_like(rewards);
  if (rewards.scalar_type() == at::kDouble) {
    gae_kernel<double>(rewards, values, mask, cu_seqlens, gamma, lam, adv, ret);
  } else {
    TORCH_CHECK(rewards.scalar_type() == at::kFloat, "rewards must be float32 or float64");
    gae_kernel<float>(rewards, values, mask, cu_seqlens, gamma, lam, adv, ret);
  }
  return {adv, ret};
}

}  // namespace

void register_batch_invariant(pybind11::module& m);  // csrc/batch_invariant_cpu.cpp

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("token_logprobs_forward", &token_logprobs_forward);
  m.def("token_logprobs_backward", &token_logprobs_backward);
  m.def("full_kl_forward", &full_kl_forward);
  m.def("full_kl_backward", &full_kl_backward);
  m.def("gae_forward", &gae_forward);
  m.def("ppo_loss_forward", &ppo_loss_forward);
  m.def("empty_gradient_like", &empty_gradient_like);
  m.def("release_gradient_cache", &release_gradient_cache);
  register_batch_invariant(m);
}
