// How csrc/*_ops.cpp register their ops, so that the same file builds both the extension
// ddpm_fast._C and the test-only CUDA-emulation build (ddpm_fast.testing.cuda_emulation):
//
//   DDPM_FAST_LIBRARY(m)      { m.def("op(...) -> ..."); }   the schemas
//   DDPM_FAST_CPU_KERNELS(m)  { m.impl("op", &op_cpu); }     the CPU kernels
//   #ifdef DDPM_FAST_WITH_CUDA
//   DDPM_FAST_CUDA_KERNELS(m) { m.impl("op", &op_cuda); }    the CUDA op bodies
//   #endif
//
// and a CUDA op body launches on cuda_stream(device).
//
// ddpm_fast._C: torch.ops.ddpm_fast, the CPU kernels for CPU tensors, the CUDA op bodies for
// CUDA tensors on torch's current stream. Emulated build (DDPM_FAST_CUDA_EMULATION, with
// DDPM_FAST_WITH_CUDA): torch.ops.ddpm_fast_emulated with the same schemas, no CPU kernels, and
// the CUDA op bodies registered for CPU tensors, their kernels run by the emulator.
#pragma once

#include <c10/core/Device.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <torch/library.h>

#if defined(DDPM_FAST_CUDA_EMULATION)

#define DDPM_FAST_LIBRARY(m) TORCH_LIBRARY_FRAGMENT(ddpm_fast_emulated, m)
#define DDPM_FAST_CUDA_KERNELS(m) TORCH_LIBRARY_IMPL(ddpm_fast_emulated, CPU, m)
// Never registered: a function template that is never instantiated, so that the CPU kernels it
// names need not be linked.
#define DDPM_FAST_CPU_KERNELS(m) \
  template <typename>            \
  [[maybe_unused]] void C10_CONCATENATE(ddpm_fast_cpu_kernels_not_emulated_, C10_UID)(torch::Library & m)

#else

#define DDPM_FAST_LIBRARY(m) TORCH_LIBRARY_FRAGMENT(ddpm_fast, m)
#define DDPM_FAST_CPU_KERNELS(m) TORCH_LIBRARY_IMPL(ddpm_fast, CPU, m)
#define DDPM_FAST_CUDA_KERNELS(m) TORCH_LIBRARY_IMPL(ddpm_fast, CUDA, m)

#endif

namespace ddpm_fast {

// True in the emulated build, where the CUDA op bodies get CPU tensors: a check that a CUDA op
// body leaves to its kernel (to spare a host sync) must not be done on the host there either.
#if defined(DDPM_FAST_CUDA_EMULATION)
inline constexpr bool kEmulatedCuda = true;
#else
inline constexpr bool kEmulatedCuda = false;
#endif

// The stream a CUDA op body launches on: torch's current stream of the device, through the
// device-generic interface (the CUDA headers of a CPU build of torch do not compile). The
// emulator has one stream, the default one.
inline void* cuda_stream(const c10::Device& device) {
#if defined(DDPM_FAST_CUDA_EMULATION)
  (void)device;
  return nullptr;
#else
  return c10::impl::getDeviceGuardImpl(c10::DeviceType::CUDA)->getStream(device).native_handle();
#endif
}

}  // namespace ddpm_fast
