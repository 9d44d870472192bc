"""Shared pieces of the benchmark suite: device, providers, sizes, timing and bandwidth records.

Run with ``pytest benchmarks/ --benchmark-only``. Every benchmark runs on one device: the GPU
when torch sees one, else the CPU (``DDPM_BENCH_DEVICE=cpu`` forces the CPU on a GPU machine).
``DDPM_BENCH_TARGET_S`` sets the measured time per benchmark (default 0.4 s);
``DDPM_BENCH_THREADS`` sets torch's CPU thread count.

Providers of each op:
  seed_eager     the seed's eager PyTorch expression (tests/seed_reference.py)
  torch_compile  torch.compile of that same expression
  triton, cuda, cpu   the fused op of ddpm_fast.ops with that backend

Timing rules: each benchmark warms up first (compilation and autotuning stay out of the
numbers); on a GPU the timer synchronises the device at the start and end of every round, so
a round times the kernels, not their launch; inputs rotate among several buffers when one set
would sit in the GPU's L2 cache. Each result records in ``extra_info`` the minimal bytes the op
must move, the achieved GB/s from the median, and the fraction of the device-to-device (on the
CPU: memory-to-memory) copy bandwidth measured once per session.
"""

import importlib.util
import itertools
import os
import pathlib
import sys
import time

import pytest
import torch

import ddpm_fast
from ddpm_fast import backends

ROOT = pathlib.Path(__file__).resolve().parents[1]

DEVICE = torch.device(os.environ.get("DDPM_BENCH_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu"))
ON_GPU = DEVICE.type == "cuda"
TARGET_SECONDS = float(os.environ.get("DDPM_BENCH_TARGET_S", "0.4"))
LOAD_AT_START = list(os.getloadavg())
if os.environ.get("DDPM_BENCH_THREADS"):
    # On a shared, loaded CPU a multi-threaded op waits at every barrier for a descheduled
    # thread; fewer threads give steadier (per-thread) numbers.
    torch.set_num_threads(int(os.environ["DDPM_BENCH_THREADS"]))

PROVIDERS = ("seed_eager", "torch_compile", "triton", "cuda", "cpu")
FUSED_PROVIDERS = ("triton", "cuda", "cpu")

# Sizes: the reference size and a larger one on the CPU; on a GPU also >= 2**24 elements,
# where the bandwidth goals are set.
if ON_GPU:
    STEP_SHAPES = [(256, 3, 32, 32), (256, 4, 128, 128)]            # 786k and 2**24 elements
    GN_SHAPES = [(32, 128, 32, 32), (64, 256, 32, 32)]              # 4.2M and 2**24 elements
    DTYPES = [torch.float32, torch.bfloat16]
else:
    STEP_SHAPES = [(256, 3, 32, 32), (256, 3, 64, 64)]              # 786k and 3.1M elements
    GN_SHAPES = [(32, 128, 32, 32)]
    DTYPES = [torch.float32]
LAYOUTS = ["contiguous", "channels_last"]
# torch.compile spends seconds to minutes compiling each shape, dtype and layout: it runs on the
# CPU's reference size only, and on a GPU only where the goals compare against it (>= 2**24).
COMPILE_SHAPES = {"step": STEP_SHAPES[-1:] if ON_GPU else STEP_SHAPES[:1],
                  "gn": GN_SHAPES[-1:] if ON_GPU else GN_SHAPES[:1]}

# ----------------------------------------------------------------------------- the seed's code


def load_seed_reference():
    """tests/seed_reference.py, the eager code ddpm_fast replaces (tests/ is not a package)."""
    spec = importlib.util.spec_from_file_location("seed_reference", ROOT / "tests" / "seed_reference.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["seed_reference"] = module  # torch.compile traces its functions by module name
    spec.loader.exec_module(module)
    return module


seed_reference = load_seed_reference()

# ----------------------------------------------------------------------------- providers


def provider_skip_reason(provider, device=DEVICE):
    """None when ``provider`` can be benchmarked on ``device``; else why not."""
    if provider == "seed_eager":
        return None
    if provider == "torch_compile":
        return None if hasattr(torch, "compile") else "this torch has no torch.compile"
    if provider == "triton" and (device.type == "cpu" or os.environ.get("TRITON_INTERPRET") == "1"):
        return "Triton on the CPU runs only in the interpreter, which measures numpy, not a kernel"
    why = backends.unavailable_reason(provider, device.type)
    return None if why is None else f"{provider} backend unavailable: {why}"


def case_params(shapes, compile_shapes, dtypes=None, layouts=LAYOUTS, providers=PROVIDERS):
    """(provider, shape, dtype, layout) cases; torch_compile only at ``compile_shapes``."""
    params = []
    for provider, shape, dtype, layout in itertools.product(providers, shapes, dtypes or DTYPES, layouts):
        if provider == "torch_compile" and shape not in compile_shapes:
            continue
        why = provider_skip_reason(provider)
        marks = [pytest.mark.skip(reason=why)] if why else []
        case_id = f"{provider}-{'x'.join(map(str, shape))}-{str(dtype).replace('torch.', '')}-{layout}"
        params.append(pytest.param(provider, shape, dtype, layout, id=case_id, marks=marks))
    return params


def make_tensor(shape, dtype, layout, generator=None, device=DEVICE):
    x = torch.randn(shape, generator=generator, device=device, dtype=torch.float32).to(dtype)
    return x.to(memory_format=torch.channels_last) if layout == "channels_last" else x


def check_layout(out, layout):
    """Fused ops keep the input's layout (no hidden copy to contiguous)."""
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    assert out.is_contiguous(memory_format=fmt), f"output lost the {layout} layout: strides {out.stride()}"


def assert_close(actual, expected):
    """A sanity check that a benchmark times a working kernel (the tests check the precision)."""
    tol = 1e-4 if actual.dtype == torch.float32 else 3e-2
    torch.testing.assert_close(actual.double(), expected.double(), rtol=tol, atol=tol)


# ----------------------------------------------------------------------------- timing


def synchronize(device=DEVICE):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def synchronizing_timer():
    """perf_counter after draining the GPU queue: a round times the kernels it launched."""
    torch.cuda.synchronize()
    return time.perf_counter()


def l2_cache_bytes():
    props = torch.cuda.get_device_properties(DEVICE)
    return getattr(props, "L2_cache_size", 50 * 2**20) or 50 * 2**20


def rotation_count(bytes_per_set):
    """How many input sets to cycle through so that one call does not find its inputs in L2.

    Only on a GPU: the CPU's last-level cache here (hundreds of MB, shared) cannot be outrun
    with sizes that fit a short run, so CPU numbers are cache-warm for every provider alike.
    """
    if not ON_GPU:
        return 1
    return max(1, min(16, -(-4 * l2_cache_bytes() // max(1, bytes_per_set))))


def cycle(sets):
    """A callable giving the next input set of ``sets`` at each call."""
    iterator = itertools.cycle(sets)
    return lambda: next(iterator)


@pytest.fixture(scope="session")
def copy_bandwidth():
    """GB/s of ``dst.copy_(src)`` on a 256 MiB buffer (read + write), measured once."""
    numel = 2**26  # float32: 256 MiB, far beyond any cache
    src = torch.randn(numel, device=DEVICE)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    times = []
    for _ in range(10 if ON_GPU else 5):
        if ON_GPU:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            dst.copy_(src)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            begin = time.perf_counter()
            dst.copy_(src)
            times.append(time.perf_counter() - begin)
    times.sort()
    return 2 * src.numel() * src.element_size() / times[len(times) // 2] / 1e9


def run_benchmark(benchmark, fn, *, info, nbytes=None, copy_gbps=None, images=None):
    """Warms ``fn`` up, times it with pytest-benchmark and records bytes, GB/s and labels.

    ``fn`` runs one call of the op (taking its next input set itself when inputs rotate);
    ``images``: how many images one call makes (end to end), recorded as images/s.
    Returns the output of its last call, for a sanity check.
    """
    try:  # a backend whose kernels are missing from this build says so at its first call
        fn()  # compilation, autotuning, allocator warm-up
    except backends.BackendUnavailableError as error:
        pytest.skip(str(error))
    synchronize()
    begin = time.perf_counter()
    fn()
    synchronize()
    once = max(time.perf_counter() - begin, 1e-7)

    iterations = 1
    if ON_GPU:
        # The timer synchronises; a round launches enough calls to dwarf that synchronisation.
        benchmark._timer = synchronizing_timer
        iterations = max(1, min(1000, int(2e-3 / once)))
    per_round = once * iterations
    rounds = max(3, min(200, int(TARGET_SECONDS / per_round)))
    # Slow cases (a whole sampling loop on the CPU) are warm after the two calls above.
    warmup_rounds = 0 if per_round > TARGET_SECONDS / 4 else 1
    result = benchmark.pedantic(fn, rounds=rounds, iterations=iterations, warmup_rounds=warmup_rounds)
    if benchmark.stats is None:  # --benchmark-disable: the call ran once, untimed
        return result

    median = benchmark.stats.stats.median
    extra = dict(info, device=device_name(), rounds=rounds, iterations=iterations)
    if nbytes is not None:
        extra["bytes"] = int(nbytes)
        extra["gbps"] = nbytes / median / 1e9
        if copy_gbps:
            extra["copy_gbps"] = copy_gbps
            extra["copy_fraction"] = extra["gbps"] / copy_gbps
    if images is not None:
        extra["images_per_s"] = images / median
    benchmark.extra_info.update(extra)
    benchmark.group = info.get("group")
    return result


def device_name(device=DEVICE):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({torch.get_num_threads()} threads)"


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["torch"] = torch.__version__
    machine_info["ddpm_fast"] = ddpm_fast.__version__
    machine_info["bench_device"] = device_name()
    # Other work on a shared machine distorts timings: the load averages (1, 5, 15 min) say how much.
    machine_info["load_average_at_start"] = LOAD_AT_START
    machine_info["load_average_at_end"] = list(os.getloadavg())
    machine_info["backends"] = {name: backends.unavailable_reason(name, DEVICE.type) or "available"
                                for name in ("cpu", "cuda", "triton")}
