// Per-element arithmetic of q_sample and of the sampler step, in float32.
//
// The coefficient tables and their meaning are documented in ddpm_fast/reference.py; a row
// table[index[b]] holds the coefficients of batch element b. Torch-free; shared by the CPU loops
// and the CUDA kernels so that the formulas exist once.
#pragma once

#include "ddpm_fast/philox.h"

namespace ddpm_fast {

// Columns of the q_sample table [T, 2] and of the sampler-step table [R, 8].
constexpr int kQSampleColumns = 2;
constexpr int kSqrtAlphasCumprod = 0, kSqrtOneMinusAlphasCumprod = 1;
constexpr int kStepColumns = 8;
constexpr int kX0FromX = 0, kX0FromModel = 1, kGuidanceScale = 2, kOutFromX = 3, kOutFromX0 = 4, kOutFromH1 = 5,
              kOutFromH2 = 6, kOutFromZ = 7;

// x_t = sqrt(abar_t) * x_start + sqrt(1 - abar_t) * eps
DDPM_FAST_HD float q_sample_value(float sqrt_abar, float sqrt_one_minus_abar, float x_start, float eps) {
  return sqrt_abar * x_start + sqrt_one_minus_abar * eps;
}

// One row of the step table, read once per batch element (unused columns are never loaded).
struct StepCoefficients {
  float x0_from_x, x0_from_model, guidance_scale, out_from_x, out_from_x0, out_from_h1, out_from_h2, out_from_z;
};

DDPM_FAST_HD StepCoefficients step_coefficients(const float* row) {
  return {row[kX0FromX],   row[kX0FromModel], row[kGuidanceScale], row[kOutFromX],
          row[kOutFromX0], row[kOutFromH1],   row[kOutFromH2],     row[kOutFromZ]};
}

// What a step call has besides x and the model output. The CPU kernels pass compile-time
// constants (each absent term then costs nothing); the CUDA kernel passes uniform flags.
struct StepTerms {
  bool guided, clip, h1, h2, z;
};

// The output of one step and the x0 prediction it was formed from.
struct StepValues {
  float out, x0;
};

// m = m_u + s (m_c - m_u) when guided (else m_c); x0 = A x + B m, clamped to [-1, 1] with clip;
// out = C x + D x0 + E h1 + F h2 + G z. An absent term is skipped, not multiplied by 0 (a NaN
// weight then has no effect, as in the reference). The clamp is written with comparisons so
// that a NaN passes through (as torch.clamp does).
DDPM_FAST_HD StepValues step_values(const StepCoefficients& c, StepTerms terms, float x, float m_c, float m_u,
                                    float h1, float h2, float z) {
  const float m = terms.guided ? m_u + c.guidance_scale * (m_c - m_u) : m_c;
  float x0 = c.x0_from_x * x + c.x0_from_model * m;
  if (terms.clip) x0 = x0 < -1.0f ? -1.0f : (x0 > 1.0f ? 1.0f : x0);
  float out = c.out_from_x * x + c.out_from_x0 * x0;
  if (terms.h1) out += c.out_from_h1 * h1;
  if (terms.h2) out += c.out_from_h2 * h2;
  if (terms.z) out += c.out_from_z * z;
  return {out, x0};
}

}  // namespace ddpm_fast
