// Fused GroupNorm + SiLU on CUDA, torch-free: raw pointers, sizes and a stream.
//
// Forward: one block per (sample, group). When the group fits in the block's registers
// (D <= kBlock * kMaxItems) it is read once, the mean and the variance from (x - mean) are
// reduced from registers and y is written: one read, one write. Larger groups take a chunked
// Welford pass for the statistics, then an elementwise pass for y.
// Backward: per-(sample, channel) sums of g = dy * silu'(z) and g * xhat, then per-group
// coefficients and dgamma/dbeta (fixed-order loops), then dx elementwise. Every reduction has a
// fixed order and there are no float atomics, so each run gives the same bits.
// The math is in csrc/include/ddpm_fast/group_norm_silu.h, shared with the CPU kernels.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <ddpm_fast/cuda_dtype.cuh>
#include <ddpm_fast/cuda_launch.h>
#include <ddpm_fast/group_norm_silu.h>

namespace ddpm_fast {
namespace {

constexpr int kBlock = 512;
constexpr int kWarps = kBlock / 32;
constexpr int kMaxItems = 16;  // one-pass path: groups of up to kBlock * kMaxItems = 8192 elements
constexpr int kElementwiseBlock = 256;

__device__ __forceinline__ float gamma_at(const float* w, int64_t c) { return w ? w[c] : 1.0f; }
__device__ __forceinline__ float beta_at(const float* b, int64_t c) { return b ? b[c] : 0.0f; }

// Where element e (0 <= e < D) of group g of sample n lives, and its channel.
// NCHW: the group is Cg contiguous rows of S. channels_last: S rows of Cg channels, C apart.
template <bool CL>
struct GroupIndex {
  int64_t c, s, cg;
  __device__ __forceinline__ int64_t offset(int64_t n, int64_t g, int64_t e) const {
    if (CL) return (n * s + e / cg) * c + g * cg + e % cg;
    return (n * c + g * cg) * s + e;
  }
  __device__ __forceinline__ int64_t channel(int64_t g, int64_t e) const { return g * cg + (CL ? e % cg : e / s); }
};

// Sample and channel of linear element i of the whole tensor.
template <bool CL>
__device__ __forceinline__ void sample_channel(int64_t i, int64_t c, int64_t s, int64_t& n, int64_t& ch) {
  n = i / (c * s);
  ch = CL ? i % c : (i / s) % c;
}

// Sum over the block, the same order every run; every thread gets the result.
__device__ float block_sum(float v, float* smem) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  __syncthreads();  // smem may still be read from the previous call
  if (threadIdx.x % 32 == 0) smem[threadIdx.x / 32] = v;
  __syncthreads();
  v = threadIdx.x % 32 < kWarps ? smem[threadIdx.x % 32] : 0.0f;
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ gns::Welford shfl_welford(const gns::Welford& a, int o) {
  return gns::Welford{__shfl_xor_sync(0xffffffffu, a.count, o), __shfl_xor_sync(0xffffffffu, a.mean, o),
                      __shfl_xor_sync(0xffffffffu, a.m2, o)};
}

__device__ gns::Welford block_welford(gns::Welford v, gns::Welford* smem) {
  for (int o = 16; o > 0; o >>= 1) v = gns::welford_combine(v, shfl_welford(v, o));
  if (threadIdx.x % 32 == 0) smem[threadIdx.x / 32] = v;
  __syncthreads();
  v = threadIdx.x % 32 < kWarps ? smem[threadIdx.x % 32] : gns::welford_empty();
  for (int o = 16; o > 0; o >>= 1) v = gns::welford_combine(v, shfl_welford(v, o));
  return v;
}

// ------------------------------------------------------------------------------------ forward

template <typename T, bool CL, int ITEMS>
__global__ void __launch_bounds__(kBlock)
    forward_onepass(const T* __restrict__ x, const float* __restrict__ w, const float* __restrict__ b,
                    T* __restrict__ y, float* __restrict__ mean_out, float* __restrict__ rstd_out,
                    GroupIndex<CL> ix, int64_t groups, float eps) {
  __shared__ float smem[kWarps];
  const int64_t ng = blockIdx.x, n = ng / groups, g = ng % groups, d = ix.cg * ix.s;
  float v[ITEMS];
  float sum = 0.0f;
#pragma unroll
  for (int i = 0; i < ITEMS; ++i) {
    const int64_t e = threadIdx.x + static_cast<int64_t>(i) * kBlock;
    v[i] = e < d ? to_float(x[ix.offset(n, g, e)]) : 0.0f;
    sum += v[i];
  }
  const float mean = block_sum(sum, smem) / static_cast<float>(d);
  float sq = 0.0f;
#pragma unroll
  for (int i = 0; i < ITEMS; ++i) {
    const int64_t e = threadIdx.x + static_cast<int64_t>(i) * kBlock;
    const float dv = v[i] - mean;
    sq += e < d ? dv * dv : 0.0f;
  }
  const float rstd = gns::rstd_from_var(block_sum(sq, smem) / static_cast<float>(d), eps);
  if (threadIdx.x == 0) {
    mean_out[ng] = mean;
    rstd_out[ng] = rstd;
  }
#pragma unroll
  for (int i = 0; i < ITEMS; ++i) {
    const int64_t e = threadIdx.x + static_cast<int64_t>(i) * kBlock;
    if (e < d) {
      const int64_t ch = ix.channel(g, e);
      const float scale = gamma_at(w, ch) * rstd;
      y[ix.offset(n, g, e)] = from_float<T>(gns::silu(v[i] * scale + (beta_at(b, ch) - mean * scale)));
    }
  }
}

template <typename T, bool CL>
__global__ void __launch_bounds__(kBlock)
    forward_stats_chunked(const T* __restrict__ x, float* __restrict__ mean_out, float* __restrict__ rstd_out,
                          GroupIndex<CL> ix, int64_t groups, float eps) {
  __shared__ gns::Welford smem[kWarps];
  const int64_t ng = blockIdx.x, n = ng / groups, g = ng % groups, d = ix.cg * ix.s;
  gns::Welford acc = gns::welford_empty();
  for (int64_t e = threadIdx.x; e < d; e += kBlock) acc = gns::welford_push(acc, to_float(x[ix.offset(n, g, e)]));
  acc = block_welford(acc, smem);
  if (threadIdx.x == 0) {
    mean_out[ng] = acc.mean;
    rstd_out[ng] = gns::rstd_from_var(acc.m2 / acc.count, eps);
  }
}

template <typename T, bool CL>
__global__ void forward_apply(const T* __restrict__ x, const float* __restrict__ w, const float* __restrict__ b,
                              T* __restrict__ y, const float* __restrict__ mean, const float* __restrict__ rstd,
                              int64_t c, int64_t s, int64_t groups, int64_t total) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    int64_t n, ch;
    sample_channel<CL>(i, c, s, n, ch);
    const int64_t ng = n * groups + ch / (c / groups);
    const float scale = gamma_at(w, ch) * rstd[ng];
    y[i] = from_float<T>(gns::silu(to_float(x[i]) * scale + (beta_at(b, ch) - mean[ng] * scale)));
  }
}

// ------------------------------------------------------------------------------------ backward

// g = dy * silu'(z) and xhat of element i, recomputed from x, mean and rstd.
struct Recomputed {
  float g, xhat;
};

template <typename T>
__device__ __forceinline__ Recomputed recompute(T dy, T x, float gamma, float beta, float mean, float rstd) {
  const float xv = to_float(x), xhat = (xv - mean) * rstd;
  return Recomputed{to_float(dy) * gns::silu_grad(gamma * xhat + beta), xhat};
}

// ds[n, c] = sum g * xhat and db[n, c] = sum g over the spatial positions of one channel.
// NCHW: one block per (n, c) over its contiguous row. channels_last: one block per (n, 32
// channels), 32 lanes across channels (coalesced) and kBlock / 32 rows at a time.
template <typename T, bool CL>
__global__ void __launch_bounds__(kBlock)
    backward_channel_sums(const T* __restrict__ dy, const T* __restrict__ x, const float* __restrict__ w,
                          const float* __restrict__ b, const float* __restrict__ mean,
                          const float* __restrict__ rstd, float* __restrict__ ds, float* __restrict__ db,
                          int64_t c, int64_t s, int64_t groups) {
  const int64_t cg = c / groups;
  if (!CL) {
    __shared__ float smem[kWarps];
    const int64_t nc = blockIdx.x, n = nc / c, ch = nc % c, ng = n * groups + ch / cg;
    const float gamma = gamma_at(w, ch), beta = beta_at(b, ch), mu = mean[ng], rs = rstd[ng];
    float sg = 0.0f, sgx = 0.0f;
    for (int64_t i = threadIdx.x; i < s; i += kBlock) {
      const Recomputed r = recompute(dy[nc * s + i], x[nc * s + i], gamma, beta, mu, rs);
      sg += r.g;
      sgx += r.g * r.xhat;
    }
    sg = block_sum(sg, smem);
    sgx = block_sum(sgx, smem);
    if (threadIdx.x == 0) {
      db[nc] = sg;
      ds[nc] = sgx;
    }
  } else {
    constexpr int kRows = kBlock / 32;
    __shared__ float part[2][kRows][33];
    const int64_t n = blockIdx.x, ch = blockIdx.y * 32 + threadIdx.x % 32;
    const int row = threadIdx.x / 32;
    float sg = 0.0f, sgx = 0.0f;
    if (ch < c) {
      const int64_t ng = n * groups + ch / cg;
      const float gamma = gamma_at(w, ch), beta = beta_at(b, ch), mu = mean[ng], rs = rstd[ng];
      // Walk the rows with one offset, stepping kRows rows at a time.
      const int64_t step = kRows * c, end = (n + 1) * s * c;
      for (int64_t i = (n * s + row) * c + ch; i < end; i += step) {
        const Recomputed r = recompute(dy[i], x[i], gamma, beta, mu, rs);
        sg += r.g;
        sgx += r.g * r.xhat;
      }
    }
    part[0][row][threadIdx.x % 32] = sg;
    part[1][row][threadIdx.x % 32] = sgx;
    __syncthreads();
    if (row == 0 && ch < c) {
      for (int r = 1; r < kRows; ++r) {
        sg += part[0][r][threadIdx.x];
        sgx += part[1][r][threadIdx.x];
      }
      db[n * c + ch] = sg;
      ds[n * c + ch] = sgx;
    }
  }
}

// Threads [0, N*G): the per-group coefficients c1, c2. Threads [0, C): dgamma, dbeta summed
// over the batch in order.
__global__ void backward_reduce(const float* __restrict__ w, const float* __restrict__ ds,
                                const float* __restrict__ db, float* __restrict__ c1, float* __restrict__ c2,
                                float* __restrict__ grad_w, float* __restrict__ grad_b, int64_t n, int64_t c,
                                int64_t s, int64_t groups) {
  const int64_t t = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x, cg = c / groups;
  if (t < n * groups) {
    const int64_t sample = t / groups, c0 = (t % groups) * cg;
    float a = 0.0f, bsum = 0.0f;
    for (int64_t ch = c0; ch < c0 + cg; ++ch) {
      a += gamma_at(w, ch) * db[sample * c + ch];
      bsum += gamma_at(w, ch) * ds[sample * c + ch];
    }
    const float d = static_cast<float>(cg * s);
    c1[t] = a / d;
    c2[t] = bsum / d;
  }
  if (t < c) {
    float gw = 0.0f, gb = 0.0f;
    for (int64_t i = 0; i < n; ++i) {
      gw += ds[i * c + t];
      gb += db[i * c + t];
    }
    if (grad_w) grad_w[t] = gw;
    if (grad_b) grad_b[t] = gb;
  }
}

template <typename T, bool CL>
__global__ void backward_dx(const T* __restrict__ dy, const T* __restrict__ x, const float* __restrict__ w,
                            const float* __restrict__ b, const float* __restrict__ mean,
                            const float* __restrict__ rstd, const float* __restrict__ c1,
                            const float* __restrict__ c2, T* __restrict__ dx, int64_t c, int64_t s, int64_t groups,
                            int64_t total) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    int64_t n, ch;
    sample_channel<CL>(i, c, s, n, ch);
    const int64_t ng = n * groups + ch / (c / groups);
    const float gamma = gamma_at(w, ch);
    const Recomputed r = recompute(dy[i], x[i], gamma, beta_at(b, ch), mean[ng], rstd[ng]);
    dx[i] = from_float<T>(gns::dx_from(r.g * gamma, r.xhat, rstd[ng], c1[ng], c2[ng]));
  }
}

// ------------------------------------------------------------------------------------ launchers

unsigned elementwise_blocks(int64_t total) {
  const int64_t blocks = (total + kElementwiseBlock - 1) / kElementwiseBlock;
  return static_cast<unsigned>(blocks < 65536 ? blocks : 65536);  // grid-stride beyond
}

template <typename T, bool CL, int ITEMS>
void launch_onepass(const T* x, const float* w, const float* b, T* y, float* mean, float* rstd, const GnsShape& sh,
                    float eps, cudaStream_t stream) {
  const GroupIndex<CL> ix{sh.c, sh.s, sh.c / sh.groups};
  launch(forward_onepass<T, CL, ITEMS>, static_cast<unsigned>(sh.n * sh.groups), kBlock, 0, stream, x, w, b, y, mean,
         rstd, ix, sh.groups, eps);
}

template <typename T, bool CL>
void forward(const void* xv, const float* w, const float* b, void* yv, float* mean, float* rstd, const GnsShape& sh,
             float eps, cudaStream_t stream) {
  const T* x = static_cast<const T*>(xv);
  T* y = static_cast<T*>(yv);
  const int64_t d = sh.c / sh.groups * sh.s;
  if (d <= kBlock * 1) return launch_onepass<T, CL, 1>(x, w, b, y, mean, rstd, sh, eps, stream);
  if (d <= kBlock * 2) return launch_onepass<T, CL, 2>(x, w, b, y, mean, rstd, sh, eps, stream);
  if (d <= kBlock * 4) return launch_onepass<T, CL, 4>(x, w, b, y, mean, rstd, sh, eps, stream);
  if (d <= kBlock * 8) return launch_onepass<T, CL, 8>(x, w, b, y, mean, rstd, sh, eps, stream);
  if (d <= kBlock * kMaxItems) return launch_onepass<T, CL, kMaxItems>(x, w, b, y, mean, rstd, sh, eps, stream);
  const GroupIndex<CL> ix{sh.c, sh.s, sh.c / sh.groups};
  launch(forward_stats_chunked<T, CL>, static_cast<unsigned>(sh.n * sh.groups), kBlock, 0, stream, x, mean, rstd, ix,
         sh.groups, eps);
  const int64_t total = sh.n * sh.c * sh.s;
  launch(forward_apply<T, CL>, elementwise_blocks(total), kElementwiseBlock, 0, stream, x, w, b, y, mean, rstd, sh.c,
         sh.s, sh.groups, total);
}

template <typename T, bool CL>
void backward(const void* dyv, const void* xv, const float* w, const float* b, const float* mean, const float* rstd,
              void* dxv, float* grad_w, float* grad_b, float* workspace, const GnsShape& sh, cudaStream_t stream) {
  const T* dy = static_cast<const T*>(dyv);
  const T* x = static_cast<const T*>(xv);
  T* dx = static_cast<T*>(dxv);
  float* ds = workspace;
  float* db = ds + sh.n * sh.c;
  float* c1 = db + sh.n * sh.c;
  float* c2 = c1 + sh.n * sh.groups;
  const dim3 grid = CL ? dim3(static_cast<unsigned>(sh.n), static_cast<unsigned>((sh.c + 31) / 32))
                       : dim3(static_cast<unsigned>(sh.n * sh.c));
  launch(backward_channel_sums<T, CL>, grid, kBlock, 0, stream, dy, x, w, b, mean, rstd, ds, db, sh.c, sh.s, sh.groups);
  const int64_t threads = sh.n * sh.groups > sh.c ? sh.n * sh.groups : sh.c;
  launch(backward_reduce, static_cast<unsigned>((threads + 255) / 256), 256, 0, stream, w, ds, db, c1, c2, grad_w,
         grad_b, sh.n, sh.c, sh.s, sh.groups);
  const int64_t total = sh.n * sh.c * sh.s;
  launch(backward_dx<T, CL>, elementwise_blocks(total), kElementwiseBlock, 0, stream, dy, x, w, b, mean, rstd, c1, c2,
         dx, sh.c, sh.s, sh.groups, total);
}

}  // namespace

int gns_forward_cuda(const void* x, const float* weight, const float* bias, void* y, float* mean, float* rstd,
                     GnsShape shape, float eps, void* stream_ptr) {
  const auto stream = static_cast<cudaStream_t>(stream_ptr);
  switch (shape.dtype * 2 + (shape.channels_last ? 1 : 0)) {
    case 0: forward<float, false>(x, weight, bias, y, mean, rstd, shape, eps, stream); break;
    case 1: forward<float, true>(x, weight, bias, y, mean, rstd, shape, eps, stream); break;
    case 2: forward<__half, false>(x, weight, bias, y, mean, rstd, shape, eps, stream); break;
    case 3: forward<__half, true>(x, weight, bias, y, mean, rstd, shape, eps, stream); break;
    case 4: forward<__nv_bfloat16, false>(x, weight, bias, y, mean, rstd, shape, eps, stream); break;
    case 5: forward<__nv_bfloat16, true>(x, weight, bias, y, mean, rstd, shape, eps, stream); break;
    default: return static_cast<int>(cudaErrorInvalidValue);
  }
  return static_cast<int>(cudaGetLastError());
}

int gns_backward_cuda(const void* grad_y, const void* x, const float* weight, const float* bias, const float* mean,
                      const float* rstd, void* grad_x, float* grad_weight, float* grad_bias, float* workspace,
                      GnsShape shape, void* stream_ptr) {
  const auto stream = static_cast<cudaStream_t>(stream_ptr);
#define DDPM_GNS_BACKWARD(T, CL) \
  backward<T, CL>(grad_y, x, weight, bias, mean, rstd, grad_x, grad_weight, grad_bias, workspace, shape, stream)
  switch (shape.dtype * 2 + (shape.channels_last ? 1 : 0)) {
    case 0: DDPM_GNS_BACKWARD(float, false); break;
    case 1: DDPM_GNS_BACKWARD(float, true); break;
    case 2: DDPM_GNS_BACKWARD(__half, false); break;
    case 3: DDPM_GNS_BACKWARD(__half, true); break;
    case 4: DDPM_GNS_BACKWARD(__nv_bfloat16, false); break;
    case 5: DDPM_GNS_BACKWARD(__nv_bfloat16, true); break;
    default: return static_cast<int>(cudaErrorInvalidValue);
  }
#undef DDPM_GNS_BACKWARD
  return static_cast<int>(cudaGetLastError());
}

}  // namespace ddpm_fast
