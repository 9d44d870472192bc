// CPU kernels of q_sample and the reverse / DDIM step (declared in diffusion_steps_kernels.h).
//
// The storage is cut into blocks of kBlock elements (a multiple of 4, so every block starts at
// a Philox counter group) that at::parallel_for spreads over threads. Per block: draw or load
// the noise, convert reduced-precision inputs to float32 buffers, then run the shared per-element
// formula (diffusion_steps.h) in `omp simd` loops over each batch element's part of the block.
// In-kernel noise is the cost that matters on the CPU: Philox runs as a plain vectorisable loop
// over counters and Box-Muller on ATen's Vectorized<float> (SLEEF log/sin/cos).
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <type_traits>

#include "ddpm_fast/diffusion_steps.h"
#include "ddpm_fast/diffusion_steps_kernels.h"
#include "ddpm_fast/philox.h"

namespace ddpm_fast {
namespace {

using Vec = at::vec::Vectorized<float>;

constexpr int64_t kBlock = 1024;        // elements per work item (fits L1 with its buffers)
constexpr int64_t kGrainBlocks = 32;    // at least 32k elements per thread before splitting
static_assert(kBlock % (4 * 16) == 0, "a block must hold whole Philox groups and whole vectors");

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

template <bool kClip>
void step_segment(const StepCoefficients& c, const float* x, const float* m, const float* z,
                  float* out, int64_t begin, int64_t end) {
  if (z != nullptr) {
#pragma omp simd
    for (int64_t k = begin; k < end; ++k) out[k] = step_value(c, kClip, x[k], m[k], z[k]);
  } else {
#pragma omp simd
    for (int64_t k = begin; k < end; ++k) out[k] = step_value(c, kClip, x[k], m[k], 0.0f);
  }
}

template <typename scalar_t>
void step_kernel(const StepArgs& a) {
  const auto* x = static_cast<const scalar_t*>(a.x_t);
  const auto* m = static_cast<const scalar_t*>(a.model_output);
  const auto* noise = static_cast<const scalar_t*>(a.noise);
  auto* out = static_cast<scalar_t*>(a.out);
  const uint64_t seed = a.seed != nullptr ? static_cast<uint64_t>(*a.seed) : 0;
  const int64_t blocks = (a.numel + kBlock - 1) / kBlock;
  at::parallel_for(0, blocks, kGrainBlocks, [&](int64_t first, int64_t last) {
    alignas(64) float x_buf[kBlock], m_buf[kBlock], z_buf[kBlock], out_buf[kBlock];
    for (int64_t block = first; block < last; ++block) {
      const int64_t start = block * kBlock, n = std::min(kBlock, a.numel - start);
      const float* z = nullptr;
      if (a.seed != nullptr) {
        philox_normals(seed, start, n, z_buf);
        round_to_dtype<scalar_t>(z_buf, n);
        z = z_buf;
      } else if (noise != nullptr) {
        z = as_float(noise + start, n, z_buf);
      }
      const float* xs = as_float(x + start, n, x_buf);
      const float* ms = as_float(m + start, n, m_buf);
      float* os = float_target(out + start, out_buf);
      for_each_batch_segment(start, n, a.per_batch, [&](int64_t begin, int64_t end, int64_t b) {
        const StepCoefficients c = step_coefficients(a.table + a.t[b] * kStepColumns);
        if (a.clip_denoised) {
          step_segment<true>(c, xs, ms, z, os, begin, end);
        } else {
          step_segment<false>(c, xs, ms, z, os, begin, end);
        }
      });
      store_from(os, n, out + start);
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

void step_cpu(const StepArgs& args) {
  if (args.numel > 0) dispatch<StepKernel>(args);
}

void q_sample_cpu(const QSampleArgs& args) {
  if (args.numel > 0) dispatch<QSampleKernel>(args);
}

}  // namespace ddpm_fast
