"""Every specialization of the Triton kernels, compiled by the real compiler for sm_80 and sm_90.

The other Triton tests run the kernels under the interpreter (TRITON_INTERPRET=1), which accepts
programs that the compiler rejects and says nothing about registers, spills or vector widths.
This file compiles, with no GPU, what GPU launches would compile:

1. The launchers run on CPU tensors under the interpreter with every kernel replaced by a
   recorder, over the shapes, dtypes and modes of ``_launches`` (chosen to reach each
   specialization the launchers can pick; for the sampler step, every combination of terms the
   samplers use rather than the full cross product of its flags). A recorded launch has the arguments, constexprs and
   options that the launcher passes on a GPU: ``kernels._common.GPU_OPTIONS`` (which it passes
   only off the interpreter) and the GroupNorm plan for the SM count of an A100 (sm_80) or an
   H100 (sm_90).
2. A subprocess without TRITON_INTERPRET (under it ``triton.jit`` makes interpreted functions,
   which cannot be compiled) specializes each launch as ``JITFunction.run`` does -- argument
   types, 16-byte divisibility of pointers and integers, integers equal to 1 as constants --
   and compiles each distinct specialization once per arch with ``triton.compile``. Registers,
   stack frame and shared memory come from the cubin (``cuobjdump --dump-resource-usage``), and
   the global loads and stores of each pointer argument from the PTX.

It fails on a compile error, on any spill (a stack frame or local memory), and when a global
access of a full-size tensor in an elementwise kernel is not a 128-bit vector (ld/st.global
.v4.b32) on input whose pointers and element count are multiples of 16 bytes / elements: fp32,
and fp16 / bf16 too (8 elements per thread, so also one 128-bit access per tensor).

The table benchmarks/results/triton-compiled.md (and .json) lists every specialization with
its resources, to compare with a GPU run; regenerate it with

    python tests/test_triton_compiled.py --write
"""

import argparse
import collections
import datetime
import importlib
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __name__ == "__main__" and "--compile" not in sys.argv:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # as tests/conftest.py: the launchers take CPU tensors

import pytest  # noqa: E402
import torch  # noqa: E402
import triton  # noqa: E402

from ddpm_fast.kernels import _common, diffusion_steps, group_norm_silu, sampler_step  # noqa: E402

# Compute capability -> SMs of the GPU the GroupNorm plan is made for (A100, H100 SXM).
ARCHS = {80: 108, 90: 132}
# Modules whose kernels are recorded: every triton.jit object in them.
KERNEL_MODULES = (diffusion_steps, sampler_step, group_norm_silu)
# Kernels that walk storage linearly, one element per lane: their full-size tensors must be
# read and written in 128-bit vectors.
ELEMENTWISE_MODULES = (diffusion_steps.__name__, sampler_step.__name__)
TABLE = Path(__file__).resolve().parent.parent / "benchmarks" / "results" / "triton-compiled.md"
WORKER_TIMEOUT_S = 900

# ----------------------------------------------------------------------------- the launches


def _tensor(shape, dtype, channels_last=False, misaligned=False):
    """An uninitialised CPU tensor (no kernel runs here). misaligned: a view one element into
    its storage, so its data pointer is not a multiple of 16 bytes."""
    if misaligned:
        return torch.empty(math.prod(shape) + 1, dtype=dtype)[1:].view(shape)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    return torch.empty(shape, dtype=dtype, memory_format=memory_format)


# The terms of each sampler's step: (h1, h2, noise, store_x0). DDIM with eta > 0 is the DDPM
# step with other rows (given or drawn noise), so it adds no specialization of its own.
SAMPLER_COMBOS = {
    "ddpm noise=given": (False, False, "given", False),
    "ddpm noise=drawn": (False, False, "drawn", False),
    "ddim eta=0": (False, False, None, False),
    "dpm2m first step": (False, False, None, True),
    "dpm2m": (True, False, None, True),
    "dpm3m": (True, True, None, True),
    "sde2m first step": (False, False, "drawn", True),
    "sde2m": (True, False, "drawn", True),
}


def _diffusion_launches():
    """(description, call) of the q_sample and sampler-step launchers.

    Not the full cross product of the sampler step's presence flags (guidance x h1 x h2 x noise
    kind x clip x x0 output: 96 specializations per dtype and shape, too slow for CI), but
    every combination the samplers use (SAMPLER_COMBOS: DDPM, DDIM, DPM-Solver++ 2M / 3M and
    SDE 2M, with their first steps), each unguided and guided, clip on and off, plus q_sample's
    two modes, in every dtype on two shapes whose sizes are all multiples of 16: 4x3x32x32
    (3072 elements per sample >= BLOCK: FEW_ROWS) and 4x3x8x8 (a table row per element). In
    fp32 only: batch 1 (a constant batch), odd sizes (no size divisible by 16: scalar accesses)
    and a misaligned input (also bf16), guided with clip (unguided differs only by the loads of
    the other half); int32 indices change only the index loads, so they get one launch per
    kernel. Channels_last inputs compile to the same specializations (the kernels walk storage
    linearly and take no strides).
    """
    def sampler_modes(x, t, seed, guided_only=False):
        table = torch.zeros(1000, sampler_step.SAMPLER_STEP_COLUMNS)
        for combo, (h1, h2, noise, store_x0) in SAMPLER_COMBOS.items():
            for guided in (True,) if guided_only else (False, True):
                for clip in (True,) if guided_only else (False, True):
                    model_output = torch.empty((2 * x.shape[0], *x.shape[1:]) if guided else x.shape, dtype=x.dtype)
                    terms = [torch.empty_like(x) if present else None for present in (h1, h2, noise == "given")]
                    yield (f"sampler_step {combo} {'guided' if guided else 'unguided'} clip={int(clip)}",
                           lambda m=model_output, terms=terms, clip=clip, drawn=noise == "drawn", store=store_x0:
                           sampler_step.sampler_step(x, m, t, table, clip, *terms, seed if drawn else None, store))

    def q_sample_modes(x, t, seed, guided_only=False):
        table = torch.zeros(1000, diffusion_steps.Q_SAMPLE_COLUMNS)
        yield "q_sample noise=given", lambda: diffusion_steps.q_sample(x, t, table, torch.empty_like(x), None)
        yield "q_sample noise=drawn", lambda: diffusion_steps.q_sample(x, t, table, None, seed)

    def launches(shape, dtype, misaligned=False, t_dtype=torch.int64, first_mode_only=False, guided_only=False):
        x = _tensor(shape, dtype, misaligned=misaligned)
        t = torch.zeros(shape[0], dtype=t_dtype)
        seed = torch.zeros(1, dtype=torch.int64)
        where = "x".join(map(str, shape)) + (" misaligned" if misaligned else "") + (
            " t int32" if t_dtype == torch.int32 else "")
        for modes in (q_sample_modes, sampler_modes):
            for name, call in list(modes(x, t, seed, guided_only))[:1 if first_mode_only else None]:
                yield f"{name} {str(dtype).removeprefix('torch.')} {where}", call

    for shape in ((4, 3, 32, 32), (4, 3, 8, 8)):
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            yield from launches(shape, dtype)
    for shape in ((1, 3, 32, 32), (1, 3, 8, 8), (2, 3, 45, 45), (3, 3, 7, 7)):
        yield from launches(shape, torch.float32, guided_only=True)
    for shape in ((4, 3, 32, 32), (4, 3, 8, 8)):
        yield from launches(shape, torch.float32, misaligned=True, guided_only=True)
        yield from launches(shape, torch.float32, t_dtype=torch.int32, first_mode_only=True)
    yield from launches((4, 3, 32, 32), torch.bfloat16, misaligned=True, guided_only=True)


def _group_norm_launches():
    """(description, call) of the GroupNorm+SiLU forward and backward launchers.

    The shapes reach the one-tile and the chunked path of both kernels in NCHW and
    channels_last, every warp count (4, 8, 16 forward, 32 backward on the one-tile path; the
    chunked tile is always 4096 elements on 8 warps), one and several groups per program (a power
    of two and not), masked tile rows and columns (7x7, 3 or 12 channels per group), and the
    extremes (one element per group and sample, 4096 channels in a 1x4096 channels_last tile).
    The first six (the UNet's sizes among them) get every dtype with and without affine
    parameters (and fp32 parameters with fp16 / bf16 input), the others fp32; then weight only,
    bias only, float64 parameters, grad_y in another layout than x, and a misaligned x.
    Channels_last shapes have a batch large enough for several groups per program on the GPU,
    except where noted. The plan of each is in the table.
    """
    full = [  # (N, C, spatial...), groups, channels_last, what it is for
        ((2, 96, 7, 7), 32, False, "small odd groups: masked rows and columns"),
        ((2, 128, 32, 32), 32, False, "UNet, 4 channels per group at 32x32"),
        ((2, 384, 32, 32), 32, False, "UNet up path, 12 channels per group at 32x32: the largest one-tile group"),
        ((40, 128, 32, 32), 32, True, "UNet at batch 40: several groups per program"),
        ((2, 256, 64, 64), 32, False, "a group too large for one tile"),
        ((40, 256, 64, 64), 32, True, "groups too large for one tile, several per program"),
    ]
    sweep = [
        ((2, 32), 32, False, "2-D input: one element per group"),
        ((2, 64, 4, 4), 32, False, "tiny groups"),
        ((2, 256, 16, 16), 32, False, "UNet, 8 channels per group at 16x16"),
        ((2, 256, 32, 32), 32, False, "UNet up path, 8 channels per group at 32x32"),
        ((2, 64, 16, 16), 1, False, "one group of 16384 elements"),
        ((2, 2048, 4, 4), 1, False, "one group of 2048 channels"),
        ((1, 64, 45, 45), 2, False, "odd spatial size, batch 1"),
        ((2, 128, 32, 32), 32, True, "small batch: one group per program"),
        ((40, 96, 7, 7), 32, True, "4 groups of 3 channels per program, masked"),
        ((40, 48, 8, 8), 24, True, "3 groups per program (not a power of 2)"),
        ((2, 256, 64, 64), 32, True, "a group too large for one tile, small batch"),
        ((1, 4096, 4, 4), 1, True, "one group of 4096 channels"),
    ]

    def launches(shape, groups, channels_last, note, dtype, weight_dtype, bias_dtype, mixed_layout=False,
                 misaligned=False):
        x = _tensor(shape, dtype, channels_last, misaligned)
        channels = shape[1]
        weight = torch.empty(channels, dtype=weight_dtype) if weight_dtype else None
        bias = torch.empty(channels, dtype=bias_dtype) if bias_dtype else None
        stats = torch.empty(shape[0], groups)
        grad_y = _tensor(shape, dtype, channels_last and not mixed_layout)

        def name(t):
            return str(t).removeprefix("torch.") if t else "none"

        where = (f"{'x'.join(map(str, shape))} G={groups} {'channels_last' if channels_last else 'NCHW'}"
                 f" {name(dtype)} weight={name(weight_dtype)} bias={name(bias_dtype)}: {note}")
        if not mixed_layout:
            yield f"gn forward {where}", lambda: group_norm_silu.forward(x, weight, bias, groups, 1e-5)
        yield f"gn backward {where}", lambda: group_norm_silu.backward(grad_y, x, weight, bias, stats, stats, groups)

    for shape, groups, channels_last, note in full:
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            for affine in (dtype, None):
                yield from launches(shape, groups, channels_last, note, dtype, affine, affine)
            if dtype != torch.float32:  # fp32 parameters with half-precision activations
                yield from launches(shape, groups, channels_last, note, dtype, torch.float32, torch.float32)
    for shape, groups, channels_last, note in (full[1], full[4]):  # weight only, bias only
        yield from launches(shape, groups, channels_last, note, torch.float32, torch.float32, None)
        yield from launches(shape, groups, channels_last, note, torch.float32, None, torch.float32)
    yield from launches((2, 128, 32, 32), 32, False, "float64 parameters", torch.float16, torch.float64, torch.float64)
    yield from launches((2, 128, 32, 32), 32, True, "grad_y NCHW, x channels_last", torch.float32,
                        torch.float32, torch.float32, mixed_layout=True)
    yield from launches((2, 128, 32, 32), 32, False, "x a view one element into its storage", torch.float32,
                        torch.float32, torch.float32, misaligned=True)
    for shape, groups, channels_last, note in sweep:
        yield from launches(shape, groups, channels_last, note, torch.float32, torch.float32, torch.float32)


def _launches():
    """(description, call) of every launcher call to record. A new launcher or mode gets its calls
    here or in the functions above; every kernel of KERNEL_MODULES is recorded without more."""
    yield from _diffusion_launches()
    yield from _group_norm_launches()


# ----------------------------------------------------------------------------- recording


def _encode(value):
    if isinstance(value, torch.Tensor):
        return {"tensor": str(value.dtype).removeprefix("torch."), "data_ptr": value.data_ptr(),
                "numel": value.numel()}
    if value is None or isinstance(value, (bool, int, float)):
        return value
    raise TypeError(f"cannot record a kernel argument of type {type(value).__name__}")


class _Recorder:
    """Stands in for a kernel: ``kernel[grid](*args, **kwargs)`` records the launch."""

    def __init__(self, module, name, sink):
        self.module, self.name, self.sink = module, name, sink

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            if self.module.__name__ in ELEMENTWISE_MODULES:
                assert "num_warps" not in kwargs, "the launcher now passes its options under the interpreter too"
                kwargs = {**kwargs, **_common.GPU_OPTIONS}  # passed only off the interpreter
            self.sink.append({"kernel": f"{self.module.__name__}:{self.name}",
                              "args": [_encode(a) for a in args],
                              "kwargs": {k: _encode(v) for k, v in kwargs.items()}})
        return launch


def record_launches(sm_count):
    """Every launch of ``_launches()`` as a GPU with ``sm_count`` SMs would make it: a list of
    dicts (kernel, args, kwargs, description)."""
    recorded = []
    with pytest.MonkeyPatch.context() as patch:
        for module in KERNEL_MODULES:
            for name, value in list(vars(module).items()):
                if isinstance(value, triton.runtime.KernelInterface):
                    patch.setattr(module, name, _Recorder(module, name, recorded))
        patch.setattr(group_norm_silu, "_multi_processor_count", lambda device: sm_count)
        for description, call in _launches():
            start = len(recorded)
            call()
            if len(recorded) == start:
                raise AssertionError(f"{description}: the launcher launched no kernel")
            for launch in recorded[start:]:
                launch["description"] = description
    return recorded


# ----------------------------------------------------------------------------- compiling (subprocess)


class _Pointer:
    """What the JIT's specialization reads of a tensor argument: its dtype and data pointer."""

    def __init__(self, dtype, data_ptr):
        self.dtype, self._data_ptr = getattr(torch, dtype), data_ptr

    def data_ptr(self):
        return self._data_ptr


def _decode(value):
    return _Pointer(value["tensor"], value["data_ptr"]) if isinstance(value, dict) else value


def _pack_args(kernel, backend, kwargs, bound_args, specialization, options):
    """signature, constexprs and attributes of a launch, as JITFunction.run derives them."""
    if hasattr(kernel, "_pack_args"):  # newer triton; below, what older JITFunction.run does inline
        return kernel._pack_args(backend, kwargs, bound_args, specialization, options)
    from triton._utils import find_paths_if, get_iterable_path

    options = backend.parse_options(kwargs)
    sigvals = [x[0] for x in specialization]
    signature = dict(zip((p.name for p in kernel.params), sigvals))
    constexprs = find_paths_if(sigvals, lambda _, val: val == "constexpr")
    constexprs = {path: get_iterable_path(list(bound_args.values()), path) for path in constexprs}
    attrvals = ["" if x[0] == "constexpr" else x[1] for x in specialization]
    attrs = find_paths_if(attrvals, lambda _, x: isinstance(x, str))
    attrs = {k: backend.parse_attr(get_iterable_path(attrvals, k)) for k in attrs}
    return options, signature, constexprs, attrs


_PTX_INSTRUCTION = re.compile(r"^(?:@!?%\w+\s+)?([a-z][\w.:]*)\s*(.*?);$")


def global_accesses(ptx, param_names):
    """The global loads and stores of a kernel's PTX: (opcode of each, {parameter: [opcode of each
    access whose address is computed from that parameter]}). param_names: the PTX parameters in
    order (None for those of no interest).

    A small data-flow pass over the PTX: each register depends on the registers its defining
    instructions read; ld.param ties a register to a kernel parameter; a loaded value is data,
    not part of an address.
    """
    sources = collections.defaultdict(set)
    param_of = {}
    accesses = []
    for raw in ptx.splitlines():
        line = raw.split("//")[0].strip()
        match = _PTX_INSTRUCTION.match(line)
        if not match:
            continue
        op, operands = match.groups()
        if op.startswith(("ld.global", "st.global")):
            address = re.search(r"\[\s*(%\w+)", operands)
            if address:
                accesses.append((op, address.group(1)))
            continue
        if op.startswith("ld.param"):
            index = re.search(r"_param_(\d+)\s*\]", operands)
            if index:
                param_of[re.match(r"\s*(%\w+)", operands).group(1)] = int(index.group(1))
            continue
        if op.startswith(("st.", "bra", "bar", "call", "ret", "red.")):
            continue  # no destination register
        brace = re.match(r"\s*\{([^}]*)\}\s*,(.*)", operands)
        if brace:
            targets, rest = re.findall(r"%\w+", brace.group(1)), brace.group(2)
        else:
            regs = re.findall(r"%\w+", operands)
            if not regs:
                continue
            targets, rest = regs[:1], operands.split(",", 1)[1] if "," in operands else ""
        if op.startswith("ld."):
            continue  # a loaded value: data, not an address
        for target in targets:
            sources[target].update(re.findall(r"%\w+", rest))

    def params(register):
        seen, stack, found = set(), [register], set()
        while stack:
            reg = stack.pop()
            if reg in seen:
                continue
            seen.add(reg)
            if reg in param_of:
                found.add(param_of[reg])
            stack.extend(sources.get(reg, ()))
        return found

    per_param = collections.defaultdict(list)
    for op, address in accesses:
        for index in sorted(params(address)):
            if index < len(param_names) and param_names[index] is not None:
                per_param[param_names[index]].append(op)
    return [op for op, _ in accesses], dict(per_param)


def _resource_usage(cubin, cuobjdump):
    with tempfile.NamedTemporaryFile(suffix=".cubin") as file:
        file.write(cubin)
        file.flush()
        text = subprocess.run([cuobjdump, "--dump-resource-usage", file.name], check=True,
                              capture_output=True, text=True).stdout
    usage = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", text)
    if not usage:
        raise RuntimeError(f"no resource usage in the output of cuobjdump:\n{text}")
    return dict(zip(("registers", "stack", "static_shared", "local"), map(int, usage.groups())))


def compile_launches(arch, launches):
    """Compile each distinct specialization of ``launches`` once for sm_<arch>.

    Returns (specializations: {key: result}, the key of each launch). Must run without
    TRITON_INTERPRET (the kernels are then JITFunctions).
    """
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.compiler.compiler import make_backend
    from triton.runtime.jit import JITFunction, create_function_from_signature

    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    cuobjdump = knobs.nvidia.cuobjdump.path
    binders, results, keys = {}, {}, []
    for launch in launches:
        module_name, name = launch["kernel"].split(":")
        kernel = getattr(importlib.import_module(module_name), name)
        if not isinstance(kernel, JITFunction):
            raise RuntimeError(f"{launch['kernel']} is a {type(kernel).__name__}: run without TRITON_INTERPRET")
        if name not in binders:
            binders[name] = create_function_from_signature(kernel.signature, kernel.params, backend)
        kwargs = {k: _decode(v) for k, v in launch["kwargs"].items()}
        kwargs["debug"] = kwargs.get("debug", kernel.debug) or knobs.runtime.debug  # as JITFunction.run
        bound_args, specialization, options = binders[name](*map(_decode, launch["args"]), **kwargs)
        key = f"{name}|{specialization}|{sorted(options.items())}"
        keys.append(key)
        if key in results:
            continue
        options, signature, constexprs, attrs = _pack_args(kernel, backend, kwargs, bound_args, specialization,
                                                           options)
        # The PTX parameters: the non-constexpr arguments in order (then scratch buffers).
        pointer_params = [p if kind.startswith("*") else None for p, kind in signature.items() if kind != "constexpr"]
        result = {"kernel": name, "module": module_name, "num_warps": options.num_warps,
                  "options": {k: _plain(v) for k, v in launch["kwargs"].items() if k not in signature},
                  "params": [{"name": p, "type": kind, "attr": spec[1] if kind != "constexpr" else None,
                              "value": _plain(spec[1]) if kind == "constexpr" else None}
                             for (p, kind), spec in zip(signature.items(), specialization)],
                  "description": launch["description"], "error": None}
        start = time.perf_counter()
        try:
            compiled = triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=target,
                                      options=options.__dict__)
            result.update(_resource_usage(compiled.asm["cubin"], cuobjdump))
            result["shared"] = compiled.metadata.shared
            result["global_ops"], result["accesses"] = global_accesses(compiled.asm["ptx"], pointer_params)
        except Exception as error:  # a compile error is a finding: report it, go on with the others
            result["error"] = f"{type(error).__name__}: {error}"[-4000:]
        result["compile_s"] = round(time.perf_counter() - start, 3)
        results[key] = result
    return results, keys


def _plain(value):
    """A constexpr value as JSON (bools, ints, None; dtypes and the rest as text)."""
    return value if value is None or isinstance(value, (bool, int, float)) else str(value)


def _worker_main(arch, in_path, out_path):
    with open(in_path) as file:
        launches = json.load(file)
    results, keys = compile_launches(arch, launches)
    with open(out_path, "w") as file:
        json.dump({"triton": triton.__version__, "arch": arch, "results": results, "keys": keys}, file)


def compile_all(workdir):
    """Record the launches for each arch and compile them in one subprocess per arch (in
    parallel), without TRITON_INTERPRET. Returns {arch: (results, [(launch, key)])}."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(Path(workdir) / "triton-cache")  # compile for real, every run
    workers, launches = {}, {}
    for arch, sm_count in ARCHS.items():
        launches[arch] = record_launches(sm_count)
        in_path, out_path = Path(workdir) / f"launches-sm{arch}.json", Path(workdir) / f"compiled-sm{arch}.json"
        in_path.write_text(json.dumps(launches[arch]))
        log = open(Path(workdir) / f"worker-sm{arch}.log", "w")
        workers[arch] = (subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--compile", str(arch),
                                           str(in_path), str(out_path)],
                                          env=env, cwd=workdir, stdout=log, stderr=subprocess.STDOUT),
                         log, out_path)
    compiled = {}
    for arch, (process, log, out_path) in workers.items():
        try:
            process.wait(timeout=WORKER_TIMEOUT_S)
        finally:
            if process.poll() is None:
                process.kill()
            log.close()
        if process.returncode != 0:
            tail = Path(log.name).read_text()[-6000:]
            raise RuntimeError(f"the sm_{arch} compile worker failed (exit {process.returncode}):\n{tail}")
        data = json.loads(out_path.read_text())
        compiled[arch] = (data["results"], list(zip(launches[arch], data["keys"])))
    return compiled


# ----------------------------------------------------------------------------- checks


def spilled(result):
    return result["stack"] > 0 or result["local"] > 0


def _is_vector_128(op):
    return re.fullmatch(r"(ld|st)\.global(\.[\w:]+)*\.v4\.b32", op) is not None


def vector_violations(result, launch):
    """Why the global accesses of an elementwise launch are not all 128-bit vectors ([] if they are).

    Full-size tensors are the tensor arguments with as many elements as the first one.
    """
    numel = launch["args"][0]["numel"]
    names = [p["name"] for p in result["params"]]
    full_size = {names[i] for i, a in enumerate(launch["args"]) if isinstance(a, dict) and a["numel"] == numel}
    accesses = {p: ops for p, ops in result["accesses"].items() if p in full_size}
    problems = [f"{p}: {op}" for p, ops in accesses.items() for op in ops if not _is_vector_128(op)]
    kinds = {op.split(".")[0] for ops in accesses.values() for op in ops}
    if kinds != {"ld", "st"}:
        problems.append(f"found no global {' and no '.join(sorted({'ld', 'st'} - kinds))} of a full-size tensor "
                        f"in the PTX (accesses: {result['accesses']})")
    return problems


def _aligned(launch):
    """Every tensor 16-byte aligned and the element count a multiple of 16."""
    tensors = [a for a in launch["args"] if isinstance(a, dict)]
    return all(a["data_ptr"] % 16 == 0 for a in tensors) and launch["args"][0]["numel"] % 16 == 0


def _missing_compiler_api():
    """Why this triton cannot compile here as JITFunction.run does (None if it can)."""
    try:
        from triton import knobs
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401
        from triton.runtime.jit import create_function_from_signature  # noqa: F401
        knobs.nvidia.cuobjdump.path  # noqa: B018 (raises RuntimeError when triton ships none)
    except (ImportError, AttributeError, RuntimeError) as error:
        return f"triton {triton.__version__} lacks what the compile test uses: {error!r}"
    return None


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """{arch: (results by specialization key, [(launch, key)])}: each specialization compiled once."""
    missing = _missing_compiler_api()
    if missing:
        pytest.skip(missing)
    return compile_all(tmp_path_factory.mktemp("triton-compiled"))


@pytest.mark.parametrize("arch", list(ARCHS), ids=[f"sm_{a}" for a in ARCHS])
def test_every_specialization_compiles(compiled, arch):
    results, _ = compiled[arch]
    errors = [f"{r['kernel']} ({r['description']}):\n{r['error']}" for r in results.values() if r["error"]]
    assert not errors, f"{len(errors)} of {len(results)} specializations fail to compile for sm_{arch}:\n\n" + \
        "\n\n".join(errors)


@pytest.mark.parametrize("arch", list(ARCHS), ids=[f"sm_{a}" for a in ARCHS])
def test_no_register_spills(compiled, arch):
    results, _ = compiled[arch]
    spills = [f"{r['kernel']} ({r['description']}): {r['registers']} registers, stack {r['stack']} B, "
              f"local {r['local']} B" for r in results.values() if not r["error"] and spilled(r)]
    assert not spills, f"specializations that spill on sm_{arch}:\n" + "\n".join(spills)


@pytest.mark.parametrize("arch", list(ARCHS), ids=[f"sm_{a}" for a in ARCHS])
def test_elementwise_accesses_are_128_bit_vectors(compiled, arch):
    results, launches = compiled[arch]
    checked, problems = set(), []
    for launch, key in launches:
        result = results[key]
        if result["module"] not in ELEMENTWISE_MODULES or not _aligned(launch) or key in checked:
            continue
        checked.add(key)
        if not result["error"]:
            problems += [f"{result['kernel']} ({launch['description']}): {p}"
                         for p in vector_violations(result, launch)]
    assert {results[key]["params"][0]["type"] for key in checked} == {"*fp32", "*fp16", "*bf16"}, \
        "not every dtype has an elementwise launch on aligned input"
    assert not problems, f"global accesses that are not 128-bit vectors on sm_{arch}:\n" + "\n".join(problems)


def test_vector_check_sees_misaligned_scalar_accesses(compiled):
    """The vector check has teeth: on a misaligned input (a view one element into its storage) the
    compiler must fall back to scalar accesses, and the check must say so for every such launch."""
    results, launches = compiled[90]
    misaligned = [(launch, results[key]) for launch, key in launches
                  if results[key]["module"] in ELEMENTWISE_MODULES and launch["args"][0]["data_ptr"] % 16
                  and not results[key]["error"]]
    assert misaligned, "no misaligned elementwise launch was recorded"
    for launch, result in misaligned:
        assert vector_violations(result, launch), f"{launch['description']}: {result['accesses']}"


def test_spill_check_sees_spills(compiled, tmp_path):
    """The spill check has teeth: the GroupNorm backward launch with the most registers, compiled
    again with at most half as many (ptxas' maxrregcount), must spill, and the cubin must show it."""
    results, launches = compiled[90]
    launch, key = max(((launch, key) for launch, key in launches
                       if results[key]["kernel"] == "_backward_kernel" and not results[key]["error"]),
                      key=lambda item: results[item[1]]["registers"])
    limit = results[key]["registers"] // 2
    launch = {**launch, "kwargs": {**launch["kwargs"], "maxnreg": limit}}
    in_path, out_path = tmp_path / "in.json", tmp_path / "out.json"
    in_path.write_text(json.dumps([launch]))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "cache")
    worker = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--compile", "90", str(in_path),
                             str(out_path)], env=env, cwd=tmp_path, capture_output=True, text=True,
                            timeout=WORKER_TIMEOUT_S)
    assert worker.returncode == 0, worker.stdout[-3000:] + worker.stderr[-3000:]
    (result,) = json.loads(out_path.read_text())["results"].values()
    assert result["error"] is None, result["error"]
    assert result["registers"] <= limit and spilled(result), result


def test_ptx_data_flow_attributes_accesses_to_parameters():
    ptx = """
        ld.param.b64 	%rd1, [k_param_0];
        ld.param.b64 	%rd2, [k_param_1];
        mov.u32 	%r1, %tid.x;
        mul.wide.u32 	%rd3, %r1, 16;
        add.s64 	%rd4, %rd1, %rd3;
        @%p1 ld.global.v4.b32 { %r2, %r3, %r4, %r5 }, [ %rd4 + 0 ];
        mul.wide.u32 	%rd5, %r2, 4;
        add.s64 	%rd6, %rd2, %rd5;
        ld.global.b32 	{ %r6 }, [ %rd6 + 0 ];   // a gather: the index was loaded from x
        add.s64 	%rd7, %rd2, %rd3;
        @%p1 st.global.v4.b32 [ %rd7 + 0 ], { %r2, %r3, %r4, %r6 };
    """
    ops, per_param = global_accesses(ptx, ["x_ptr", "out_ptr"])
    assert ops == ["ld.global.v4.b32", "ld.global.b32", "st.global.v4.b32"]
    assert per_param == {"x_ptr": ["ld.global.v4.b32"], "out_ptr": ["ld.global.b32", "st.global.v4.b32"]}
    assert _is_vector_128("ld.global.L1::evict_last.v4.b32") and not _is_vector_128("ld.global.v2.b32")


# ----------------------------------------------------------------------------- the table


def _specialization_tokens(result):
    """{param or option: text} of a specialization: pointer types (unaligned marked), integer
    specializations (=1, %16) and constexpr values."""
    tokens = {}
    for p in result["params"]:
        name = p["name"].removesuffix("_ptr")
        if p["type"] == "constexpr":
            value = p["value"]
            tokens[name] = f"{name}={int(value) if isinstance(value, bool) else value}"
        elif p["type"].startswith("*"):
            tokens[name] = f"{name}={p['type'][1:]}" + ("" if p["attr"] == "D" else " (unaligned)")
        else:
            tokens[name] = name + ("" if p["type"] == "i32" else f":{p['type']}") + ("%16" if p["attr"] == "D" else "")
    tokens["num_warps"] = f"warps={result['num_warps']}"
    for option, value in result["options"].items():
        if option != "num_warps":
            tokens[option] = f"{option}={int(value) if isinstance(value, bool) else value}"
    return tokens


def _table_rows(compiled):
    """{kernel: {label: {arch: result}}} and, per kernel, the tokens common to all its rows."""
    by_kernel = collections.defaultdict(dict)
    for arch, (results, _) in compiled.items():
        for result in results.values():
            by_kernel[result["kernel"]].setdefault(tuple(_specialization_tokens(result).items()), {})[arch] = result
    tables = {}
    for kernel, rows in by_kernel.items():
        names = [n for n, _ in next(iter(rows))]
        common = [n for n in names if len({dict(t)[n] for t in rows}) == 1]
        first = dict(next(iter(rows)))
        labelled = {}
        for tokens, per_arch in rows.items():
            label = " ".join(v for n, v in tokens if n not in common) or "(one specialization)"
            assert label not in labelled, f"two specializations of {kernel} share the label {label}"
            labelled[label] = per_arch
        tables[kernel] = ([first[n] for n in common], dict(sorted(labelled.items())))
    return tables


def _access_summary(result):
    counts = collections.Counter(op.replace("global.", "") for op in result["global_ops"])
    return ", ".join(f"{op} x{n}" for op, n in sorted(counts.items()))


def _resources(result):
    if result["error"]:
        return {"error": result["error"]}
    return {k: result[k] for k in ("registers", "stack", "local", "shared", "static_shared")}


def write_table(compiled, path=TABLE):
    """The markdown table at ``path`` and the same numbers as JSON beside it."""
    archs = sorted(compiled)
    count = {arch: len(compiled[arch][0]) for arch in archs}
    lines = [
        "# Triton kernels compiled for " + " and ".join(f"sm_{a}" for a in archs),
        "",
        f"- date: {datetime.date.today().isoformat()}",
        f"- triton {triton.__version__}, ptxas of its NVIDIA backend; torch {torch.__version__}",
        "- " + ", ".join(f"sm_{a}: {count[a]} specializations (GroupNorm plan for {ARCHS[a]} SMs)" for a in archs),
        "- made with `python tests/test_triton_compiled.py --write` (no GPU): every specialization the",
        "  launchers pick over the launches of `tests/test_triton_compiled.py`, compiled with",
        "  `triton.compile` and the launchers' options; resources from `cuobjdump --dump-resource-usage`.",
        "- regs: registers per thread; stack: stack frame bytes (spills; local memory was 0 everywhere",
        "  unless shown); smem: dynamic shared memory bytes the launch requests (the cubin's static",
        "  shared memory, 0 or 1 KiB, is in the JSON); global ld/st: PTX global loads and stores",
        f"  (vector width and element bits, instruction count) on sm_{archs[-1]}.",
        "- A label shows what varies among the kernel's specializations: pointer element types (and",
        "  `(unaligned)` when the pointer is not a multiple of 16 bytes), integer arguments divisible",
        "  by 16 (`%16`; `=1`: the JIT made it a constant), constexpr values, warps.",
        "",
    ]
    tables = _table_rows(compiled)
    data = {"date": datetime.date.today().isoformat(), "triton": triton.__version__, "torch": torch.__version__,
            "sm_count": {f"sm_{a}": ARCHS[a] for a in archs}, "kernels": {}}
    for kernel in sorted(tables):
        common, rows = tables[kernel]
        data["kernels"][kernel] = {"in_every_row": common, "rows": [
            {"specialization": label, "example_launch": per_arch[max(per_arch)]["description"],
             **{f"sm_{a}": _resources(per_arch[a]) for a in archs if a in per_arch}}
            for label, per_arch in rows.items()]}
        lines += [f"## {kernel}", "", "In every row: " + ", ".join(f"`{c}`" for c in common), ""]
        header = "| specialization | " + " | ".join(f"sm_{a} regs | stack | smem" for a in archs) + \
            " | global ld/st | example launch |"
        lines += [header, "|---|" + "---:|---:|---:|" * len(archs) + "---|---|"]
        for label, per_arch in rows.items():
            cells = []
            for arch in archs:
                r = per_arch.get(arch)
                if r is None:
                    cells += ["-", "-", "-"]
                elif r["error"]:
                    cells += ["error", "", ""]
                else:
                    local = f" (local {r['local']})" if r["local"] else ""
                    cells += [str(r["registers"]), f"{r['stack']}{local}", str(r["shared"])]
            last = per_arch[max(per_arch)]
            lines.append(f"| {label} | " + " | ".join(cells) +
                         f" | {_access_summary(last) if not last['error'] else ''} | {last['description']} |")
        lines.append("")
    path.write_text("\n".join(lines))
    path.with_suffix(".json").write_text(json.dumps(data, indent=1) + "\n")


def test_table_lists_every_specialization(compiled):
    """The committed table is current: it has a row for every specialization compiled here."""
    if not TABLE.exists():
        pytest.fail(f"{TABLE} is missing: run python tests/test_triton_compiled.py --write")
    text = TABLE.read_text()
    version = re.search(r"^- triton (\S+),", text, re.MULTILINE)
    if version is None or version.group(1) != triton.__version__:
        pytest.skip(f"the table was made with triton {version.group(1) if version else '?'}, this is "
                    f"{triton.__version__}: its specializations need not match")
    missing = [f"{kernel}: {label}" for kernel, (_, rows) in _table_rows(compiled).items() for label in rows
               if f"| {label} |" not in text]
    assert not missing, (f"{TABLE.name} lacks these specializations; regenerate it with "
                         f"`python tests/test_triton_compiled.py --write`:\n" + "\n".join(missing))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--write", action="store_true", help=f"compile everything and write {TABLE}")
    parser.add_argument("--compile", nargs=3, metavar=("ARCH", "LAUNCHES_JSON", "OUT_JSON"),
                        help="(internal) compile recorded launches for one arch")
    cli = parser.parse_args()
    if cli.compile:
        _worker_main(int(cli.compile[0]), cli.compile[1], cli.compile[2])
    elif cli.write:
        with tempfile.TemporaryDirectory() as workdir:
            start = time.perf_counter()
            results = compile_all(workdir)
            write_table(results)
            print(f"wrote {TABLE} ({time.perf_counter() - start:.0f} s)")
    else:
        parser.print_help()
