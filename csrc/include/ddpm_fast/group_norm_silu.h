// Fused GroupNorm + SiLU: the per-element math shared by the CPU loops and the CUDA kernels,
// and the torch-free declarations of the CUDA launchers.
//
//   y = silu(z),  z = gamma_c * xhat + beta_c,  xhat = (x - mean_g) * rstd_g,
//   rstd_g = 1 / sqrt(var_g + eps)  (biased variance over the C/G channels x spatial of group g)
//
// which the kernels evaluate as z = x * scale_c + shift_c with
//   scale_c = gamma_c * rstd_g,  shift_c = beta_c - mean_g * scale_c.
//
// Backward, with g = dy * silu'(z) the gradient at z and D the number of elements in a group:
//   dbeta_c  = sum g,           dgamma_c = sum g * xhat          (over batch and spatial)
//   dx       = rstd_g * (gamma_c * g - c1_g - xhat * c2_g)
//   c1_g     = sum_{c in g} gamma_c * sum g / D,   c2_g = sum_{c in g} gamma_c * sum g * xhat / D
// (the usual normalisation backward: dxhat minus its mean and its projection on xhat).
#pragma once

#include <cmath>
#include <cstdint>

// A CPU file defines DDPM_GNS_WITH_ATEN_VEC to get the Vectorized<float> overloads too.
#if defined(DDPM_GNS_WITH_ATEN_VEC) && !defined(__CUDACC__)
#include <ATen/cpu/vec/vec.h>
#endif

#if defined(__CUDACC__)
#define DDPM_GNS_HD __host__ __device__ __forceinline__
#else
#define DDPM_GNS_HD inline
#endif

namespace ddpm_fast {
namespace gns {

// The formulas are templates so that the CPU kernels evaluate the very same expressions on
// at::vec::Vectorized<float> (8 lanes); exp_of is the one primitive that differs per type.
DDPM_GNS_HD float exp_of(float v) { return expf(v); }

#if defined(DDPM_GNS_WITH_ATEN_VEC) && !defined(__CUDACC__)
// ATen's inlined polynomial exp (documented at most 20 ULP): several times cheaper than the
// SLEEF call behind exp(), which would otherwise dominate the fused kernels' cost.
inline at::vec::Vectorized<float> exp_of(const at::vec::Vectorized<float>& v) { return v.exp_u20(); }
#endif

template <typename T>
DDPM_GNS_HD T sigmoid(T z) {
  return T(1.0f) / (T(1.0f) + exp_of(T(0.0f) - z));
}

// silu(z) = z * sigmoid(z), written with one division.
template <typename T>
DDPM_GNS_HD T silu(T z) {
  return z / (T(1.0f) + exp_of(T(0.0f) - z));
}

// d silu / dz = s * (1 + z * (1 - s)) with s = sigmoid(z).
template <typename T>
DDPM_GNS_HD T silu_grad(T z) {
  const T s = sigmoid(z);
  return s * (T(1.0f) + z * (T(1.0f) - s));
}

DDPM_GNS_HD float rstd_from_var(float var, float eps) {
  // A variance that rounding made slightly negative must not give NaN.
  return 1.0f / sqrtf((var > 0.0f ? var : 0.0f) + eps);
}

// Running statistics of a chunk: count, mean and M2 = sum (x - mean)^2.
struct Welford {
  float count;
  float mean;
  float m2;
};

DDPM_GNS_HD Welford welford_empty() { return Welford{0.0f, 0.0f, 0.0f}; }

DDPM_GNS_HD Welford welford_push(Welford a, float x) {
  a.count += 1.0f;
  const float delta = x - a.mean;
  a.mean += delta / a.count;
  a.m2 += delta * (x - a.mean);
  return a;
}

// Chan et al.'s pairwise combine: exact in exact arithmetic, stable in floating point.
DDPM_GNS_HD Welford welford_combine(Welford a, Welford b) {
  const float count = a.count + b.count;
  if (count == 0.0f) return a;
  const float delta = b.mean - a.mean;
  const float wb = b.count / count;
  return Welford{count, a.mean + delta * wb, a.m2 + b.m2 + delta * delta * a.count * wb};
}

// The gradient at x of one element (see the derivation at the top of this file).
template <typename T>
DDPM_GNS_HD T dx_from(T g_gamma, T xhat, T rstd, T c1, T c2) {
  return rstd * (g_gamma - c1 - xhat * c2);
}

}  // namespace gns

// CUDA launchers (csrc/cuda/group_norm_silu.cu), on the given stream. x, y, grad_y, grad_x are
// [N, C, S] (channels_last == false) or [N, S, C] (channels_last == true) dense, S the flattened
// spatial size; weight and bias are float32 [C] or null; mean and rstd float32 [N, G].
// dtype: 0 float32, 1 float16, 2 bfloat16. Return a cudaError_t as int (0 = success).
struct GnsShape {
  int64_t n, c, s, groups;
  bool channels_last;
  int dtype;
};

int gns_forward_cuda(const void* x, const float* weight, const float* bias, void* y, float* mean, float* rstd,
                     GnsShape shape, float eps, void* stream);

// workspace: 2 * N * C + 2 * N * G floats. grad_weight / grad_bias float32 [C] or null.
int gns_backward_cuda(const void* grad_y, const void* x, const float* weight, const float* bias,
                      const float* mean, const float* rstd, void* grad_x, float* grad_weight, float* grad_bias,
                      float* workspace, GnsShape shape, void* stream);

}  // namespace ddpm_fast
