"""``python -m ddpm_fast.info`` (or ``ddpm-fast info``): versions, devices and backends.

For every backend and device type it says whether the backend can run and, if not, why.
"""

import platform
import sys
import warnings


def _version(module_name):
    try:
        module = __import__(module_name)
    except Exception as error:  # not installed, or broken: say so instead of failing
        return f"not available ({type(error).__name__}: {error})"
    return getattr(module, "__version__", "unknown version")


def lines():
    import torch

    import ddpm_fast
    from ddpm_fast import _ext, backends

    out = [
        f"ddpm_fast {ddpm_fast.__version__}",
        f"python {platform.python_version()} ({sys.executable})",
        f"torch {torch.__version__} (CUDA {torch.version.cuda or 'none'})",
        f"triton {_version('triton')}",
        f"numpy {_version('numpy')}",
    ]
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(index)
            out.append(f"device cuda:{index}: {props.name}, compute capability {props.major}.{props.minor}, "
                       f"{props.total_memory / 2**30:.1f} GiB")
    else:
        out.append("device: cpu (CUDA is not available)")
    out.append(f"cpu: {platform.machine()}, {torch.get_num_threads()} torch threads")
    extension = "loaded" + (" with CUDA kernels" if _ext.with_cuda else " (CPU kernels only)")
    out.append(f"C++ extension: {extension if _ext.loaded else 'not used: ' + str(_ext.reason)}")
    for device_type, table in backends.report().items():
        out.append(f"backends for {device_type} tensors:")
        for name, reason in table.items():
            out.append(f"  {name:7s} {'available' if reason is None else 'unavailable: ' + reason}")
        try:
            with warnings.catch_warnings():  # the fallback is reported here, not warned about
                warnings.simplefilter("ignore")
                chosen = backends.resolve("auto", device_type)
        except Exception as error:  # an invalid DDPM_FAST_BACKEND, for instance
            chosen = f"none ({error})"
        out.append(f"  auto -> {chosen}")
    return out


def main():
    print("\n".join(lines()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
