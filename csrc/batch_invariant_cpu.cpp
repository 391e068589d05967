// Batch-invariant CPU kernels for ppo_fast.batch_invariant(): GEMM, row reductions, attention.
//
// The contract: an output element's value is a function of its own inputs and of the reduced
// length alone, never of M, N, the row's position, the batch, the tile it falls in or the thread
// count. Every reduction here runs in one order fixed by the reduced length:
//   - GEMM: each output is one FMA chain over k = 0 … K − 1, in one vector lane; the tile and the
//     lane it falls in change with M, the chain does not (a vector FMA rounds each lane once).
//   - a row sum or attention's q·k over a fixed length L: lane l of one vector accumulator (W
//     lanes, W the CPU's vector width) takes k ≡ l (mod W) in increasing k; the W lanes are then
//     summed by a fixed halving tree; the last L mod W terms are added one by one after it.
//   - over keys (attention): the valid keys of one query in increasing key index, one at a time;
//     a masked key is skipped, not added as a zero, so left padding and the causal future change
//     nothing, and a prefill query equals the same query decoded against the cache.
// One thread computes an output tile, a row or a query whole (no split-K, no split rows).
// bfloat16 inputs are widened to float32 and accumulated in float32; outputs round once.

#include <torch/extension.h>

#include <ATen/Parallel.h>
#include <ATen/cpu/Utils.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#if defined(__x86_64__)
#include <cpuid.h>
#include <immintrin.h>
#endif

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

// The same tree for float32 in registers: each step adds the same pairs of lanes (the upper half
// onto the lower), so the bits are the loop's; attention runs it once per query and key.
#if defined(CPU_CAPABILITY_AVX512)
template <>
inline float tree<float>(const Vectorized<float>& acc) {
  const __m512 all = acc;
  __m256 half = _mm256_add_ps(_mm512_castps512_ps256(all), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(all), 1)));
  __m128 quarter = _mm_add_ps(_mm256_castps256_ps128(half), _mm256_extractf128_ps(half, 1));
  quarter = _mm_add_ps(quarter, _mm_movehl_ps(quarter, quarter));
  return _mm_cvtss_f32(_mm_add_ss(quarter, _mm_movehdup_ps(quarter)));
}
#elif defined(CPU_CAPABILITY_AVX2)
template <>
inline float tree<float>(const Vectorized<float>& acc) {
  const __m256 all = acc;
  __m128 quarter = _mm_add_ps(_mm256_castps256_ps128(all), _mm256_extractf128_ps(all, 1));
  quarter = _mm_add_ps(quarter, _mm_movehl_ps(quarter, quarter));
  return _mm_cvtss_f32(_mm_add_ss(quarter, _mm_movehdup_ps(quarter)));
}
#endif

// One dot product Σ_k a[k]·b[k] (attention's q·k): lanes, tree(), then the tail, as the header says.
// The operands may be of two types (a query widened once, its keys as stored): widening is exact.
template <typename A, typename TA, typename TB>
inline A dot(const TA* a, const TB* b, int64_t K) {
  using V = Vectorized<A>;
  constexpr int lanes = V::size();
  V acc(A(0));
  const int64_t body = K - K % lanes;
  for (int64_t k = 0; k < body; k += lanes) acc = at::vec::fmadd(load<A>(a + k), load<A>(b + k), acc);
  A s = tree<A>(acc);
  for (int64_t k = body; k < K; ++k) s = std::fma(widen<A>(a[k]), widen<A>(b[k]), s);
  return s;
}

// The GEMM out[m, n] = alpha·Σ_k X[m, k]·W[n, k] + beta·bias[m, n]: every output is one FMA chain
// over k = 0 … K − 1 in its own vector lane. The rows of X are packed (widened) into panels of
// `lanes` rows, k-major, zero rows past M; a register tile is kNR rows of W (each W[n, k]
// broadcast) × MV panels of X, read as one interleaved stream. A row's lane, panel and tile change with M, its chain does not.
template <typename A>
constexpr int kPanelVectors = Vectorized<A>::size() * sizeof(A) == 64 ? 4 : 2;  // AVX-512: 32 registers, AVX2: 16
constexpr int kNR = 6;
constexpr int64_t kRowBlock = 48;     // W rows swept over every panel group together: they stay in L2
constexpr int64_t kDepthBlock = 128;  // k per pass: 4 panels × 128 × 64 bytes = 32 KiB, in L1

// acc (the tile's running sums, [NR][MV][lanes]) += the tile's products over k ∈ [k0, k1): a block
// of K at a time, so a panel group's block stays in L1 across the tiles of a W row block. Storing
// and reloading a running sum changes no bit: the chain is the same.
template <int NR, int MV, typename T, typename A>
inline void gemm_tile(const A* panels, const T* W, int64_t swn, int64_t swk, int64_t k0, int64_t k1,
                      A* sums) {
  using V = Vectorized<A>;
  constexpr int lanes = V::size();
  V acc[NR][MV];
  for (int r = 0; r < NR; ++r)
    for (int v = 0; v < MV; ++v) acc[r][v] = V::loadu(sums + (r * MV + v) * lanes);
  for (int64_t k = k0; k < k1; ++k) {
    V x[MV];
    for (int v = 0; v < MV; ++v) x[v] = V::loadu(panels + (k * kPanelVectors<A> + v) * lanes);
    for (int r = 0; r < NR; ++r) {
      const V w(widen<A>(W[r * swn + k * swk]));
      for (int v = 0; v < MV; ++v) acc[r][v] = at::vec::fmadd(x[v], w, acc[r][v]);
    }
  }
  for (int r = 0; r < NR; ++r)
    for (int v = 0; v < MV; ++v) acc[r][v].store(sums + (r * MV + v) * lanes);
}

template <int NR, typename T, typename A>
inline void gemm_tile_mv(int mv, const A* panels, const T* W, int64_t swn, int64_t swk, int64_t k0,
                         int64_t k1, A* sums) {
  static_assert(kPanelVectors<A> == 4 || kPanelVectors<A> == 2);
  if (swk == 1) {  // the common layout (a weight [N, K]) with a stride the compiler knows
    switch (mv) {
      case 1: return gemm_tile<NR, 1>(panels, W, swn, 1, k0, k1, sums);
      case 2: return gemm_tile<NR, 2>(panels, W, swn, 1, k0, k1, sums);
      case 3: return gemm_tile<NR, 3>(panels, W, swn, 1, k0, k1, sums);
      default: return gemm_tile<NR, kPanelVectors<A>>(panels, W, swn, 1, k0, k1, sums);
    }
  }
  switch (mv) {
    case 1: return gemm_tile<NR, 1>(panels, W, swn, swk, k0, k1, sums);
    case 2: return gemm_tile<NR, 2>(panels, W, swn, swk, k0, k1, sums);
    case 3: return gemm_tile<NR, 3>(panels, W, swn, swk, k0, k1, sums);
    default: return gemm_tile<NR, kPanelVectors<A>>(panels, W, swn, swk, k0, k1, sums);
  }
}

// A parallel_for grain (items per chunk) giving each chunk about `work` units (multiply-adds,
// elements) when one item is `per_item` units: below it a call runs on the calling thread, as
// torch's own kernels do for small inputs. Which thread computes an output never changes its bits,
// so this is a speed choice only; it matters on a small model, whose GEMMs and row sums are so
// small that waking a second thread costs more than the work (much more on a loaded machine).
constexpr int64_t kChunkWork = int64_t(1) << 17;
inline int64_t grain(int64_t per_item, int64_t work = kChunkWork) {
  return std::max<int64_t>(1, work / std::max<int64_t>(1, per_item));
}

// addmm's epilogue of one output, alpha·sum + beta·bias, as one fma (beta·bias rounded first unless
// beta is 1): written out, so no compiler contraction can make two calls round differently.
template <typename A, typename T>
inline A with_bias(A alpha, A sum, A beta, T bias) {
  return std::fma(alpha, sum, beta == A(1) ? widen<A>(bias) : beta * widen<A>(bias));
}

// Writes rows [m_begin, m_end) × columns [n_begin, n_end) of C from a row block's sums (the sum of
// (m, n) at sums[(n − n_begin)·step_n + (m − m_begin)]). C = alpha·sum + beta·bias with explicit
// roundings (one product, or with_bias), so no compiler contraction can make two calls round
// differently.
template <typename T, typename A>
void store_block(const A* sums, int64_t step_n, int64_t m_begin, int64_t m_end, int64_t n_begin, int64_t n_end,
                 T* C, int64_t ldc, A alpha, A beta, const T* bias, int64_t bias_sm, int64_t bias_sn) {
  const int64_t width = n_end - n_begin;
  int64_t step_m = 1;
  if constexpr (std::is_same_v<T, float> && std::is_same_v<A, float>) {
    at::vec::transpose_mxn<float>(sums, step_n, C + m_begin * ldc + n_begin, ldc, static_cast<int>(width),
                                  static_cast<int>(m_end - m_begin));
    if (bias == nullptr && alpha == A(1)) return;
    sums = C + m_begin * ldc + n_begin;  // read back: float32 holds each sum exactly
    step_n = 1;
    step_m = ldc;
  }
  for (int64_t m = m_begin; m < m_end; ++m) {
    const A* from = sums + (m - m_begin) * step_m;
    T* to = C + m * ldc + n_begin;
    if (bias == nullptr && alpha == A(1)) {
      for (int64_t j = 0; j < width; ++j) to[j] = static_cast<T>(from[j * step_n]);
    } else if (bias == nullptr) {
      for (int64_t j = 0; j < width; ++j) to[j] = static_cast<T>(alpha * from[j * step_n]);
    } else {
      const T* b = bias + m * bias_sm + n_begin * bias_sn;
      for (int64_t j = 0; j < width; ++j) to[j] = static_cast<T>(with_bias(alpha, from[j * step_n], beta, b[j * bias_sn]));
    }
  }
}

// X[m, k] at X[m·sxm + k·sxk] and W[n, k] at W[n·swn + k·swk]: any strides, so a transposed operand
// (the backward's Wᵀ and gradᵀ) is read in place rather than copied; the packing and the FMA chain
// are the same whatever the strides.
template <typename T, typename A = typename Acc<T>::type>
void gemm_nt(const T* X, int64_t sxm, int64_t sxk, const T* W, int64_t swn, int64_t swk, T* C, int64_t ldc,
             int64_t M, int64_t N, int64_t K, A alpha, A beta, const T* bias, int64_t bias_sm, int64_t bias_sn) {
  constexpr int lanes = Vectorized<A>::size();
  constexpr int MV = kPanelVectors<A>;
  const int64_t n_panels = (M + lanes - 1) / lanes;
  const int64_t groups = (n_panels + MV - 1) / MV, row_blocks = (N + kRowBlock - 1) / kRowBlock;
  // A group's MV panels interleaved: [group][k][MV][lanes], one stream for the tile to read.
  std::vector<A> packed(static_cast<size_t>(groups * K * MV * lanes), A(0));
  at::parallel_for(0, n_panels, grain(lanes * K, at::internal::GRAIN_SIZE), [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      const int64_t rows = std::min<int64_t>(lanes, M - p * lanes);
      const T* from = X + p * lanes * sxm;
      A* to = packed.data() + (p / MV) * K * MV * lanes + (p % MV) * lanes;
      for (int64_t k = 0; k < K; ++k)  // writes one vector at a time, reads `rows` strided streams
        for (int64_t l = 0; l < rows; ++l) to[k * MV * lanes + l] = widen<A>(from[l * sxm + k * sxk]);
    }
  });
  // Work items are (block of W rows, group of panels) pairs; which thread takes one changes no bits.
  const int64_t items = row_blocks * groups;
  at::parallel_for(0, items, grain(M * N / items * K), [&](int64_t begin, int64_t end) {
    std::vector<A> block_sums(static_cast<size_t>(kRowBlock * MV * lanes));
    for (int64_t item = begin; item < end; ++item) {
      const int64_t n_begin = (item / groups) * kRowBlock, n_end = std::min(N, n_begin + kRowBlock);
      const int64_t p0 = (item % groups) * MV;
      const int mv = static_cast<int>(std::min<int64_t>(MV, n_panels - p0));
      const A* panels = packed.data() + (p0 / MV) * K * MV * lanes;
      std::fill(block_sums.begin(), block_sums.end(), A(0));
      for (int64_t k0 = 0; k0 < K; k0 += kDepthBlock) {
        const int64_t k1 = std::min(K, k0 + kDepthBlock);
        for (int64_t n0 = n_begin; n0 < n_end; n0 += kNR) {
          const int nr = static_cast<int>(std::min<int64_t>(kNR, n_end - n0));
          A* sums = block_sums.data() + (n0 - n_begin) * mv * lanes;
          if (nr == kNR) {
            gemm_tile_mv<kNR, T, A>(mv, panels, W + n0 * swn, swn, swk, k0, k1, sums);
          } else {  // the block's last rows, one at a time
            for (int r = 0; r < nr; ++r)
              gemm_tile_mv<1, T, A>(mv, panels, W + (n0 + r) * swn, swn, swk, k0, k1,
                                    sums + r * mv * lanes);
          }
        }
      }
      store_block<T, A>(block_sums.data(), static_cast<int64_t>(mv) * lanes, p0 * lanes, std::min<int64_t>(M, (p0 + mv) * lanes), n_begin,
                        n_end, C, ldc, alpha, beta, bias, bias_sm, bias_sn);
    }
  });
}

// bfloat16 on the AMX tiles (Intel Sapphire Rapids and later), where torch's own bfloat16 GEMM
// runs on them and the widening vector kernel above reaches a tenth of their rate. Inside one
// TDPBF16PS the hardware adds a row's 32 products in an order of its own, not k's (measured: even
// and odd k behave as if summed apart), so its bits are not the vector kernel's FMA chain; but the
// order is fixed, the chunks of 32 k follow each other in order, and an output is computed from
// its own row's inputs alone. The tiles compute Cᵀ: a W tile is
// 16 rows of W (n) × 32 k, read in place; an X tile is 16 pairs of k × 16 rows of X, packed; a
// sums tile is 16 n × 16 m. K is padded with zero products to a multiple of 32 whatever M is, so a
// row's chain depends on K alone. Whether this path runs is decided once per process, by the CPU
// and PPO_FAST_AMX (never by M, N or K): a row keeps its bits in every batch because every batch
// takes the same path.
#if defined(__x86_64__) && defined(__linux__) && (defined(__clang__) || __GNUC__ >= 11)
#define PPO_FAST_AMX 1
#endif

using bf16 = at::BFloat16;

#ifdef PPO_FAST_AMX
constexpr int64_t kTileRows = 16;
constexpr int64_t kTileDepth = 32;                          // bfloat16 k per tile row (64 bytes)
constexpr int64_t kTileElements = kTileRows * kTileDepth;   // one packed X tile
constexpr int64_t kPairRow = 2 * kTileRows;                 // an X tile row: one k pair of 16 rows
constexpr int64_t kSumsStride = 2 * kTileRows;              // floats between two n of a block's sums
constexpr int64_t kMPairsPerItem = 4;                       // 128 rows of X per work item
constexpr int64_t kStreamBytes = int64_t(8) << 20;          // a C larger than this is written past the caches
constexpr int64_t kChunksPerBlock = 8;                      // 256 k: 16 KiB of W's 32 rows, in L1

bool cpu_has_amx_bf16() {
  unsigned a = 0, b = 0, c = 0, d = 0;
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
  return ((d >> 22) & 1) && ((d >> 24) & 1);  // AMX-BF16, AMX-TILE
}

struct alignas(64) TileConfig {
  uint8_t palette = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// tmm0–3: sums of (n block i, m block j) in tmm(2i + j); tmm4, tmm5: W blocks; tmm6, tmm7: X blocks.
// All eight are 16 rows of 64 bytes. A thread's tiles are configured for the span of a TileScope,
// then given back as they were: another AMX user on the thread (oneDNN, compiled micro-kernels)
// may remember its configuration rather than load it before each use.
class TileScope {
 public:
  __attribute__((target("amx-tile"))) TileScope() {
    // Not _tile_loadconfig / _tile_storeconfig: GCC 12's declare an 8-byte operand, so the rows and
    // widths below are dead stores to its optimiser and the tiles stay unconfigured.
    asm volatile("sttilecfg %0" : "=m"(saved_));
    TileConfig ours;
    for (int t = 0; t < 8; ++t) {
      ours.colsb[t] = 64;
      ours.rows[t] = kTileRows;
    }
    asm volatile("ldtilecfg %0" : : "m"(ours));
  }
  __attribute__((target("amx-tile"))) ~TileScope() {
    if (saved_.palette == 0) {  // no configuration before (STTILECFG writes zeros): the initial state
      _tile_release();
    } else {
      asm volatile("ldtilecfg %0" : : "m"(saved_));
    }
  }
  TileScope(const TileScope&) = delete;
  TileScope& operator=(const TileScope&) = delete;

 private:
  TileConfig saved_;
};

// sums (kSumsStride floats a row of n) += the products of NB blocks of W (16 rows each, the second
// swn·16 elements after the first) and MB packed X blocks (the second x_block elements after the
// first), over the k chunks [kc_begin, kc_end) in order; `first`: the sums start at zero rather
// than from memory (a float32 stored and reloaded is the same number: the chain goes on unchanged).
template <int NB, int MB>
__attribute__((target("amx-tile,amx-bf16"))) void amx_block(const bf16* W, int64_t swn, const bf16* X,
                                                          int64_t x_block, int64_t kc_begin, int64_t kc_end,
                                                          bool first, float* sums) {
  const int64_t w_stride = swn * static_cast<int64_t>(sizeof(bf16));
  constexpr int64_t stride = kSumsStride * sizeof(float);
  float* const sums_of[4] = {sums, sums + kTileRows, sums + kTileRows * kSumsStride,
                             sums + kTileRows * kSumsStride + kTileRows};
  if (first) {
    _tile_zero(0);
    if constexpr (MB == 2) _tile_zero(1);
    if constexpr (NB == 2) _tile_zero(2);
    if constexpr (NB == 2 && MB == 2) _tile_zero(3);
  } else {
    _tile_loadd(0, sums_of[0], stride);
    if constexpr (MB == 2) _tile_loadd(1, sums_of[1], stride);
    if constexpr (NB == 2) _tile_loadd(2, sums_of[2], stride);
    if constexpr (NB == 2 && MB == 2) _tile_loadd(3, sums_of[3], stride);
  }
  for (int64_t kc = kc_begin; kc < kc_end; ++kc) {
    _tile_loadd(4, W + kc * kTileDepth, w_stride);
    _tile_loadd(6, X + kc * kTileElements, 64);
    _tile_dpbf16ps(0, 4, 6);
    if constexpr (MB == 2) {
      _tile_loadd(7, X + x_block + kc * kTileElements, 64);
      _tile_dpbf16ps(1, 4, 7);
    }
    if constexpr (NB == 2) {
      _tile_loadd(5, W + kTileRows * swn + kc * kTileDepth, w_stride);
      _tile_dpbf16ps(2, 5, 6);
      if constexpr (MB == 2) _tile_dpbf16ps(3, 5, 7);
    }
  }
  _tile_stored(0, sums_of[0], stride);
  if constexpr (MB == 2) _tile_stored(1, sums_of[1], stride);
  if constexpr (NB == 2) _tile_stored(2, sums_of[2], stride);
  if constexpr (NB == 2 && MB == 2) _tile_stored(3, sums_of[3], stride);
}

// One packed X tile from 16 rows (rows elements apart) × 32 k of X: the 16 × 16 matrix of 4-byte k
// pairs, transposed (unpacks of 32-bit, then 64-bit elements, then two shuffles of 128-bit lanes).
__attribute__((target("avx512f"))) void transpose_pairs(const bf16* X, int64_t rows, bf16* tile) {
  __m512i r[16], t[16];
  for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_si512(X + i * rows);
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {
    r[4 * i] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
    r[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
    r[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
    r[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
  }
  for (int h = 0; h < 2; ++h) {
    for (int i = 0; i < 4; ++i) {
      t[8 * h + i] = _mm512_shuffle_i32x4(r[8 * h + i], r[8 * h + 4 + i], 0x88);
      t[8 * h + 4 + i] = _mm512_shuffle_i32x4(r[8 * h + i], r[8 * h + 4 + i], 0xdd);
    }
  }
  for (int i = 0; i < 8; ++i) {
    r[i] = _mm512_shuffle_i32x4(t[i], t[8 + i], 0x88);
    r[8 + i] = _mm512_shuffle_i32x4(t[i], t[8 + i], 0xdd);
  }
  for (int i = 0; i < 16; ++i) _mm512_storeu_si512(tile + i * kPairRow, r[i]);
}

// Writes C[m_begin:m_end, n_begin:n_end] from the sums of amx_block (n-major, kSumsStride apart):
// C = alpha·sum + beta·bias with the roundings of store_block, each n's row rounded to bfloat16 a
// vector at a time, the 16-bit block transposed to rows of C. `stream`: a C too large for the caches
// gets its whole 64-byte lines written past them (no read of the line first: writing 32 columns of
// many rows at a time, those reads are most of the time).
__attribute__((target("avx512f"))) void store_tiles(float* sums, int64_t m_begin, int64_t m_end, int64_t n_begin,
                                                   int64_t n_end, bf16* C, int64_t ldc, float alpha, float beta,
                                                   const bf16* bias, int64_t bias_sm, int64_t bias_sn, bool stream) {
  alignas(64) bf16 rounded[2 * kTileRows * kSumsStride];
  alignas(64) bf16 rows[2 * kTileRows * kSumsStride];
  const int64_t height = m_end - m_begin, width = n_end - n_begin;
  for (int64_t n = n_begin; n < n_end; ++n) {
    float* row = sums + (n - n_begin) * kSumsStride;
    if (bias != nullptr) {
      const bf16* b = bias + m_begin * bias_sm + n * bias_sn;
      for (int64_t i = 0; i < height; ++i) row[i] = with_bias(alpha, row[i], beta, b[i * bias_sm]);
    } else if (alpha != 1.f) {
      for (int64_t i = 0; i < height; ++i) row[i] = alpha * row[i];
    }
    at::vec::convert(row, rounded + (n - n_begin) * kSumsStride, height);
  }
  const bool lines = stream && width == kSumsStride && reinterpret_cast<uintptr_t>(C + m_begin * ldc + n_begin) % 64 == 0 &&
                     (ldc * sizeof(bf16)) % 64 == 0;
  if (!lines) {
    at::vec::transpose_mxn<bf16>(rounded, kSumsStride, C + m_begin * ldc + n_begin, ldc, static_cast<int>(width),
                                 static_cast<int>(height));
    return;
  }
  at::vec::transpose_mxn<bf16>(rounded, kSumsStride, rows, kSumsStride, static_cast<int>(width),
                               static_cast<int>(height));
  for (int64_t m = m_begin; m < m_end; ++m)
    _mm512_stream_si512(reinterpret_cast<__m512i*>(C + m * ldc + n_begin), _mm512_load_si512(rows + (m - m_begin) * kSumsStride));
}

void gemm_amx(const bf16* X, int64_t sxm, int64_t sxk, const bf16* W, int64_t swn, int64_t swk, bf16* C,
              int64_t ldc, int64_t M, int64_t N, int64_t K, float alpha, float beta, const bf16* bias,
              int64_t bias_sm, int64_t bias_sn) {
  const int64_t k_chunks = (K + kTileDepth - 1) / kTileDepth, k_padded = k_chunks * kTileDepth;
  const int64_t m_blocks = (M + kTileRows - 1) / kTileRows, n_blocks = (N + kTileRows - 1) / kTileRows;
  const int64_t x_block = k_chunks * kTileElements;
  // X as tiles of k pairs: element (m, k) at [m / 16][k / 32][(k % 32) / 2][m % 16][k % 2]; zeros past M and K.
  std::vector<bf16> packed_x(static_cast<size_t>(m_blocks * x_block), bf16(0.f));
  at::parallel_for(0, m_blocks, grain(kTileRows * K, at::internal::GRAIN_SIZE), [&](int64_t begin, int64_t end) {
    for (int64_t mb = begin; mb < end; ++mb) {
      const int64_t rows = std::min(kTileRows, M - mb * kTileRows);
      bf16* to = packed_x.data() + mb * x_block;
      const bf16* from = X + mb * kTileRows * sxm;
      int64_t k_begin = 0;  // whole blocks of 16 rows × 32 unit-stride k: one transpose of 4-byte k pairs each
      if (rows == kTileRows && sxk == 1) {
        for (; k_begin + kTileDepth <= K; k_begin += kTileDepth)
          transpose_pairs(from + k_begin, sxm, to + (k_begin / kTileDepth) * kTileElements);
      }
      for (int64_t l = 0; l < rows; ++l)
        for (int64_t k = k_begin; k < K; ++k)
          to[(k / kTileDepth) * kTileElements + (k % kTileDepth) / 2 * kPairRow + l * 2 + k % 2] = from[l * sxm + k * sxk];
    }
  });
  // W is read in place when its rows are unit-stride and whole tiles; otherwise a zero-padded copy.
  std::vector<bf16> packed_w;
  if (swk != 1 || N % kTileRows != 0 || K % kTileDepth != 0) {
    packed_w.assign(static_cast<size_t>(n_blocks * kTileRows * k_padded), bf16(0.f));
    at::parallel_for(0, N, grain(K, at::internal::GRAIN_SIZE), [&](int64_t begin, int64_t end) {
      for (int64_t n = begin; n < end; ++n)
        for (int64_t k = 0; k < K; ++k) packed_w[n * k_padded + k] = W[n * swn + k * swk];
    });
    W = packed_w.data();
    swn = k_padded;
  }
  const int64_t n_pairs = (n_blocks + 1) / 2, m_pairs = (m_blocks + 1) / 2;
  // A work item is a pair of W blocks × kMPairsPerItem pairs of X blocks.
  const int64_t m_groups = (m_pairs + kMPairsPerItem - 1) / kMPairsPerItem, items = n_pairs * m_groups;
  const int64_t item_rows = std::min(M, 2 * kTileRows * kMPairsPerItem);
  const bool stream = M * N * static_cast<int64_t>(sizeof(bf16)) > kStreamBytes;
  at::parallel_for(0, items, grain(2 * kTileRows * item_rows * K), [&](int64_t begin, int64_t end) {
    // An item's sums, one 32 × 32 block per pair of X blocks: K is walked in blocks of kChunksPerBlock
    // chunks across all of them, so a block of W's 32 rows stays in L1 while every X pair uses it.
    alignas(64) float sums[kMPairsPerItem * 2 * kTileRows * kSumsStride];
    TileScope tiles;
    for (int64_t item = begin; item < end; ++item) {
      const int64_t nb0 = (item / m_groups) * 2, nb = std::min<int64_t>(2, n_blocks - nb0);
      const int64_t mp_begin = (item % m_groups) * kMPairsPerItem;
      const int64_t mp_end = std::min(m_pairs, mp_begin + kMPairsPerItem);
      const bf16* w = W + nb0 * kTileRows * swn;
      for (int64_t kc0 = 0; kc0 < std::max<int64_t>(k_chunks, 1); kc0 += kChunksPerBlock) {
        const int64_t kc1 = std::min(k_chunks, kc0 + kChunksPerBlock);
        for (int64_t mp = mp_begin; mp < mp_end; ++mp) {
          const int64_t mb = std::min<int64_t>(2, m_blocks - mp * 2);
          const bf16* x = packed_x.data() + mp * 2 * x_block;
          float* block = sums + (mp - mp_begin) * 2 * kTileRows * kSumsStride;
          if (nb == 2 && mb == 2) amx_block<2, 2>(w, swn, x, x_block, kc0, kc1, kc0 == 0, block);
          else if (nb == 2) amx_block<2, 1>(w, swn, x, x_block, kc0, kc1, kc0 == 0, block);
          else if (mb == 2) amx_block<1, 2>(w, swn, x, x_block, kc0, kc1, kc0 == 0, block);
          else amx_block<1, 1>(w, swn, x, x_block, kc0, kc1, kc0 == 0, block);
        }
      }
      for (int64_t mp = mp_begin; mp < mp_end; ++mp) {
        const int64_t mb0 = mp * 2, mb = std::min<int64_t>(2, m_blocks - mb0);
        store_tiles(sums + (mp - mp_begin) * 2 * kTileRows * kSumsStride, mb0 * kTileRows,
                    std::min(M, (mb0 + mb) * kTileRows), nb0 * kTileRows, std::min(N, (nb0 + nb) * kTileRows), C,
                    ldc, alpha, beta, bias, bias_sm, bias_sn, stream);
      }
    }
    if (stream) _mm_sfence();  // the streamed lines are visible before the call returns
  });
}

// -1: not decided yet; then 0 or 1 for the rest of the process (bi_use_amx changes it, for A/B runs).
std::atomic<int> amx_in_use{-1};

bool amx_usable() {
  static const bool usable = cpu_has_amx_bf16() && at::cpu::init_amx();
  return usable;
}
#else
bool amx_usable() { return false; }
#endif

bool use_amx() {
#ifdef PPO_FAST_AMX
  int state = amx_in_use.load();
  if (state < 0) {
    const char* setting = std::getenv("PPO_FAST_AMX");
    state = amx_usable() && !(setting != nullptr && std::string(setting) == "0") ? 1 : 0;
    amx_in_use.store(state);
  }
  return state == 1;
#else
  return false;
#endif
}

// The GEMM of the mode: the AMX tiles for bfloat16 when `amx` (use_amx(), read once per aten call, so
// that the entries of one bmm take one path even while another thread switches it), the vector
// kernel otherwise.
template <typename T, typename A = typename Acc<T>::type>
void gemm(bool amx, const T* X, int64_t sxm, int64_t sxk, const T* W, int64_t swn, int64_t swk, T* C, int64_t ldc,
          int64_t M, int64_t N, int64_t K, A alpha, A beta, const T* bias, int64_t bias_sm, int64_t bias_sn) {
#ifdef PPO_FAST_AMX
  if constexpr (std::is_same_v<T, bf16>) {
    if (amx) {
      return gemm_amx(X, sxm, sxk, W, swn, swk, C, ldc, M, N, K, alpha, beta, bias, bias_sm, bias_sn);
    }
  }
#endif
  gemm_nt<T>(X, sxm, sxk, W, swn, swk, C, ldc, M, N, K, alpha, beta, bias, bias_sm, bias_sn);
}

// Whether bfloat16 GEMMs run on the AMX tiles in this process; with a value, switches them (for
// measuring one path against the other; a row's bits differ between the two paths).
bool bi_amx(c10::optional<bool> enable) {
  if (enable.has_value()) {
    TORCH_CHECK(!*enable || amx_usable(), "batch_invariant: this CPU or kernel offers no AMX-BF16 tiles");
#ifdef PPO_FAST_AMX
    amx_in_use.store(*enable ? 1 : 0);
#endif
  }
  return use_amx();
}

void check_float(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "batch_invariant: ", name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), "batch_invariant: ", name,
              " must be float32, bfloat16, float16 or float64, got ", t.scalar_type());
}

// mm / addmm: out = beta·bias + alpha·(a @ b); bias undefined for mm. a [M, K] and b [K, N] are read
// with their own strides (b as Bᵀ [N, K]: W[n, k] = b[k, n]).
at::Tensor bi_addmm(const c10::optional<at::Tensor>& bias_opt, const at::Tensor& a, const at::Tensor& b,
                    double beta, double alpha) {
  check_float(a, "the first matrix");
  TORCH_CHECK(a.dim() == 2 && b.dim() == 2 && a.size(1) == b.size(0), "batch_invariant mm: shapes ",
              a.sizes(), " and ", b.sizes(), " cannot be multiplied");
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), "batch_invariant mm: dtypes differ (", a.scalar_type(), ", ",
              b.scalar_type(), ")");
  const int64_t M = a.size(0), K = a.size(1), N = b.size(1);
  at::Tensor out = at::empty({M, N}, a.options());
  at::Tensor bias;
  TORCH_CHECK(!(bias_opt.has_value() && bias_opt->defined()) || bias_opt->scalar_type() == a.scalar_type(),
              "addmm: expected the operands to have one dtype, got ", a.scalar_type(), " and ", b.scalar_type(),
              " (and ", bias_opt.has_value() && bias_opt->defined() ? bias_opt->scalar_type() : a.scalar_type(),
              " for self)");
  if (bias_opt.has_value() && bias_opt->defined() && beta != 0.0) {
    bias = bias_opt->expand({M, N});
  }
  if (M == 0 || N == 0) return out;
  const bool amx = use_amx();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, a.scalar_type(), "batch_invariant_mm", [&] {
    using A = typename Acc<scalar_t>::type;
    gemm<scalar_t>(amx, a.data_ptr<scalar_t>(), a.stride(0), a.stride(1), b.data_ptr<scalar_t>(), b.stride(1),
                      b.stride(0), out.data_ptr<scalar_t>(), N, M, N, K, static_cast<A>(alpha),
                      static_cast<A>(beta), bias.defined() ? bias.data_ptr<scalar_t>() : nullptr,
                      bias.defined() ? bias.stride(0) : 0, bias.defined() ? bias.stride(1) : 0);
  });
  return out;
}

at::Tensor bi_mm(const at::Tensor& a, const at::Tensor& b) { return bi_addmm(c10::nullopt, a, b, 0.0, 1.0); }

// bmm: one GEMM per batch entry, written in place. Entries run side by side when each is small (the
// GEMM inside a parallel region runs on its thread), one after another, each parallel, when large.
at::Tensor bi_bmm(const at::Tensor& a, const at::Tensor& b) {
  check_float(a, "the first batch of matrices");
  TORCH_CHECK(a.dim() == 3 && b.dim() == 3 && a.size(0) == b.size(0) && a.size(2) == b.size(1),
              "batch_invariant bmm: shapes ", a.sizes(), " and ", b.sizes(), " cannot be multiplied");
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), "batch_invariant bmm: dtypes differ (", a.scalar_type(), ", ",
              b.scalar_type(), ")");
  const int64_t batch = a.size(0), M = a.size(1), K = a.size(2), N = b.size(2);
  at::Tensor out = at::empty({batch, M, N}, a.options());
  if (out.numel() == 0) return out;
  const bool amx = use_amx();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, a.scalar_type(), "batch_invariant_bmm", [&] {
    using A = typename Acc<scalar_t>::type;
    const scalar_t* ap = a.data_ptr<scalar_t>();
    const scalar_t* bp = b.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    const bool side_by_side = M * N * K < kChunkWork * at::get_num_threads();
    at::parallel_for(0, batch, side_by_side ? grain(M * N * K) : batch, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i)
        gemm<scalar_t>(amx, ap + i * a.stride(0), a.stride(1), a.stride(2), bp + i * b.stride(0), b.stride(2),
                          b.stride(1), op + i * M * N, N, M, N, K, A(1), A(0), nullptr, 0, 0);
    });
  });
  return out;
}

// Row sums over the last dimension of a [rows, L] view, one thread a row, the order of the header.
template <typename T>
void row_sums(const T* x, int64_t rows, int64_t L, float* out) {
  at::parallel_for(0, rows, grain(L, at::internal::GRAIN_SIZE), [&](int64_t begin, int64_t end) {
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
  at::parallel_for(0, rows, grain(L, at::internal::GRAIN_SIZE), [&](int64_t begin, int64_t end) {
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
  // A query's work: a dot product and an FMA row per key.
  at::parallel_for(0, B * H * Tq, grain(2 * S * D), [&](int64_t begin, int64_t end) {
    std::vector<float> scores(S), acc(D), query(D);
    std::vector<int64_t> keys(S);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / (H * Tq), h = (item / Tq) % H, t = item % Tq, hk = h / group;
      const T* qrow = qp + b * q.stride(0) + h * q.stride(1) + t * q.stride(2);
      for (int64_t d = 0; d < D; ++d) query[d] = widen<float>(qrow[d]);
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
        // One fma, written out: a compiler's choice to contract a·b + c must not decide the bits.
        const float s = std::fma(dot<float>(query.data(), kbase + j * k.stride(2), D), scale, extra);
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
        // acc[d] = fma(p, v[d], acc[d]) for every d, a vector of d at a time: each lane one fma.
        constexpr int lanes = Vectorized<float>::size();
        const int64_t body = D - D % lanes;
        const Vectorized<float> weight(p);
        for (int64_t d = 0; d < body; d += lanes)
          at::vec::fmadd(weight, load<float>(vrow + d), Vectorized<float>::loadu(acc.data() + d)).store(acc.data() + d);
        for (int64_t d = body; d < D; ++d) acc[d] = std::fma(p, widen<float>(vrow[d]), acc[d]);
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
  // The kernel reads a head_dim row as one stream (a copy only when head_dim is not its unit stride).
  auto rows_unit = [](const at::Tensor& t) { return t.stride(-1) == 1 ? t : t.contiguous(); };
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
  m.def("bi_amx", &bi_amx, pybind11::arg("enable") = pybind11::none());
  m.def("bi_amx_usable", &amx_usable);
}
