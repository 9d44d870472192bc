// Fused GroupNorm + SiLU on the CPU: forward and backward, NCHW and channels_last read in place,
// float32 / float16 / bfloat16 in and out with float32 arithmetic and statistics.
//
// NCHW: a (sample, group) is one contiguous block of D = C/G * S elements; one task per block
// reads it into cache, takes the mean, then the variance from (x - mean), then writes y.
// channels_last: a sample is S rows of C channels; per-channel mean and M2 come from one sweep
// over the rows (registers accumulate column blocks, chunks of rows join by Chan's combine), the
// groups join their channels, and y is written row by row with per-channel scale/shift while the
// next sample is fetched into cache.
// Backward recomputes z, silu'(z) and xhat from x, mean and rstd, and reduces the per-(sample,
// channel) sums for dgamma/dbeta over the batch in a fixed order, so every run gives the same bits.
#define DDPM_GNS_WITH_ATEN_VEC
#include <ddpm_fast/group_norm_silu.h>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#if defined(__F16C__) && defined(__AVX__)
#include <immintrin.h>
#endif
#include <type_traits>
#include <vector>

namespace ddpm_fast {
namespace cpu {
namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kVec = Vec::size();
// Rows summed into a partial before joining the total: keeps float sums accurate (two-level).
constexpr int64_t kRowChunk = 64;

// f(i, count) over [0, n) in vector steps; the last step may be partial (count < kVec).
template <typename F>
inline void for_vec(int64_t n, const F& f) {
  int64_t i = 0;
  for (; i + kVec <= n; i += kVec) f(i, kVec);
  if (i < n) f(i, n - i);
}

inline float sum_lanes(const Vec& v) {
  float lanes[kVec];
  v.store(lanes);
  float s = 0.0f;
  for (int64_t k = 0; k < kVec; ++k) s += lanes[k];
  return s;
}

// Half goes through c10's portable bit conversion one by one; as_float and store_from convert
// eight at a time with F16C where the build enables it (the same round-to-nearest-even).
template <typename T>
inline float to_float(T v) {
  if constexpr (std::is_same_v<T, c10::Half>) {
    return c10::detail::fp16_ieee_to_fp32_value(v.x);
  } else {
    return static_cast<float>(v);
  }
}

template <typename T>
inline T from_float(float v) {
  if constexpr (std::is_same_v<T, c10::Half>) {
    return c10::Half(c10::detail::fp16_ieee_from_fp32_value(v), c10::Half::from_bits());
  } else {
    return static_cast<T>(v);
  }
}

// A float view of n elements of type T: the data itself for float, else a converted copy in buf.
template <typename T>
inline const float* as_float(const T* src, int64_t n, float* buf) {
  if constexpr (std::is_same_v<T, float>) {
    return src;
  } else {
    int64_t i = 0;
#if defined(__F16C__) && defined(__AVX__)
    if constexpr (std::is_same_v<T, c10::Half>) {
      for (; i + 8 <= n; i += 8) {
        _mm256_storeu_ps(buf + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i))));
      }
    }
#endif
    for (; i < n; ++i) buf[i] = to_float(src[i]);
    return buf;
  }
}

// Where float results for dst go: dst itself for float, else buf (then store_from writes dst).
template <typename T>
inline float* float_out(T* dst, float* buf) {
  if constexpr (std::is_same_v<T, float>) {
    return dst;
  } else {
    return buf;
  }
}

template <typename T>
inline void store_from(const float* buf, T* dst, int64_t n) {
  if constexpr (!std::is_same_v<T, float>) {
    int64_t i = 0;
#if defined(__F16C__) && defined(__AVX__)
    if constexpr (std::is_same_v<T, c10::Half>) {
      for (; i + 8 <= n; i += 8) {
        _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i),
                         _mm256_cvtps_ph(_mm256_loadu_ps(buf + i), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
      }
    }
#endif
    for (; i < n; ++i) dst[i] = from_float<T>(buf[i]);
  }
}

// Scratch of n floats per task, unused (size 0) for float data.
template <typename T>
inline std::vector<float> scratch(int64_t n) {
  return std::vector<float>(std::is_same_v<T, float> ? 0 : n);
}

inline float gamma_at(const float* w, int64_t c) { return w ? w[c] : 1.0f; }
inline float beta_at(const float* b, int64_t c) { return b ? b[c] : 0.0f; }

// sum of f(v) over the vectors v of p[0, n), lanes past n zero: four independent accumulators,
// so the adds overlap instead of waiting on each other (the loop is otherwise latency-bound).
template <typename F>
inline float row_reduce(const float* p, int64_t n, const F& f) {
  Vec acc0(0.0f), acc1(0.0f), acc2(0.0f), acc3(0.0f);
  int64_t i = 0;
  for (; i + 4 * kVec <= n; i += 4 * kVec) {
    acc0 += f(Vec::loadu(p + i), kVec);
    acc1 += f(Vec::loadu(p + i + kVec), kVec);
    acc2 += f(Vec::loadu(p + i + 2 * kVec), kVec);
    acc3 += f(Vec::loadu(p + i + 3 * kVec), kVec);
  }
  for (; i < n; i += kVec) acc0 += f(Vec::loadu(p + i, std::min(kVec, n - i)), std::min(kVec, n - i));
  return sum_lanes((acc0 + acc1) + (acc2 + acc3));
}

inline float row_sum(const float* p, int64_t n) {
  return row_reduce(p, n, [](const Vec& v, int64_t) { return v; });
}

inline float row_centered_sq(const float* p, int64_t n, float mean) {
  const Vec vmean(mean);
  return row_reduce(p, n, [&](const Vec& v, int64_t k) {
    // Lanes past a partial load are zero: keep them out of the sum.
    const Vec d = k == kVec ? v - vmean : Vec::set(Vec(0.0f), v - vmean, k);
    return d * d;
  });
}

inline void row_apply(const float* x, float* y, int64_t n, float scale, float shift) {
  const Vec vscale(scale), vshift(shift);
  for_vec(n, [&](int64_t i, int64_t k) {
    gns::silu(at::vec::fmadd(Vec::loadu(x + i, k), vscale, vshift)).store(y + i, k);
  });
}

// -------------------------------------------------------------------------------- forward

template <typename T>
void forward_nchw(const T* x, const float* w, const float* b, T* y, float* mean_out, float* rstd_out,
                  const GnsShape& sh, float eps) {
  const int64_t cg = sh.c / sh.groups, d = cg * sh.s;
  at::parallel_for(0, sh.n * sh.groups, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> xbuf = scratch<T>(d), ybuf = scratch<T>(d);
    for (int64_t ng = begin; ng < end; ++ng) {
      const float* xf = as_float(x + ng * d, d, xbuf.data());
      float* yf = float_out(y + ng * d, ybuf.data());
      // Rows of S summed one by one, then joined: the per-row sums stay short.
      float total = 0.0f;
      for (int64_t ci = 0; ci < cg; ++ci) total += row_sum(xf + ci * sh.s, sh.s);
      const float mean = total / static_cast<float>(d);
      float sq = 0.0f;
      for (int64_t ci = 0; ci < cg; ++ci) sq += row_centered_sq(xf + ci * sh.s, sh.s, mean);
      const float rstd = gns::rstd_from_var(sq / static_cast<float>(d), eps);
      mean_out[ng] = mean;
      rstd_out[ng] = rstd;
      const int64_t c0 = (ng % sh.groups) * cg;
      for (int64_t ci = 0; ci < cg; ++ci) {
        const float scale = gamma_at(w, c0 + ci) * rstd;
        row_apply(xf + ci * sh.s, yf + ci * sh.s, sh.s, scale, beta_at(b, c0 + ci) - mean * scale);
      }
      store_from(yf, y + ng * d, d);
    }
  });
}

// Vectors per column block in the channels_last statistics: two row phases of kBlock accumulators
// plus kBlock means fit the 16 AVX2 registers, and 2 * kBlock independent add chains hide the
// add latency (one accumulator per vector would leave the loop latency-bound).
constexpr int64_t kBlock = 4;

template <bool kFull>
inline Vec load(const float* p, int64_t k) {
  return kFull ? Vec::loadu(p) : Vec::loadu(p, k);
}

// out[ch] += sum over the rows of x ([rows, c] floats) of x[r, ch], or of (x[r, ch] - mean[ch])^2
// when kCentered, for the NV vectors of channels from i (k lanes each; lanes past k load as zero).
// The accumulators stay in registers for all rows: even and odd rows in separate ones.
template <int64_t NV, bool kFull, bool kCentered>
inline void column_sums(const float* x, int64_t rows, int64_t c, int64_t i, int64_t k, const float* mean,
                        float* out) {
  Vec even[NV], odd[NV], m[NV];
  for (int64_t j = 0; j < NV; ++j) {
    even[j] = odd[j] = Vec(0.0f);
    if constexpr (kCentered) m[j] = load<kFull>(mean + i + j * kVec, k);
  }
  auto add = [&](Vec& acc, const float* p, int64_t j) {
    const Vec v = load<kFull>(p + j * kVec, k);
    if constexpr (kCentered) {
      const Vec d = v - m[j];
      acc = at::vec::fmadd(d, d, acc);
    } else {
      acc += v;
    }
  };
  int64_t r = 0;
  for (; r + 2 <= rows; r += 2) {
    for (int64_t j = 0; j < NV; ++j) add(even[j], x + r * c + i, j);
    for (int64_t j = 0; j < NV; ++j) add(odd[j], x + (r + 1) * c + i, j);
  }
  if (r < rows) {
    for (int64_t j = 0; j < NV; ++j) add(even[j], x + r * c + i, j);
  }
  for (int64_t j = 0; j < NV; ++j) {
    float* o = out + i + j * kVec;
    (load<kFull>(o, k) + (even[j] + odd[j])).store(o, k);
  }
}

// Per-channel mean and M2 = sum (x - mean)^2 over the S rows of one channels_last sample, in one
// sweep from memory: each chunk of kRowChunk rows (kRowChunk * c floats, cache-resident) gets its own
// two-pass mean and M2, then joins the running ones by Chan's combine, vectorised over channels.
// chunk holds the float16/bfloat16 rows converted; cmean and cm2 are c floats of scratch.
template <typename T>
void channel_stats(const T* xs, int64_t s, int64_t c, float* mean, float* m2, float* chunk, float* cmean,
                   float* cm2) {
  std::fill(mean, mean + c, 0.0f);
  std::fill(m2, m2 + c, 0.0f);
  for (int64_t r0 = 0; r0 < s; r0 += kRowChunk) {
    const int64_t rows = std::min(kRowChunk, s - r0);
    const float* xf = as_float(xs + r0 * c, rows * c, chunk);
    auto sweep = [&](auto centered, float* out) {
      constexpr bool kCentered = decltype(centered)::value;
      std::fill(out, out + c, 0.0f);
      int64_t i = 0;
      for (; i + kBlock * kVec <= c; i += kBlock * kVec) column_sums<kBlock, true, kCentered>(xf, rows, c, i, kVec, cmean, out);
      for (; i + kVec <= c; i += kVec) column_sums<1, true, kCentered>(xf, rows, c, i, kVec, cmean, out);
      if (i < c) column_sums<1, false, kCentered>(xf, rows, c, i, c - i, cmean, out);
    };
    sweep(std::false_type{}, cmean);
    const Vec inv_rows(1.0f / static_cast<float>(rows));
    for_vec(c, [&](int64_t i, int64_t k) { (Vec::loadu(cmean + i, k) * inv_rows).store(cmean + i, k); });
    sweep(std::true_type{}, cm2);
    // Chan: mean += delta * nb / n, m2 += m2_b + delta^2 * na * nb / n, delta = chunk mean - mean.
    const float na = static_cast<float>(r0), nb = static_cast<float>(rows);
    const Vec wb(nb / (na + nb)), wab(na * nb / (na + nb));
    for_vec(c, [&](int64_t i, int64_t k) {
      const Vec m = Vec::loadu(mean + i, k), delta = Vec::loadu(cmean + i, k) - m;
      at::vec::fmadd(delta, wb, m).store(mean + i, k);
      at::vec::fmadd(delta * delta, wab, Vec::loadu(m2 + i, k) + Vec::loadu(cm2 + i, k)).store(m2 + i, k);
    });
  }
}

template <typename T>
void forward_nhwc(const T* x, const float* w, const float* b, T* y, float* mean_out, float* rstd_out,
                  const GnsShape& sh, float eps) {
  const int64_t c = sh.c, s = sh.s, cg = c / sh.groups;
  const float d = static_cast<float>(cg * s);
  // Per (sample, channel) scale and shift, filled by the statistics pass.
  std::vector<float> scale(sh.n * c), shift(sh.n * c);
  // next (or null): rows to fetch into L2 meanwhile, one per row written, so that the statistics
  // of the next sample read cache, not memory, while this loop waits on its divisions.
  auto apply_rows = [&](int64_t begin, int64_t end, float* xbuf, float* ybuf, const T* next) {
    for (int64_t row = begin; row < end; ++row) {
      if (next) {
        const char* p = reinterpret_cast<const char*>(next + (row - begin) * c);
        for (int64_t off = 0; off < c * static_cast<int64_t>(sizeof(T)); off += 64) __builtin_prefetch(p + off, 0, 2);
      }
      const float* xf = as_float(x + row * c, c, xbuf);
      float* yf = float_out(y + row * c, ybuf);
      const float* sc = scale.data() + (row / s) * c;
      const float* sf = shift.data() + (row / s) * c;
      for_vec(c, [&](int64_t i, int64_t k) {
        gns::silu(at::vec::fmadd(Vec::loadu(xf + i, k), Vec::loadu(sc + i, k), Vec::loadu(sf + i, k))).store(yf + i, k);
      });
      store_from(yf, y + row * c, c);
    }
  };
  // With a sample per core or more, each sample is written while it is still in cache;
  // otherwise the write pass is split over rows so that every core works.
  const bool write_per_sample = sh.n >= at::get_num_threads();
  at::parallel_for(0, sh.n, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> xbuf = scratch<T>(c), ybuf = scratch<T>(c), chunk = scratch<T>(kRowChunk * c);
    std::vector<float> mean_c(c), m2_c(c), cmean(c), cm2(c);
    for (int64_t n = begin; n < end; ++n) {
      channel_stats(x + n * s * c, s, c, mean_c.data(), m2_c.data(), chunk.data(), cmean.data(), cm2.data());
      for (int64_t g = 0; g < sh.groups; ++g) {
        // The group's M2 joins its channels' (all of S rows): sum of M2_c + S * sum (mean_c - mean)^2.
        float total = 0.0f;
        for (int64_t ch = g * cg; ch < (g + 1) * cg; ++ch) total += mean_c[ch];
        const float mean = total / static_cast<float>(cg);
        float sq = 0.0f, spread = 0.0f;
        for (int64_t ch = g * cg; ch < (g + 1) * cg; ++ch) {
          sq += m2_c[ch];
          spread += (mean_c[ch] - mean) * (mean_c[ch] - mean);
        }
        const float rstd = gns::rstd_from_var((sq + static_cast<float>(s) * spread) / d, eps);
        mean_out[n * sh.groups + g] = mean;
        rstd_out[n * sh.groups + g] = rstd;
        for (int64_t ch = g * cg; ch < (g + 1) * cg; ++ch) {
          scale[n * c + ch] = gamma_at(w, ch) * rstd;
          shift[n * c + ch] = beta_at(b, ch) - mean * scale[n * c + ch];
        }
      }
      if (write_per_sample) {
        apply_rows(n * s, (n + 1) * s, xbuf.data(), ybuf.data(), n + 1 < end ? x + (n + 1) * s * c : nullptr);
      }
    }
  });
  if (!write_per_sample) {
    at::parallel_for(0, sh.n * s, kRowChunk, [&](int64_t begin, int64_t end) {
      std::vector<float> xbuf = scratch<T>(c), ybuf = scratch<T>(c);
      apply_rows(begin, end, xbuf.data(), ybuf.data(), nullptr);
    });
  }
}

// -------------------------------------------------------------------------------- backward

// dgamma[c] = sum_n ds[n, c], dbeta[c] = sum_n db[n, c], in batch order.
void reduce_over_batch(const std::vector<float>& ds, const std::vector<float>& db, float* dw, float* dbias,
                       int64_t n, int64_t c) {
  for (int64_t ch = 0; ch < c; ++ch) {
    float gw = 0.0f, gb = 0.0f;
    for (int64_t i = 0; i < n; ++i) {
      gw += ds[i * c + ch];
      gb += db[i * c + ch];
    }
    if (dw) dw[ch] = gw;
    if (dbias) dbias[ch] = gb;
  }
}

template <typename T>
void backward_nchw(const T* dy, const T* x, const float* w, const float* b, const float* mean, const float* rstd,
                   T* dx, float* dw, float* dbias, const GnsShape& sh) {
  const int64_t cg = sh.c / sh.groups, d = cg * sh.s;
  std::vector<float> ds(sh.n * sh.c), db(sh.n * sh.c);
  at::parallel_for(0, sh.n * sh.groups, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> xbuf = scratch<T>(d), dybuf = scratch<T>(d), dxbuf = scratch<T>(d);
    for (int64_t ng = begin; ng < end; ++ng) {
      const float* xf = as_float(x + ng * d, d, xbuf.data());
      const float* dyf = as_float(dy + ng * d, d, dybuf.data());
      float* dxf = float_out(dx + ng * d, dxbuf.data());
      const int64_t c0 = (ng % sh.groups) * cg, n = ng / sh.groups;
      const Vec vmean(mean[ng]), vrstd(rstd[ng]);
      float c1 = 0.0f, c2 = 0.0f;
      for (int64_t ci = 0; ci < cg; ++ci) {
        const float scale = gamma_at(w, c0 + ci) * rstd[ng];
        const Vec vscale(scale), vshift(beta_at(b, c0 + ci) - mean[ng] * scale);
        const float *xr = xf + ci * sh.s, *dyr = dyf + ci * sh.s;
        float* gr = dxf + ci * sh.s;  // g is kept where dx goes, for the second pass
        Vec acc_g(0.0f), acc_gx(0.0f);
        for_vec(sh.s, [&](int64_t i, int64_t k) {
          const Vec xv = Vec::loadu(xr + i, k);
          // Zero lanes of a partial dy load give g = 0: nothing is added for them.
          const Vec g = Vec::loadu(dyr + i, k) * gns::silu_grad(at::vec::fmadd(xv, vscale, vshift));
          g.store(gr + i, k);
          acc_g += g;
          acc_gx = at::vec::fmadd(g, (xv - vmean) * vrstd, acc_gx);
        });
        const float sg = sum_lanes(acc_g), sgx = sum_lanes(acc_gx);
        db[n * sh.c + c0 + ci] = sg;
        ds[n * sh.c + c0 + ci] = sgx;
        c1 += gamma_at(w, c0 + ci) * sg;
        c2 += gamma_at(w, c0 + ci) * sgx;
      }
      const Vec vc1(c1 / static_cast<float>(d)), vc2(c2 / static_cast<float>(d));
      for (int64_t ci = 0; ci < cg; ++ci) {
        const Vec vgamma(gamma_at(w, c0 + ci));
        const float* xr = xf + ci * sh.s;
        float* dxr = dxf + ci * sh.s;
        for_vec(sh.s, [&](int64_t i, int64_t k) {
          const Vec g = Vec::loadu(dxr + i, k);
          gns::dx_from(g * vgamma, (Vec::loadu(xr + i, k) - vmean) * vrstd, vrstd, vc1, vc2).store(dxr + i, k);
        });
      }
      store_from(dxf, dx + ng * d, d);
    }
  });
  reduce_over_batch(ds, db, dw, dbias, sh.n, sh.c);
}

template <typename T>
void backward_nhwc(const T* dy, const T* x, const float* w, const float* b, const float* mean, const float* rstd,
                   T* dx, float* dw, float* dbias, const GnsShape& sh) {
  const int64_t c = sh.c, s = sh.s, cg = c / sh.groups;
  const float d = static_cast<float>(cg * s);
  std::vector<float> ds(sh.n * c), db(sh.n * c);
  // Per (sample, channel): scale, shift, mean, rstd, gamma, c1, c2 (group values per channel).
  enum { kScale, kShift, kMean, kRstd, kGamma, kC1, kC2, kParams };
  std::vector<float> params(sh.n * kParams * c);
  auto param = [&](int64_t n, int which) { return params.data() + (n * kParams + which) * c; };
  // g = dy * silu'(z) of the first pass, kept for the second: in dx itself for float data.
  std::vector<float> g_store = scratch<T>(sh.n * s * c);
  auto g_rows = [&](int64_t row) { return float_out(dx, g_store.data()) + row * c; };
  at::parallel_for(0, sh.n, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> dybuf = scratch<T>(c), xbuf = scratch<T>(c);
    for (int64_t n = begin; n < end; ++n) {
      for (int64_t ch = 0; ch < c; ++ch) {
        const int64_t ng = n * sh.groups + ch / cg;
        param(n, kGamma)[ch] = gamma_at(w, ch);
        param(n, kScale)[ch] = gamma_at(w, ch) * rstd[ng];
        param(n, kShift)[ch] = beta_at(b, ch) - mean[ng] * param(n, kScale)[ch];
        param(n, kMean)[ch] = mean[ng];
        param(n, kRstd)[ch] = rstd[ng];
      }
      const float *sc = param(n, kScale), *sf = param(n, kShift), *mc = param(n, kMean), *rc = param(n, kRstd);
      const T* xs = x + n * s * c;
      const T* dys = dy + n * s * c;
      // Two sums per channel (g and g * xhat): the partial holds both, g in [0, c), g*xhat in [c, 2c).
      std::vector<float> both(2 * c, 0.0f), partial(2 * c);
      for (int64_t r0 = 0; r0 < s; r0 += kRowChunk) {
        std::fill(partial.begin(), partial.end(), 0.0f);
        for (int64_t r = r0; r < std::min(s, r0 + kRowChunk); ++r) {
          const float* xr = as_float(xs + r * c, c, xbuf.data());
          const float* dyr = as_float(dys + r * c, c, dybuf.data());
          float* gr = g_rows(n * s + r);
          for_vec(c, [&](int64_t i, int64_t k) {
            const Vec xv = Vec::loadu(xr + i, k);
            const Vec g = Vec::loadu(dyr + i, k) *
                          gns::silu_grad(at::vec::fmadd(xv, Vec::loadu(sc + i, k), Vec::loadu(sf + i, k)));
            g.store(gr + i, k);
            const Vec xhat = (xv - Vec::loadu(mc + i, k)) * Vec::loadu(rc + i, k);
            (Vec::loadu(partial.data() + i, k) + g).store(partial.data() + i, k);
            at::vec::fmadd(g, xhat, Vec::loadu(partial.data() + c + i, k)).store(partial.data() + c + i, k);
          });
        }
        for_vec(2 * c, [&](int64_t i, int64_t k) {
          (Vec::loadu(both.data() + i, k) + Vec::loadu(partial.data() + i, k)).store(both.data() + i, k);
        });
      }
      for (int64_t g = 0; g < sh.groups; ++g) {
        float c1 = 0.0f, c2 = 0.0f;
        for (int64_t ch = g * cg; ch < (g + 1) * cg; ++ch) {
          db[n * c + ch] = both[ch];
          ds[n * c + ch] = both[c + ch];
          c1 += gamma_at(w, ch) * both[ch];
          c2 += gamma_at(w, ch) * both[c + ch];
        }
        std::fill(param(n, kC1) + g * cg, param(n, kC1) + (g + 1) * cg, c1 / d);
        std::fill(param(n, kC2) + g * cg, param(n, kC2) + (g + 1) * cg, c2 / d);
      }
    }
  });
  at::parallel_for(0, sh.n * s, kRowChunk, [&](int64_t begin, int64_t end) {
    std::vector<float> xbuf = scratch<T>(c);
    for (int64_t row = begin; row < end; ++row) {
      const int64_t n = row / s;
      const float *mc = param(n, kMean), *rc = param(n, kRstd);
      const float *gm = param(n, kGamma), *c1 = param(n, kC1), *c2 = param(n, kC2);
      const float* xr = as_float(x + row * c, c, xbuf.data());
      float* gr = g_rows(row);  // g in, dx out
      for_vec(c, [&](int64_t i, int64_t k) {
        const Vec rs = Vec::loadu(rc + i, k);
        gns::dx_from(Vec::loadu(gr + i, k) * Vec::loadu(gm + i, k), (Vec::loadu(xr + i, k) - Vec::loadu(mc + i, k)) * rs,
                     rs, Vec::loadu(c1 + i, k), Vec::loadu(c2 + i, k))
            .store(gr + i, k);
      });
      store_from(gr, dx + row * c, c);
    }
  });
  reduce_over_batch(ds, db, dw, dbias, sh.n, c);
}

}  // namespace

void group_norm_silu_forward_cpu(const at::Tensor& x, const float* weight, const float* bias, at::Tensor& y,
                                 float* mean, float* rstd, const GnsShape& shape, double eps) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "group_norm_silu_cpu", [&] {
    const auto* xp = x.const_data_ptr<scalar_t>();
    auto* yp = y.mutable_data_ptr<scalar_t>();
    if constexpr (std::is_same_v<scalar_t, double>) {
      TORCH_CHECK(false, "group_norm_silu: x must be float32, float16 or bfloat16, got float64");
    } else if (shape.channels_last) {
      forward_nhwc(xp, weight, bias, yp, mean, rstd, shape, static_cast<float>(eps));
    } else {
      forward_nchw(xp, weight, bias, yp, mean, rstd, shape, static_cast<float>(eps));
    }
  });
}

void group_norm_silu_backward_cpu(const at::Tensor& grad_y, const at::Tensor& x, const float* weight,
                                  const float* bias, const float* mean, const float* rstd, at::Tensor& grad_x,
                                  float* grad_weight, float* grad_bias, const GnsShape& shape) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "group_norm_silu_backward_cpu", [&] {
    const auto* dyp = grad_y.const_data_ptr<scalar_t>();
    const auto* xp = x.const_data_ptr<scalar_t>();
    auto* dxp = grad_x.mutable_data_ptr<scalar_t>();
    if constexpr (std::is_same_v<scalar_t, double>) {
      TORCH_CHECK(false, "group_norm_silu_backward: x must be float32, float16 or bfloat16, got float64");
    } else if (shape.channels_last) {
      backward_nhwc(dyp, xp, weight, bias, mean, rstd, dxp, grad_weight, grad_bias, shape);
    } else {
      backward_nchw(dyp, xp, weight, bias, mean, rstd, dxp, grad_weight, grad_bias, shape);
    }
  });
}

}  // namespace cpu
}  // namespace ddpm_fast
