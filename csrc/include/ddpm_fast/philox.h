// Philox4x32-10 counter-based random numbers and their mapping to standard normals.
//
// The contract every backend follows (ddpm_fast/reference.py is its oracle): for a 64-bit
// seed and the element at linear storage index i,
//   key     = (lo32(seed), hi32(seed))
//   counter = (lo32(i >> 2), hi32(i >> 2), 0, 0)
//   r0..r3  = philox4x32_10(counter, key)
//   u_j     = ((r_j >> 8) + 0.5) * 2^-24          in (0, 1), exact in float32
//   (n0, n1) = box_muller(u0, u1), (n2, n3) = box_muller(u2, u3)
//   element i takes n_(i & 3)
// so one Philox call feeds four consecutive elements. Torch-free; shared by the CPU loops and
// the CUDA kernels.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define DDPM_FAST_HD __host__ __device__ __forceinline__
#else
#define DDPM_FAST_HD inline
#endif

namespace ddpm_fast {

constexpr uint32_t kPhiloxM0 = 0xD2511F53u;
constexpr uint32_t kPhiloxM1 = 0xCD9E8D57u;
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u;
constexpr uint32_t kPhiloxW1 = 0xBB67AE85u;
constexpr int kPhiloxRounds = 10;
constexpr float kTwoPi = 6.28318530717958647692f;
constexpr float kTwoPow24Inv = 5.9604644775390625e-08f;  // 2^-24

DDPM_FAST_HD uint32_t mulhi32(uint32_t a, uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __umulhi(a, b);
#else
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
#endif
}

// One Philox round on the counter (c0, c1, c2, c3) with key (k0, k1).
DDPM_FAST_HD void philox_round(uint32_t& c0, uint32_t& c1, uint32_t& c2, uint32_t& c3,
                               uint32_t k0, uint32_t k1) {
  const uint32_t hi0 = mulhi32(kPhiloxM0, c0), lo0 = kPhiloxM0 * c0;
  const uint32_t hi1 = mulhi32(kPhiloxM1, c2), lo1 = kPhiloxM1 * c2;
  const uint32_t n0 = hi1 ^ c1 ^ k0, n2 = hi0 ^ c3 ^ k1;
  c0 = n0;
  c1 = lo1;
  c2 = n2;
  c3 = lo0;
}

// The key of round `round` (0-based): bumped by the Weyl constants before every round but the first.
DDPM_FAST_HD uint32_t philox_round_key0(uint32_t k0, int round) { return k0 + static_cast<uint32_t>(round) * kPhiloxW0; }
DDPM_FAST_HD uint32_t philox_round_key1(uint32_t k1, int round) { return k1 + static_cast<uint32_t>(round) * kPhiloxW1; }

// Philox4x32-10 in place.
DDPM_FAST_HD void philox4x32_10(uint32_t& c0, uint32_t& c1, uint32_t& c2, uint32_t& c3,
                                uint32_t k0, uint32_t k1) {
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int round = 0; round < kPhiloxRounds; ++round) {
    philox_round(c0, c1, c2, c3, philox_round_key0(k0, round), philox_round_key1(k1, round));
  }
}

// The uniform in (0, 1) that a 32-bit draw maps to (24 random bits, never 0 or 1).
DDPM_FAST_HD float uint_to_uniform(uint32_t r) {
  return (static_cast<float>(r >> 8) + 0.5f) * kTwoPow24Inv;
}

// Scalar math for box_muller; the CPU kernels pass a vector version of the same functions.
struct ScalarMath {
  static DDPM_FAST_HD float log(float x) { return logf(x); }
  static DDPM_FAST_HD float sqrt(float x) { return sqrtf(x); }
  static DDPM_FAST_HD void sincos(float x, float& s, float& c) {
#if defined(__CUDA_ARCH__)
    sincosf(x, &s, &c);
#else
    s = sinf(x);
    c = cosf(x);
#endif
  }
};

// Box-Muller: two uniforms (u_a, u_b) to two independent standard normals (n0, n1).
template <typename Math = ScalarMath, typename F>
DDPM_FAST_HD void box_muller(F u_a, F u_b, F& n0, F& n1) {
  const F radius = Math::sqrt(F(-2.0f) * Math::log(u_a));
  F s, c;
  Math::sincos(F(kTwoPi) * u_b, s, c);
  n0 = radius * c;
  n1 = radius * s;
}

// The four normals of counter group g (elements 4g .. 4g+3) for the given seed.
DDPM_FAST_HD void philox_normal4(uint64_t seed, uint64_t g, float n[4]) {
  uint32_t c0 = static_cast<uint32_t>(g), c1 = static_cast<uint32_t>(g >> 32), c2 = 0, c3 = 0;
  philox4x32_10(c0, c1, c2, c3, static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
  box_muller(uint_to_uniform(c0), uint_to_uniform(c1), n[0], n[1]);
  box_muller(uint_to_uniform(c2), uint_to_uniform(c3), n[2], n[3]);
}

}  // namespace ddpm_fast
