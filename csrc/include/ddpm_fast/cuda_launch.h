// The one way csrc/cuda/*.cu launch a kernel:
//
//   launch(kernel, grid, block, shared_bytes, stream, args...);
//
// is kernel<<<grid, block, shared_bytes, stream>>>(args...) under nvcc, and runs the kernel on
// the CPU under the CUDA emulation (ddpm_fast/cuda_emulation.h) in the test-only emulated build
// (ddpm_fast.testing.cuda_emulation). `kernel` names one __global__ function (a template with
// all its arguments given, e.g. step_kernel<float, true, kNoNoise>); grid and block are dim3 or
// unsigned; shared_bytes is the dynamic shared memory (0: the emulation has none); args convert
// to the kernel's parameters as with <<<>>>. Errors are read as usual with cudaGetLastError().
//
// A new kernel needs nothing else: write it in a csrc/cuda/*.cu file, launch it with launch(),
// and register its op in a csrc/*_ops.cpp with the macros of ddpm_fast/op_registration.h; the
// emulated build compiles every csrc/cuda/*.cu and csrc/*_ops.cpp it finds.
#pragma once

#if defined(__CUDACC__)

#include <cuda_runtime.h>

#include <cstddef>
#include <utility>

namespace ddpm_fast {

template <typename... Params, typename... Args>
inline void launch(void (*kernel)(Params...), dim3 grid, dim3 block, size_t shared_bytes, cudaStream_t stream,
                   Args&&... args) {
  kernel<<<grid, block, shared_bytes, stream>>>(std::forward<Args>(args)...);
}

}  // namespace ddpm_fast

#else

#include "ddpm_fast/cuda_emulation.h"

namespace ddpm_fast {
using emu::launch;
}  // namespace ddpm_fast

#endif
