// Per-element arithmetic of q_sample and of the reverse / DDIM / DPM-Solver++ step, in float32.
//
// The coefficient tables and their meaning are documented in ddpm_fast/reference.py; a row
// table[t[b]] holds the coefficients of batch element b. Torch-free; shared by the CPU loops
// and the CUDA kernels so that the formulas exist once.
#pragma once

#include "ddpm_fast/philox.h"

namespace ddpm_fast {

// Columns of the q_sample table [T, 2] and of the step table [T, 5].
constexpr int kQSampleColumns = 2;
constexpr int kSqrtAlphasCumprod = 0, kSqrtOneMinusAlphasCumprod = 1;
constexpr int kStepColumns = 5;
constexpr int kX0FromXt = 0, kX0FromModel = 1, kOutFromX0 = 2, kOutFromXt = 3, kSigma = 4;

// x_t = sqrt(abar_t) * x_start + sqrt(1 - abar_t) * eps
DDPM_FAST_HD float q_sample_value(float sqrt_abar, float sqrt_one_minus_abar, float x_start, float eps) {
  return sqrt_abar * x_start + sqrt_one_minus_abar * eps;
}

// One row of the step table, read once per batch element.
struct StepCoefficients {
  float x0_from_xt, x0_from_model, out_from_x0, out_from_xt, sigma;
};

DDPM_FAST_HD StepCoefficients step_coefficients(const float* row) {
  return {row[kX0FromXt], row[kX0FromModel], row[kOutFromX0], row[kOutFromXt], row[kSigma]};
}

// The output of one step and the x0 prediction it was formed from.
struct StepValues {
  float out, x0;
};

// x0 = A x_t + B m, clamped to [-1, 1] with clip; out = P x0 + Q x_t + S z.
// The clamp is written with comparisons so that a NaN passes through (as torch.clamp does).
// The DPM-Solver++ step is this with z = the previous step's x0 and S its weight.
DDPM_FAST_HD StepValues step_values(const StepCoefficients& c, bool clip, float x_t, float model_output, float z) {
  float x0 = c.x0_from_xt * x_t + c.x0_from_model * model_output;
  if (clip) {
    x0 = x0 < -1.0f ? -1.0f : (x0 > 1.0f ? 1.0f : x0);
  }
  return {c.out_from_x0 * x0 + c.out_from_xt * x_t + c.sigma * z, x0};
}

DDPM_FAST_HD float step_value(const StepCoefficients& c, bool clip, float x_t, float model_output, float z) {
  return step_values(c, clip, x_t, model_output, z).out;
}

}  // namespace ddpm_fast
