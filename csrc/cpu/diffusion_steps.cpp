// CPU kernels of q_sample and the sampler step (declared in diffusion_steps_kernels.h).
//
// The storage is cut into blocks of kBlock elements (a multiple of 4, so every block starts at
// a Philox counter group) that at::parallel_for spreads over threads. Per block: draw or load
// the noise, convert reduced-precision inputs to float32 buffers, then run the shared per-element
// formula (diffusion_steps.h) in `omp simd` loops over each batch element's part of the block.
// In-kernel noise is the cost that matters on the CPU: on AVX2, Philox and Box-Muller run in
// registers with short log/sincos polynomials (see philox_normals); elsewhere Philox is a plain
// vectorisable loop over counters and Box-Muller uses ATen's Vectorized<float> (SLEEF).
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <array>
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif
#include <type_traits>
#include <utility>

#include "ddpm_fast/diffusion_steps.h"
#include "ddpm_fast/diffusion_steps_kernels.h"
#include "ddpm_fast/philox.h"

namespace ddpm_fast {
namespace {

using Vec = at::vec::Vectorized<float>;

constexpr int64_t kBlock = 1024;        // elements per work item (fits L1 with its buffers)
constexpr int64_t kGrainBlocks = 32;    // at least 32k elements per thread before splitting
static_assert(kBlock % (4 * 16) == 0, "a block must hold whole Philox batches and whole vectors");

#if defined(__AVX2__) && defined(__FMA__)

// In-kernel noise on AVX2: 16 Philox counter groups (64 normals) per step, kept in registers from
// the counters to the store. Philox bits are exact; log and sincos are short polynomials (Cephes
// coefficients; over every u the kernels draw: log within 1 ulp, sin and cos within 1.6 ulp or
// 1e-7 absolute near their zeros), several times cheaper than SLEEF's u10 functions, which were
// most of the cost of a step with noise.
namespace avx2 {

inline __m256 splat(float v) { return _mm256_set1_ps(v); }

// log(x) for positive normal x: x = m 2^e with m in [sqrt(1/2), sqrt(2)), log(m) by polynomial in
// f = m - 1 (exact), ln 2 split in two parts so that e ln 2 adds no rounding (Cephes logf).
inline __m256 log(__m256 x) {
  const __m256i bits = _mm256_castps_si256(x);
  __m256i e = _mm256_sub_epi32(_mm256_srli_epi32(bits, 23), _mm256_set1_epi32(126));
  __m256 m = _mm256_castsi256_ps(_mm256_or_si256(_mm256_and_si256(bits, _mm256_set1_epi32(0x007FFFFF)),
                                                 _mm256_set1_epi32(0x3F000000)));  // in [1/2, 1)
  const __m256 small = _mm256_cmp_ps(m, splat(0.707106781186547524f), _CMP_LT_OQ);
  const __m256 ef = _mm256_sub_ps(_mm256_cvtepi32_ps(e), _mm256_and_ps(small, splat(1.0f)));
  const __m256 f = _mm256_sub_ps(_mm256_add_ps(m, _mm256_and_ps(small, m)), splat(1.0f));  // m or 2m, minus 1
  const __m256 z = _mm256_mul_ps(f, f);
  __m256 y = splat(7.0376836292e-2f);
  y = _mm256_fmadd_ps(y, f, splat(-1.1514610310e-1f));
  y = _mm256_fmadd_ps(y, f, splat(1.1676998740e-1f));
  y = _mm256_fmadd_ps(y, f, splat(-1.2420140846e-1f));
  y = _mm256_fmadd_ps(y, f, splat(1.4249322787e-1f));
  y = _mm256_fmadd_ps(y, f, splat(-1.6668057665e-1f));
  y = _mm256_fmadd_ps(y, f, splat(2.0000714765e-1f));
  y = _mm256_fmadd_ps(y, f, splat(-2.4999993993e-1f));
  y = _mm256_fmadd_ps(y, f, splat(3.3333331174e-1f));
  y = _mm256_mul_ps(_mm256_mul_ps(y, f), z);
  y = _mm256_fmadd_ps(ef, splat(-2.12194440e-4f), y);
  y = _mm256_fmadd_ps(z, splat(-0.5f), y);
  return _mm256_fmadd_ps(ef, splat(0.693359375f), _mm256_add_ps(f, y));
}

// sin and cos of x in [0, 2 pi]: one reduction x = q pi/2 + r, |r| <= pi/4 (the first fma is exact
// for q <= 4), polynomials for sin r and cos r, then the quadrant picks, swaps and negates them.
inline void sincos(__m256 x, __m256& s_out, __m256& c_out) {
  const __m256i q = _mm256_cvtps_epi32(_mm256_mul_ps(x, splat(0.636619772367581343f)));  // nearest
  const __m256 qf = _mm256_cvtepi32_ps(q);
  __m256 r = _mm256_fnmadd_ps(qf, splat(1.57079637050628662f), x);
  r = _mm256_fnmadd_ps(qf, splat(-4.37113900018624283e-8f), r);
  const __m256 z = _mm256_mul_ps(r, r);
  __m256 s = _mm256_fmadd_ps(splat(-1.9515295891e-4f), z, splat(8.3321608736e-3f));
  s = _mm256_fmadd_ps(s, z, splat(-1.6666654611e-1f));
  s = _mm256_fmadd_ps(_mm256_mul_ps(s, z), r, r);
  __m256 c = _mm256_fmadd_ps(splat(2.443315711809948e-5f), z, splat(-1.388731625493765e-3f));
  c = _mm256_fmadd_ps(c, z, splat(4.166664568298827e-2f));
  c = _mm256_fmadd_ps(_mm256_mul_ps(c, z), z, _mm256_fnmadd_ps(splat(0.5f), z, splat(1.0f)));
  // Odd q swaps sin and cos; sin is negative for q & 2, cos for (q + 1) & 2.
  const __m256 swap = _mm256_castsi256_ps(_mm256_slli_epi32(q, 31));
  const __m256 sin_sign = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_and_si256(q, _mm256_set1_epi32(2)), 30));
  const __m256 cos_sign = _mm256_castsi256_ps(
      _mm256_slli_epi32(_mm256_and_si256(_mm256_add_epi32(q, _mm256_set1_epi32(1)), _mm256_set1_epi32(2)), 30));
  s_out = _mm256_xor_ps(_mm256_blendv_ps(s, c, swap), sin_sign);
  c_out = _mm256_xor_ps(_mm256_blendv_ps(c, s, swap), cos_sign);
}

// The Math of philox.h's box_muller, on 8 floats at a time.
struct Math {
  static Vec log(Vec x) { return avx2::log(x); }
  static Vec sqrt(Vec x) { return _mm256_sqrt_ps(x); }
  static void sincos(Vec x, Vec& s, Vec& c) {
    __m256 sv, cv;
    avx2::sincos(x, sv, cv);
    s = sv;
    c = cv;
  }
};

// philox4x32_10 of philox.h on counter groups g .. g + 8 kBatches - 1: r[b][w] is word w of
// groups g + 8b .. g + 8b + 7 (lane l: group g + 8b + l). Each word lives in the low halves of
// 64-bit lanes, even groups in one register and odd groups in another, so one _mm256_mul_epu32
// gives both mulhi and the low product; the high halves carry garbage that the multiplies ignore
// and the final blend drops. Two batches at once give the 5-cycle multiplies independent work.
template <int kBatches>
inline void philox8(uint64_t g, uint32_t k0, uint32_t k1, __m256i r[][4]) {
  constexpr int kRegs = 2 * kBatches;  // register h: batch h / 2, even (h % 2 == 0) or odd groups
  const __m256i m0 = _mm256_set1_epi32(static_cast<int>(kPhiloxM0));
  const __m256i m1 = _mm256_set1_epi32(static_cast<int>(kPhiloxM1));
  __m256i c0[kRegs], c1[kRegs], c2[kRegs], c3[kRegs];
  for (int h = 0; h < kRegs; ++h) {
    const int64_t o = 8 * (h / 2) + h % 2;
    c0[h] = _mm256_add_epi64(_mm256_set1_epi64x(static_cast<int64_t>(g)), _mm256_setr_epi64x(o, o + 2, o + 4, o + 6));
    c1[h] = _mm256_srli_epi64(c0[h], 32);
    c2[h] = _mm256_setzero_si256();
    c3[h] = _mm256_setzero_si256();
  }
  for (int round = 0; round < kPhiloxRounds; ++round) {
    const __m256i rk0 = _mm256_set1_epi32(static_cast<int>(philox_round_key0(k0, round)));
    const __m256i rk1 = _mm256_set1_epi32(static_cast<int>(philox_round_key1(k1, round)));
    for (int h = 0; h < kRegs; ++h) {
      const __m256i p0 = _mm256_mul_epu32(c0[h], m0), p1 = _mm256_mul_epu32(c2[h], m1);
      // The key xor first: it does not wait for the multiply.
      c0[h] = _mm256_xor_si256(_mm256_srli_epi64(p1, 32), _mm256_xor_si256(c1[h], rk0));
      c2[h] = _mm256_xor_si256(_mm256_srli_epi64(p0, 32), _mm256_xor_si256(c3[h], rk1));
      c1[h] = p1;
      c3[h] = p0;
    }
  }
  for (int b = 0; b < kBatches; ++b) {
    const __m256i* words[4] = {c0 + 2 * b, c1 + 2 * b, c2 + 2 * b, c3 + 2 * b};
    for (int w = 0; w < 4; ++w) {
      r[b][w] = _mm256_blend_epi32(words[w][0], _mm256_slli_epi64(words[w][1], 32), 0xAA);
    }
  }
}

// uint_to_uniform of philox.h: one fma rounds (r >> 8) 2^-24 + 2^-25 once, as (f + 0.5) 2^-24 does.
inline Vec uniform(__m256i r) {
  return _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(r, 8)), splat(kTwoPow24Inv), splat(0.5f * kTwoPow24Inv));
}

// The 32 normals of the 8 groups whose Philox words are r, in storage order, at out (aligned).
inline void store_normals(const __m256i r[4], float* out) {
  Vec n0, n1, n2, n3;
  box_muller<Math>(uniform(r[0]), uniform(r[1]), n0, n1);
  box_muller<Math>(uniform(r[2]), uniform(r[3]), n2, n3);
  // Transpose (lane l of n0..n3 is group l) to n0 n1 n2 n3 of group 0, of group 1, ...
  const __m256 a = _mm256_unpacklo_ps(n0, n1), b = _mm256_unpackhi_ps(n0, n1);  // groups 0 1 | 4 5, 2 3 | 6 7
  const __m256 c = _mm256_unpacklo_ps(n2, n3), d = _mm256_unpackhi_ps(n2, n3);
  const __m256 g04 = _mm256_shuffle_ps(a, c, 0x44), g15 = _mm256_shuffle_ps(a, c, 0xEE);
  const __m256 g26 = _mm256_shuffle_ps(b, d, 0x44), g37 = _mm256_shuffle_ps(b, d, 0xEE);
  _mm256_store_ps(out, _mm256_permute2f128_ps(g04, g15, 0x20));
  _mm256_store_ps(out + 8, _mm256_permute2f128_ps(g26, g37, 0x20));
  _mm256_store_ps(out + 16, _mm256_permute2f128_ps(g04, g15, 0x31));
  _mm256_store_ps(out + 24, _mm256_permute2f128_ps(g26, g37, 0x31));
}

}  // namespace avx2

// z[0 .. n) = the normals of storage elements start .. start + n (start % 4 == 0, n <= kBlock).
// May write up to kBlock values: the last partial 16 groups are computed in full.
void philox_normals(uint64_t seed, int64_t start, int64_t n, float* z) {
  constexpr int kBatches = 2;
  const uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  const uint64_t first = static_cast<uint64_t>(start) >> 2;
  for (int64_t j = 0; 4 * j < n; j += 8 * kBatches) {
    __m256i r[kBatches][4];
    avx2::philox8<kBatches>(first + static_cast<uint64_t>(j), k0, k1, r);
    for (int b = 0; b < kBatches; ++b) avx2::store_normals(r[b], z + 4 * (j + 8 * b));
  }
}

#else  // portable: Philox as a vectorisable loop, Box-Muller on ATen's Vectorized<float> (SLEEF)

// The Math of philox.h's box_muller, on 8 floats at a time.
struct VecMath {
  static Vec log(Vec x) { return x.log(); }
  static Vec sqrt(Vec x) { return x.sqrt(); }
  static void sincos(Vec x, Vec& s, Vec& c) {
    s = x.sin();
    c = x.cos();
  }
};

// z[0 .. n) = the normals of storage elements start .. start + n (start % 4 == 0, n <= kBlock).
// May write up to kBlock values: the last partial group and vector are computed in full.
void philox_normals(uint64_t seed, int64_t start, int64_t n, float* z) {
  constexpr int64_t kLanes = 16;  // counters per Philox batch: each round is one simd loop over them
  const int64_t groups = (n + 3) / 4;
  const int64_t padded = (groups + kLanes - 1) / kLanes * kLanes;
  const uint64_t first = static_cast<uint64_t>(start) >> 2;
  const uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  // Pair k = 2j + h of group j is (u_{2h}, u_{2h+1}); its two normals are elements 4j+2h, 4j+2h+1.
  alignas(64) float u_a[kBlock / 2];
  alignas(64) float u_b[kBlock / 2];
  for (int64_t j0 = 0; j0 < padded; j0 += kLanes) {
    alignas(64) uint32_t c0[kLanes], c1[kLanes], c2[kLanes], c3[kLanes];
#pragma omp simd
    for (int64_t l = 0; l < kLanes; ++l) {
      const uint64_t g = first + static_cast<uint64_t>(j0 + l);
      c0[l] = static_cast<uint32_t>(g);
      c1[l] = static_cast<uint32_t>(g >> 32);
      c2[l] = 0;
      c3[l] = 0;
    }
    // philox4x32_10 of philox.h, round by round over the lanes (vectorises better than per lane).
    for (int round = 0; round < kPhiloxRounds; ++round) {
      const uint32_t round_k0 = philox_round_key0(k0, round), round_k1 = philox_round_key1(k1, round);
#pragma omp simd
      for (int64_t l = 0; l < kLanes; ++l) philox_round(c0[l], c1[l], c2[l], c3[l], round_k0, round_k1);
    }
#pragma omp simd
    for (int64_t l = 0; l < kLanes; ++l) {
      const int64_t j = j0 + l;
      u_a[2 * j] = uint_to_uniform(c0[l]);
      u_b[2 * j] = uint_to_uniform(c1[l]);
      u_a[2 * j + 1] = uint_to_uniform(c2[l]);
      u_b[2 * j + 1] = uint_to_uniform(c3[l]);
    }
  }
  for (int64_t k = 0; k < 2 * padded; k += Vec::size()) {
    Vec n0, n1;
    box_muller<VecMath>(Vec::loadu(u_a + k), Vec::loadu(u_b + k), n0, n1);
    const auto pairs = at::vec::interleave2(n0, n1);  // (n0[0], n1[0], n0[1], n1[1], ...)
    pairs.first.store(z + 2 * k);
    pairs.second.store(z + 2 * k + Vec::size());
  }
}

#endif

// dtype <-> float32, round to nearest even (the portable bit conversion, independent of the
// instruction set the file is compiled for).
inline float to_float(float v) { return v; }
inline float to_float(c10::BFloat16 v) { return static_cast<float>(v); }
inline float to_float(c10::Half v) { return c10::detail::fp16_ieee_to_fp32_value(v.x); }

template <typename scalar_t>
scalar_t from_float(float v) {
  if constexpr (std::is_same_v<scalar_t, c10::Half>) {
    return c10::Half(c10::detail::fp16_ieee_from_fp32_value(v), c10::Half::from_bits());
  } else {
    return static_cast<scalar_t>(v);
  }
}

// Float32 view of n elements: the data itself for float, else a converted copy in buf.
template <typename scalar_t>
const float* as_float(const scalar_t* data, int64_t n, float* buf) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    return data;
  } else {
    for (int64_t k = 0; k < n; ++k) buf[k] = to_float(data[k]);
    return buf;
  }
}

// Where to compute n output values: the output itself for float, else buf (then store_from).
template <typename scalar_t>
float* float_target(scalar_t* data, float* buf) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    return data;
  } else {
    return buf;
  }
}

// data[0 .. n) = buf[0 .. n) in data's dtype (nothing to do when buf already is data).
template <typename scalar_t>
void store_from(const float* buf, int64_t n, scalar_t* data) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    if (buf != data) std::copy(buf, buf + n, data);
  } else {
    for (int64_t k = 0; k < n; ++k) data[k] = from_float<scalar_t>(buf[k]);
  }
}

// Drawn noise rounded to the tensor's dtype: the value returned is the value used.
template <typename scalar_t>
void round_to_dtype(float* z, int64_t n) {
  if constexpr (!std::is_same_v<scalar_t, float>) {
    for (int64_t k = 0; k < n; ++k) z[k] = to_float(from_float<scalar_t>(z[k]));
  }
}

// Calls f(begin, end, b) for each batch element b's part [begin, end) of block [start, start + n).
template <typename F>
void for_each_batch_segment(int64_t start, int64_t n, int64_t per_batch, const F& f) {
  for (int64_t i = 0; i < n;) {
    const int64_t b = (start + i) / per_batch;
    const int64_t end = std::min(n, (b + 1) * per_batch - start);
    f(i, end, b);
    i = end;
  }
}

// Float32 views of one block's tensors (nullptr: absent); m_u is the unconditional half.
struct StepBlock {
  const float *x, *m_c, *m_u, *h1, *h2, *z;
  float *out, *x0;
};

// Flag bits of the step_segment specialisations: what the call has besides x and model_output.
enum : int { kGuided = 1, kClip = 2, kH1 = 4, kH2 = 8, kZ = 16, kStoreX0 = 32, kStepVariants = 64 };

// out[k] (and x0[k] with kStoreX0) for k in [begin, end): absent terms are neither read nor
// computed, so each variant is one plain vectorised loop.
template <int kFlags>
void step_segment(const StepCoefficients& c, const StepBlock& p, int64_t begin, int64_t end) {
  constexpr StepTerms terms{(kFlags & kGuided) != 0, (kFlags & kClip) != 0, (kFlags & kH1) != 0,
                            (kFlags & kH2) != 0, (kFlags & kZ) != 0};
  const float *x = p.x, *m_c = p.m_c, *m_u = p.m_u, *h1 = p.h1, *h2 = p.h2, *z = p.z;
  float *out = p.out, *x0 = p.x0;
#pragma omp simd
  for (int64_t k = begin; k < end; ++k) {
    const StepValues v = step_values(c, terms, x[k], m_c[k], terms.guided ? m_u[k] : 0.0f, terms.h1 ? h1[k] : 0.0f,
                                     terms.h2 ? h2[k] : 0.0f, terms.z ? z[k] : 0.0f);
    out[k] = v.out;
    if constexpr ((kFlags & kStoreX0) != 0) x0[k] = v.x0;
  }
}

using StepSegment = void (*)(const StepCoefficients&, const StepBlock&, int64_t, int64_t);

template <int... kFlags>
constexpr std::array<StepSegment, sizeof...(kFlags)> step_segments(std::integer_sequence<int, kFlags...>) {
  return {&step_segment<kFlags>...};
}
constexpr auto kStepSegments = step_segments(std::make_integer_sequence<int, kStepVariants>());

template <typename scalar_t>
void step_kernel(const StepArgs& a) {
  const auto* x = static_cast<const scalar_t*>(a.x);
  const auto* m = static_cast<const scalar_t*>(a.model_output);
  const auto* h1 = static_cast<const scalar_t*>(a.h1);
  const auto* h2 = static_cast<const scalar_t*>(a.h2);
  const auto* noise = static_cast<const scalar_t*>(a.noise);
  auto* out = static_cast<scalar_t*>(a.out);
  auto* x0 = static_cast<scalar_t*>(a.x0_out);
  const StepSegment segment = kStepSegments[(a.guided ? kGuided : 0) | (a.clip_denoised ? kClip : 0) |
                                            (h1 ? kH1 : 0) | (h2 ? kH2 : 0) | (a.seed || noise ? kZ : 0) |
                                            (x0 ? kStoreX0 : 0)];
  const uint64_t seed = a.seed != nullptr ? static_cast<uint64_t>(*a.seed) : 0;
  const int64_t blocks = (a.numel + kBlock - 1) / kBlock;
  at::parallel_for(0, blocks, kGrainBlocks, [&](int64_t first, int64_t last) {
    alignas(64) float x_buf[kBlock], mc_buf[kBlock], mu_buf[kBlock], h1_buf[kBlock], h2_buf[kBlock], z_buf[kBlock],
        out_buf[kBlock], x0_buf[kBlock];
    for (int64_t block = first; block < last; ++block) {
      const int64_t start = block * kBlock, n = std::min(kBlock, a.numel - start);
      StepBlock p{};
      if (a.seed != nullptr) {
        philox_normals(seed, start, n, z_buf);
        round_to_dtype<scalar_t>(z_buf, n);
        p.z = z_buf;
      } else if (noise != nullptr) {
        p.z = as_float(noise + start, n, z_buf);
      }
      p.x = as_float(x + start, n, x_buf);
      p.m_c = as_float(m + start, n, mc_buf);
      if (a.guided) p.m_u = as_float(m + a.numel + start, n, mu_buf);
      if (h1 != nullptr) p.h1 = as_float(h1 + start, n, h1_buf);
      if (h2 != nullptr) p.h2 = as_float(h2 + start, n, h2_buf);
      p.out = float_target(out + start, out_buf);
      if (x0 != nullptr) p.x0 = float_target(x0 + start, x0_buf);
      for_each_batch_segment(start, n, a.per_batch, [&](int64_t begin, int64_t end, int64_t b) {
        segment(step_coefficients(a.table + a.index[b] * kStepColumns), p, begin, end);
      });
      store_from(p.out, n, out + start);
      if (x0 != nullptr) store_from(p.x0, n, x0 + start);
    }
  });
}

template <typename scalar_t>
void q_sample_kernel(const QSampleArgs& a) {
  const auto* x = static_cast<const scalar_t*>(a.x_start);
  const auto* noise = static_cast<const scalar_t*>(a.noise);
  auto* out = static_cast<scalar_t*>(a.out);
  auto* drawn = static_cast<scalar_t*>(a.drawn_noise);
  const uint64_t seed = a.seed != nullptr ? static_cast<uint64_t>(*a.seed) : 0;
  const int64_t blocks = (a.numel + kBlock - 1) / kBlock;
  at::parallel_for(0, blocks, kGrainBlocks, [&](int64_t first, int64_t last) {
    alignas(64) float x_buf[kBlock], z_buf[kBlock], out_buf[kBlock];
    for (int64_t block = first; block < last; ++block) {
      const int64_t start = block * kBlock, n = std::min(kBlock, a.numel - start);
      const float* z;
      if (a.seed != nullptr) {
        philox_normals(seed, start, n, z_buf);
        round_to_dtype<scalar_t>(z_buf, n);
        store_from(z_buf, n, drawn + start);
        z = z_buf;
      } else {
        z = as_float(noise + start, n, z_buf);
      }
      const float* xs = as_float(x + start, n, x_buf);
      float* os = float_target(out + start, out_buf);
      for_each_batch_segment(start, n, a.per_batch, [&](int64_t begin, int64_t end, int64_t b) {
        const float* row = a.table + a.t[b] * kQSampleColumns;
        const float sqrt_abar = row[kSqrtAlphasCumprod], sqrt_one_minus = row[kSqrtOneMinusAlphasCumprod];
#pragma omp simd
        for (int64_t k = begin; k < end; ++k) os[k] = q_sample_value(sqrt_abar, sqrt_one_minus, xs[k], z[k]);
      });
      store_from(os, n, out + start);
    }
  });
}

template <template <typename> class Kernel, typename Args>
void dispatch(const Args& args) {
  switch (args.dtype) {
    case DType::Float32: return Kernel<float>::run(args);
    case DType::Float16: return Kernel<c10::Half>::run(args);
    case DType::BFloat16: return Kernel<c10::BFloat16>::run(args);
  }
}

template <typename scalar_t>
struct StepKernel {
  static void run(const StepArgs& a) { step_kernel<scalar_t>(a); }
};

template <typename scalar_t>
struct QSampleKernel {
  static void run(const QSampleArgs& a) { q_sample_kernel<scalar_t>(a); }
};

}  // namespace

void sampler_step_cpu(const StepArgs& args) {
  if (args.numel > 0) dispatch<StepKernel>(args);
}

void q_sample_cpu(const QSampleArgs& args) {
  if (args.numel > 0) dispatch<QSampleKernel>(args);
}

}  // namespace ddpm_fast
