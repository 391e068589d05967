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
#include <limits>
#include <vector>

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
      const acc_t* s = scaled_row<in_t, acc_t>(base + rows.offset(r), V, inv_temp, buffer);
      const acc_t m = row_max(s, V);
      acc_t sums[3];
      row_sums(s, V, m, with_entropy, with_squares, sums);
      const acc_t log_sum = std::log(sums[0]);
      const acc_t row_lse = m + log_sum;
      out_lse[r] = row_lse;
      out_logp[r] = s[y[r]] - row_lse;
      out_entropy[r] = with_entropy ? log_sum - sums[1] / sums[0] : acc_t(0);
      if (with_squares) out_squares[r] = sums[2] / (sums[0] * sums[0]);
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
      const acc_t gr = g[r], hr = h ? h[r] : acc_t(0), l = row_lse[r];
      const acc_t mean_s = l - row_entropy[r];
      acc_t* d = nullptr;
      if constexpr (std::is_same_v<in_t, acc_t>) {
        d = d_row;
      } else {
        result.resize(V);
        d = result.data();
      }
      const Vec vl(l), vg(gr), vh(hr), vmean(mean_s), vtemp(inv_temp), lowest(std::numeric_limits<acc_t>::lowest());
      int64_t j = 0;
      for (; j + Vec::size() <= V; j += Vec::size()) {
        Vec sj = Vec::loadu(s + j);
        Vec p = vexp(sj - vl);
        Vec centred = at::vec::maximum(sj - vmean, lowest);
        Vec dj = (Vec(0) - p * vg - p * centred * vh) * vtemp;
        dj.store(d + j);
      }
      for (; j < V; ++j) {
        acc_t p = std::exp(s[j] - l);
        acc_t centred = std::max(s[j] - mean_s, std::numeric_limits<acc_t>::lowest());
        d[j] = (acc_t(0) - p * gr - p * centred * hr) * inv_temp;
      }
      d[y[r]] += gr * inv_temp;
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

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("token_logprobs_forward", &token_logprobs_forward);
  m.def("token_logprobs_backward", &token_logprobs_backward);
  m.def("gae_forward", &gae_forward);
}
