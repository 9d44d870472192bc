"""The CUDA kernels of csrc/cuda/, executed on the CPU under the CUDA emulation.

ddpm_fast.testing.cuda_emulation() builds csrc/cuda/*.cu and the CUDA op bodies of
csrc/*_ops.cpp with the host compiler against csrc/include/ddpm_fast/cuda_emulation.h: threads
of a block interleave as fibers at every barrier and warp shuffle (one warp running ahead of the
others), __shared__ memory is NaN-filled before each block, __trap() is a launch error, and a
misaligned vector access or an out-of-bounds index into a fixed-size array is one too.

Every kernel is compared with ddpm_fast.reference in float64 with the tolerances the other
backends meet (tests/test_diffusion_steps_ops.py, tests/test_group_norm_silu.py). Inputs sit in
NaN-filled storage (a read before or past a tensor gives NaN) and outputs are NaN-poisoned by
torch's deterministic mode (an unwritten element stays NaN).
"""

import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

from ddpm_fast import _ext, reference, schedules, testing
from ddpm_fast.samplers import coefficients

T = 1000
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DTYPE_IDS = ["fp32", "fp16", "bf16"]
ALIGNED, MISALIGNED = 4, 1  # storage offset in elements: the vector path, the scalar path
SEED = 0x1234_5678_9ABC_DEF  # both 32-bit halves of the Philox key non-zero
# Sources to build (tests/cuda_mutations.py points this at mutated copies); default: the project's.
SOURCE_DIR = os.environ.get("DDPM_FAST_EMULATION_SOURCES") or None


@pytest.fixture(scope="module")
def emu():
    try:
        return testing.cuda_emulation(SOURCE_DIR)
    except testing.EmulationUnavailable as error:
        pytest.skip(f"the CUDA emulation cannot be built here: {error}")


# Every test runs with outputs poisoned: an element a kernel does not write stays NaN.
pytestmark = pytest.mark.usefixtures("poisoned_outputs")


def _layout(x, layout):
    if layout == "contiguous":
        return x
    return x.to(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d)


def _guarded(x, offset=ALIGNED):
    """x, with its strides, at `offset` elements into a NaN-filled storage with room after it."""
    storage = torch.full((offset + x.numel() + 16,), float("nan"), dtype=x.dtype)
    out = storage.as_strided(x.shape, x.stride(), offset)
    out.copy_(x)
    assert out.storage_offset() == offset and out.stride() == x.stride()
    return out


def _max_err(out, ref64):
    return (out.double() - ref64).abs().max().item()


# ----------------------------------------------------------------------------- diffusion steps

# (shape, layout): a tail group of 3 (147 elements, batch 1), groups of 4 crossing a batch
# boundary (17 and 243 elements per batch), channels_last, 5-D, and a 13-block grid.
STEP_SHAPES = [((1, 3, 7, 7), "contiguous"), ((3, 17), "contiguous"), ((5, 3, 9, 9), "channels_last"),
               ((2, 2, 3, 5, 5), "contiguous"), ((4, 3, 33, 33), "channels_last")]
STEP_IDS = ["1x3x7x7", "3x17", "5x3x9x9-cl", "2x2x3x5x5", "4x3x33x33-cl"]


def _step_inputs(shape, layout, dtype, offset, seed=0):
    g = torch.Generator().manual_seed(seed)
    x, m, noise = (_guarded(_layout(torch.randn(shape, generator=g), layout).to(dtype), offset) for _ in range(3))
    t = torch.randint(0, T, (shape[0],), generator=g)
    t[0] = 0  # always a t == 0 row (no noise in the DDPM table) and the last one
    if shape[0] > 1:
        t[-1] = T - 1
    return x, m, noise, t


def _quantities():
    return schedules.diffusion_quantities(schedules.linear_betas(T))


def _sampler_table(sampler, guidance_scale=1.0, prediction_type="epsilon", variance_type="posterior"):
    """A float32 [R, 8] sampler-step table as the samplers build it (ddpm_fast.samplers.coefficients)."""
    q = _quantities()
    if sampler.startswith("ddpm"):
        table = coefficients.ddpm_rows(q, prediction_type, variance_type)
    elif sampler.startswith("ddim"):  # row k: the step from timestep k to the previous one (k = 0: to x_0)
        abar = q["alphas_cumprod"]
        steps = schedules.ddim_timesteps(T, 50).flip(0)  # ascending
        prev = torch.cat([torch.ones(1, dtype=torch.float64), abar[steps[:-1]]])
        table = coefficients.ddim_rows(abar[steps], prev, 0.0 if sampler == "ddim-eta0" else 1.0, prediction_type)
    else:
        _, sigmas = schedules.dpm_solver_timesteps(q["alphas_cumprod"], 20)
        table = coefficients.dpm_solver_rows(sigmas, 3 if sampler == "dpm-3m" else 2, False, prediction_type,
                                             sde=sampler == "sde-2m")
    return coefficients.with_guidance(table, guidance_scale).float()


# Each sampler's call: (noise kind, h1 given, h2 given, store_x0).
SAMPLERS = {"ddpm-given": ("given", False, False, False), "ddpm-drawn": ("drawn", False, False, False),
            "ddim-eta0": ("none", False, False, False), "ddim-eta1": ("drawn", False, False, False),
            "dpm-2m": ("none", True, False, True), "dpm-3m": ("none", True, True, True),
            "sde-2m": ("drawn", True, False, True)}
GUIDANCE_SCALE = 7.5


def assert_matches_reference(out, ref_fn, inputs, scale=None):
    """out vs ref_fn(*inputs) in float64; fp32 within 1e-6 of `scale` (default: the output's),
    fp16/bf16 within 2x the same-dtype reference's error. Returns (error, reference's error)."""
    assert not torch.isnan(out).any(), "an output element was not written or read a NaN guard"
    as64 = [v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v for v in inputs]
    ref64 = ref_fn(*as64)
    scale = ref64.abs().max().item() if scale is None else scale
    err = _max_err(out, ref64)
    ref_err = _max_err(ref_fn(*inputs), ref64)  # tables are float32; the reference casts them to x's dtype
    if out.dtype == torch.float32:
        assert err <= 1e-6 * scale, f"fp32 error {err:.3g} exceeds 1e-6 x scale {scale:.3g}"
    else:
        assert err <= 2 * ref_err + 1e-6 * scale, f"{out.dtype} error {err:.3g} vs reference's {ref_err:.3g}"
    return err, ref_err


def _drawn(x, seed=SEED):
    """The kernel's in-kernel noise for x: the reference Philox normals, rounded to x's dtype."""
    return reference.philox_normal_like(x, seed).to(x.dtype)


@pytest.mark.parametrize("noise_mode", ["given", "drawn"])
@pytest.mark.parametrize("offset", [ALIGNED, MISALIGNED], ids=["vector", "scalar"])
@pytest.mark.parametrize("shape,layout", STEP_SHAPES, ids=STEP_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_q_sample(emu, dtype, shape, layout, offset, noise_mode):
    x, _, noise, t = _step_inputs(shape, layout, dtype, offset)
    table = schedules.q_sample_table(_quantities()).float()
    seed = torch.tensor([SEED])
    out, drawn = emu.q_sample(x, t, table, noise if noise_mode == "given" else None,
                              seed if noise_mode == "drawn" else None)
    assert out.stride() == x.stride()
    if noise_mode == "drawn":
        assert drawn.stride() == x.stride() and not torch.isnan(drawn).any()
        tol = 1e-5 if dtype == torch.float32 else 1e-2
        torch.testing.assert_close(drawn.float(), _drawn(x).float(), rtol=tol, atol=tol)
        noise = drawn  # the value returned is the value used
    else:
        assert drawn.numel() == 0
    assert_matches_reference(out, reference.q_sample, (x, t, table, noise))


# (shape, layout, storage offset): a tail group of 3 (147 elements, batch 1), groups of 4 crossing
# a batch boundary (17 and 243 elements per batch), channels_last, 5-D, a 13-block grid. A guided
# call takes the vector path only when numel % 4 == 0 (its m_u starts numel elements in).
SAMPLER_CASES = [((1, 3, 7, 7), "contiguous", ALIGNED), ((3, 17), "contiguous", MISALIGNED),
                 ((5, 3, 9, 9), "channels_last", ALIGNED), ((2, 2, 3, 5, 5), "contiguous", MISALIGNED),
                 ((2, 4, 6, 6), "contiguous", ALIGNED), ((4, 3, 33, 33), "channels_last", ALIGNED)]
SAMPLER_CASE_IDS = ["1x3x7x7-vector", "3x17-scalar", "5x3x9x9-cl-vector", "2x2x3x5x5-scalar", "2x4x6x6-vector",
                    "4x3x33x33-cl-vector"]


def _sampler_inputs(sampler, guided, shape, layout, dtype, offset, seed=0, **table_kw):
    """The arguments of sampler_step after clip_denoised, as a dict (h1, h2, noise, seed: None when absent)."""
    g = torch.Generator().manual_seed(seed)

    def tensor(batch=shape[0]):
        return _guarded(_layout(torch.randn((batch, *shape[1:]), generator=g), layout).to(dtype), offset)

    noise_kind, has_h1, has_h2, store_x0 = SAMPLERS[sampler]
    x, m, h1, h2, noise = tensor(), tensor(2 * shape[0] if guided else shape[0]), tensor(), tensor(), tensor()
    table = _sampler_table(sampler, guidance_scale=GUIDANCE_SCALE if guided else 1.0, **table_kw)
    index = torch.randint(0, len(table), (shape[0],), generator=g)
    index[0] = 0  # always the first row (DDPM: no noise) and the last one
    if shape[0] > 1:
        index[-1] = len(table) - 1
    return dict(x=x, model_output=m, index=index, table=table, h1=h1 if has_h1 else None,
                h2=h2 if has_h2 else None, noise=noise if noise_kind == "given" else None,
                seed=torch.tensor([SEED]) if noise_kind == "drawn" else None, store_x0=store_x0)


def _term_scales(x, m, index, table, h1, h2, z):
    """Max over elements of the sum of |terms| of x0 and of x_out: what fp32 rounding is relative to."""
    x, m, b = x.double(), m.double(), x.shape[0]
    c = [col.abs() for col in reference._rows(table.double(), index, x)]
    m_abs = m.abs() if m.shape[0] == b else m[b:].abs() + c[reference.GUIDANCE_SCALE] * (m[:b].abs() + m[b:].abs())
    x0 = c[reference.X0_FROM_X] * x.abs() + c[reference.X0_FROM_MODEL] * m_abs
    out = c[reference.OUT_FROM_X] * x.abs() + c[reference.OUT_FROM_X0] * x0
    for column, term in ((reference.OUT_FROM_H1, h1), (reference.OUT_FROM_H2, h2), (reference.OUT_FROM_Z, z)):
        if term is not None:
            out = out + c[column] * term.double().abs()
    return x0.max().item(), out.max().item()


def check_sampler_step(op, inputs, clip):
    """Runs op (an emulated or CPU sampler_step) and checks both outputs; returns [(err, ref_err)] of each."""
    a = inputs
    x = a["x"]
    out, x0 = op(x, a["model_output"], a["index"], a["table"], clip, a["h1"], a["h2"], a["noise"], a["seed"],
                 a["store_x0"])
    z = _drawn(x) if a["seed"] is not None else a["noise"]
    ref_inputs = (x, a["model_output"], a["index"], a["table"], clip, a["h1"], a["h2"], z, True)
    scales = _term_scales(x, a["model_output"], a["index"], a["table"], a["h1"], a["h2"], z)
    errors = []
    for which, got in ((0, out), (1, x0)):
        if which == 1 and not a["store_x0"]:
            assert got.numel() == 0, "x0 must be empty without store_x0"
            continue
        assert got.dtype == x.dtype and got.shape == x.shape and got.stride() == x.stride()
        errors.append(assert_matches_reference(got, lambda *r, w=which: reference.sampler_step(*r)[w], ref_inputs,
                                               scales[1 - which]))
    return errors


@pytest.mark.parametrize("guided", [False, True], ids=["unguided", "guided"])
@pytest.mark.parametrize("sampler", list(SAMPLERS))
@pytest.mark.parametrize("shape,layout,offset", SAMPLER_CASES, ids=SAMPLER_CASE_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_sampler_step(emu, dtype, shape, layout, offset, sampler, guided):
    inputs = _sampler_inputs(sampler, guided, shape, layout, dtype, offset)
    for clip in (False, True):
        check_sampler_step(emu.sampler_step, inputs, clip)


@pytest.mark.parametrize("prediction_type", schedules.PREDICTION_TYPES)
def test_sampler_tables_of_every_parametrisation(emu, prediction_type):
    for sampler, variance_type in (("ddpm-given", "posterior"), ("ddpm-given", "beta"), ("ddim-eta0", "posterior"),
                                   ("ddim-eta1", "posterior"), ("dpm-2m", "posterior")):
        inputs = _sampler_inputs(sampler, False, (4, 3, 5, 5), "contiguous", torch.float32, ALIGNED,
                                 prediction_type=prediction_type, variance_type=variance_type)
        for clip in (False, True):
            check_sampler_step(emu.sampler_step, inputs, clip)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_in_kernel_noise_is_the_cpu_kernels(emu, layout):
    """The same Philox counters and keys as the CPU kernel: equal to the rounding of log/sin/cos."""
    x = _guarded(_layout(torch.zeros(3, 3, 9, 9), layout))  # 729 elements: a tail group
    t = torch.zeros(3, dtype=torch.long)
    table = torch.tensor([[0.0, 1.0]])  # x_t = noise
    step_table = torch.tensor([[0.0] * 7 + [1.0]])  # x_out = z
    for seed in (SEED, -7, 3):  # -7: the high half of the key is 0xffffffff
        seed_tensor = torch.tensor([seed])
        out, drawn = emu.q_sample(x, t, table, None, seed_tensor)
        expected = reference.philox_normal_like(x, seed)
        assert (drawn - expected).abs().max() < 1e-5, "the emulated kernel's normals are not the reference's"
        torch.testing.assert_close(out, drawn, rtol=0, atol=0)
        step_out, _ = emu.sampler_step(x, x, t, step_table, False, None, None, None, seed_tensor, False)
        torch.testing.assert_close(step_out, drawn, rtol=0, atol=0)  # the step draws the same numbers
        if _ext.loaded:
            _, cpu_drawn = torch.ops.ddpm_fast.q_sample(x, t, table, None, seed_tensor)
            assert (drawn - cpu_drawn).abs().max() < 1e-5, "the CUDA kernel's normals are not the CPU kernel's"
            cpu_step, _ = torch.ops.ddpm_fast.sampler_step(x, x, t, step_table, False, None, None, None, seed_tensor,
                                                           False)
            assert (step_out - cpu_step).abs().max() < 1e-5, "the CUDA step's normals are not the CPU step's"


# A kernel that read the row of t = T or t = -1 would read just outside the table; a far-off t,
# whose row would be unmapped memory, is tried in the subprocess of the next test.
@pytest.mark.parametrize("bad_t", [T, -1])
def test_out_of_range_t_is_a_launch_error(emu, bad_t):
    x, m, noise, t = _step_inputs((3, 3, 4, 4), "contiguous", torch.float32, ALIGNED)
    t[1] = bad_t
    error = r"CUDA kernel launch failed: unspecified launch failure .*__trap\(\)"
    with pytest.raises(RuntimeError, match=error):
        emu.q_sample(x, t, schedules.q_sample_table(_quantities()).float(), noise, None)
    for sampler in SAMPLERS:
        for guided in (False, True):
            a = _sampler_inputs(sampler, guided, (3, 3, 4, 4), "contiguous", torch.float32, ALIGNED)
            a["index"] = t.clamp(min=0) % len(a["table"])
            a["index"][1] = len(a["table"]) if bad_t >= 0 else bad_t
            with pytest.raises(RuntimeError, match=error):
                emu.sampler_step(a["x"], a["model_output"], a["index"], a["table"], True, a["h1"], a["h2"],
                                 a["noise"], a["seed"], a["store_x0"])


# Tables whose rows end (and start) at a page boundary next to an unreadable page: a kernel that
# read row t = T (or t = -1) before trapping would die of SIGSEGV.
_GUARD_PAGES = textwrap.dedent("""
    import ctypes, mmap, sys
    import torch

    PROT_NONE, PROT_READ_WRITE = 0, 3
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]

    def fenced_table(rows, columns):
        page = mmap.PAGESIZE
        data_pages = rows * columns * 4 // page
        assert data_pages * page == rows * columns * 4
        buf = mmap.mmap(-1, (data_pages + 2) * page)
        base = ctypes.addressof(ctypes.c_char.from_buffer(buf))
        for guard in (base, base + (data_pages + 1) * page):
            assert libc.mprotect(guard, page, PROT_NONE) == 0
        table = torch.frombuffer(buf, dtype=torch.float32, offset=page, count=rows * columns).view(rows, columns)
        table.fill_(0.5)
        return table, base

    if sys.argv[1] == "read-guard":  # the fence itself works: reading past the table faults
        table, base = fenced_table(mmap.PAGESIZE // 4, 2)
        print(table.flatten()[-1].item(), flush=True)
        ctypes.string_at(base + mmap.PAGESIZE + table.numel() * 4, 1)
        sys.exit(0)

    from ddpm_fast import testing
    emu = testing.cuda_emulation(sys.argv[2])
    q_rows, step_rows = mmap.PAGESIZE // 8, mmap.PAGESIZE // 32  # [rows, 2] and [rows, 8]: whole pages
    q_table, _ = fenced_table(q_rows, 2)
    step_table, _ = fenced_table(step_rows, 8)
    x = torch.randn(3, 4, 5)
    guided = torch.randn(6, 4, 5)
    seed = torch.tensor([1])
    emu.q_sample(x, torch.tensor([0, q_rows - 1, 1]), q_table, x, None)  # the first and last rows are readable
    emu.sampler_step(x, guided, torch.tensor([0, step_rows - 1, 1]), step_table, False, x, x, None, seed, True)
    for bad in ("last + 1", -1, 2**40):
        t = torch.tensor([0, q_rows if bad == "last + 1" else bad, q_rows - 1])
        index = torch.tensor([0, step_rows if bad == "last + 1" else bad, step_rows - 1])
        for call in (lambda: emu.q_sample(x, t, q_table, None, seed),
                     lambda: emu.sampler_step(x, x, index, step_table, True, None, None, x, None, False),
                     lambda: emu.sampler_step(x, guided, index, step_table, False, x, x, None, seed, True),
                     lambda: emu.sampler_step(x, x, index, step_table, False, x, None, None, None, True)):
            try:
                call()
            except RuntimeError as error:
                assert "__trap()" in str(error), error
            else:
                raise AssertionError(f"t = {bad} gave no launch error")
    print("no read outside the tables")
""")


def _run_guard_script(tmp_path, *args):
    script = tmp_path / "guard_pages.py"
    script.write_text(_GUARD_PAGES)
    return subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, cwd=tmp_path,
                          timeout=300)


def test_out_of_range_t_reads_nothing(emu, tmp_path):
    fence = _run_guard_script(tmp_path, "read-guard")
    assert fence.returncode == -11, f"reading the guard page should fault:\n{fence.stdout}{fence.stderr}"
    result = _run_guard_script(tmp_path, "kernels", SOURCE_DIR or testing.default_source_dir())
    assert result.returncode == 0, f"exit status {result.returncode}:\n{result.stdout}{result.stderr}"
    assert "no read outside the tables" in result.stdout


# ----------------------------------------------------------------------------- GroupNorm + SiLU

# Relative error allowed on top of "twice the same-dtype reference's error" (as in test_group_norm_silu.py).
SLACK = {torch.float32: 1e-6, torch.float16: 1e-4, torch.bfloat16: 1e-3}
# (shape, groups): the forward path and its items per thread follow from D = C / G * spatial.
GNS_CASES = [
    ((1, 96, 7, 7), 32),    # N = 1, C = 96 with 32 groups, 7x7: one pass, 1 item per thread (D = 147)
    ((2, 12, 10), 3),       # 1-D spatial (D = 40)
    ((2, 8, 3, 4, 5), 4),   # 3-D spatial, channels_last_3d (D = 120)
    ((2, 6, 10, 10), 1),    # one pass, 2 items (D = 600)
    ((1, 2, 30, 30), 1),    # one pass, 4 items (D = 1800)
    ((1, 4, 28, 28), 1),    # one pass, 8 items (D = 3136)
    ((1, 3, 40, 40), 1),    # one pass, 16 items (D = 4800)
    ((2, 8, 33, 33), 1),    # the chunked path (D = 8712 > 8192)
    ((2, 40, 3, 3), 5),     # channels_last backward: C = 40, a partial 32-channel block
]
GNS_IDS = ["1x96x7x7-G32", "2x12x10-G3", "2x8x3x4x5-G4", "2x6x10x10-G1", "1x2x30x30-G1", "1x4x28x28-G1",
           "1x3x40x40-G1", "2x8x33x33-G1-chunked", "2x40x3x3-G5"]


def _gns_inputs(shape, layout, dtype, affine, seed=0):
    g = torch.Generator().manual_seed(seed)
    if layout == "channels_last" and len(shape) == 3:  # no memory format: channels innermost
        lay = lambda v: v.transpose(1, -1).contiguous().transpose(1, -1)  # noqa: E731
    else:
        lay = lambda v: _layout(v, layout)  # noqa: E731
    x = _guarded(lay(torch.randn(shape, generator=g) * 1.5 + 0.7).to(dtype))
    grad_y = _guarded(lay(torch.randn(shape, generator=g)).to(dtype))
    weight = bias = None
    if affine:  # non-trivial gamma and beta, of both signs
        weight = (torch.randn(shape[1], generator=g) * 0.8 + 0.5).to(dtype)
        bias = (torch.randn(shape[1], generator=g) * 0.5).to(dtype)
    return x, weight, bias, grad_y


def _reference_grads(x, weight, bias, grad_y, groups, dtype):
    """(y, dx, dgamma, dbeta) of the reference through autograd, in `dtype`."""
    leaves = [v.detach().to(dtype).requires_grad_() if v is not None else None for v in (x, weight, bias)]
    y = reference.group_norm_silu(*leaves, groups)
    y.backward(grad_y.to(dtype))
    return [y.detach()] + [v.grad if v is not None else None for v in leaves]


def _rel_err(out, ref64):
    return ((out.double() - ref64).abs().max() / ref64.abs().max().clamp_min(1e-12)).item()


def _gns_run(emu, x, weight, bias, grad_y, groups):
    y, mean, rstd = emu.group_norm_silu(x, weight, bias, groups, 1e-5)
    dx, dgamma, dbeta = emu.group_norm_silu_backward(grad_y, x, weight, bias, mean, rstd, groups)
    return y, mean, rstd, dx, dgamma, dbeta


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("shape,groups", GNS_CASES, ids=GNS_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_group_norm_silu(emu, dtype, shape, groups, layout, affine):
    _check_group_norm_silu(emu, dtype, shape, groups, layout, affine)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_group_norm_silu_many_groups(emu, layout):
    """N * G = 288 > 256: the per-group coefficients of the backward come from two blocks."""
    _check_group_norm_silu(emu, torch.float32, (3, 96, 3, 3), 96, layout, True)


def _check_group_norm_silu(emu, dtype, shape, groups, layout, affine):
    x, weight, bias, grad_y = _gns_inputs(shape, layout, dtype, affine)
    y, mean, rstd, dx, dgamma, dbeta = _gns_run(emu, x, weight, bias, grad_y, groups)
    exact = _reference_grads(x, weight, bias, grad_y, groups, torch.float64)
    same_dtype = _reference_grads(x, weight, bias, grad_y, groups, dtype)
    for name, out, ref64, ref in zip(("y", "dx", "dgamma", "dbeta"), (y, dx, dgamma, dbeta), exact, same_dtype):
        if ref64 is None:
            assert out.numel() == 0, f"{name} without affine parameters must be empty"
            continue
        assert out.dtype == dtype, f"{name}: dtype {out.dtype}"
        assert not torch.isnan(out).any(), f"{name}: an element was not written or read a NaN guard"
        err, ref_err = _rel_err(out, ref64), _rel_err(ref, ref64)
        assert err <= 2 * ref_err + SLACK[dtype], \
            f"{name}: relative error {err:.3g}, same-dtype reference {ref_err:.3g}"
    if x.dim() >= 4 or layout == "contiguous":  # (a 3-D channels-innermost x is copied to contiguous first)
        assert y.stride() == x.stride() and dx.stride() == x.stride(), "the outputs lost x's layout"
    ref_mean, ref_rstd = reference.group_norm_silu_stats(x, groups, 1e-5)
    torch.testing.assert_close(mean, ref_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(rstd, ref_rstd, rtol=1e-5, atol=1e-6)


def test_results_do_not_depend_on_the_schedule(emu, monkeypatch):
    """Race-free kernels with fixed reduction orders give the same bits for any thread order."""
    runs = []
    for schedule in ("0", "1", "12345"):
        monkeypatch.setenv("DDPM_FAST_EMULATION_SCHEDULE", schedule)
        outputs = []
        for shape, groups, layout in (((1, 96, 7, 7), 32, "contiguous"), ((2, 40, 3, 3), 5, "channels_last"),
                                      ((2, 8, 33, 33), 1, "contiguous")):
            outputs += _gns_run(emu, *_gns_inputs(shape, layout, torch.float32, True), groups)
        a = _sampler_inputs("sde-2m", True, (4, 3, 33, 33), "channels_last", torch.float16, ALIGNED)
        outputs += emu.sampler_step(a["x"], a["model_output"], a["index"], a["table"], True, a["h1"], a["h2"],
                                    a["noise"], a["seed"], a["store_x0"])
        runs.append(outputs)
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            assert torch.equal(a, b)


# ----------------------------------------------------------------------------- the emulation itself


def test_emulation_semantics(tmp_path):
    """Barriers, every shuffle kind and width, NaN-filled shared memory, launch errors and the
    thread schedule, on the small kernels of tests/cuda_emulation_selftest.cpp (no torch)."""
    try:
        cuda_include = testing.cuda_include_dir()
    except testing.EmulationUnavailable as error:
        pytest.skip(f"the CUDA emulation cannot be built here: {error}")
    source_dir = SOURCE_DIR or testing.default_source_dir()
    program = tmp_path / "selftest"
    build = subprocess.run(
        [os.environ.get("CXX", "c++"), "-std=c++17", "-O1", *testing.EMULATION_CFLAGS,
         "-I", os.path.join(source_dir, "include"), "-I", cuda_include,
         os.path.join(os.path.dirname(os.path.abspath(__file__)), "cuda_emulation_selftest.cpp"),
         os.path.join(source_dir, "emulation", "cuda_emulation.cpp"), "-o", str(program), "-pthread"],
        capture_output=True, text=True)
    assert build.returncode == 0, build.stderr
    result = subprocess.run([str(program)], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "all emulation checks passed" in result.stdout


# ----------------------------------------------------------------------------- the op set


def test_every_cuda_op_is_emulated_with_its_schema(emu):
    names = set(vars(emu))
    assert {"q_sample", "sampler_step", "group_norm_silu", "group_norm_silu_backward"} <= names
    for name in names:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"{testing.OP_NAMESPACE}::{name}", "CPU")
    if not _ext.loaded:
        return
    extension_ops = {n.split("::", 1)[1] for n in torch._C._dispatch_get_all_op_names() if n.startswith("ddpm_fast::")}
    if _ext.with_cuda:
        extension_ops = {n for n in extension_ops if torch._C._dispatch_has_kernel_for_dispatch_key(
            f"ddpm_fast::{n}", "CUDA")}
    assert names == extension_ops
    for name in names:
        emulated = str(getattr(emu, name).default._schema)
        assert emulated.replace(f"{testing.OP_NAMESPACE}::", "ddpm_fast::", 1) == \
            str(getattr(torch.ops.ddpm_fast, name).default._schema)


def test_one_build_per_process(emu, tmp_path):
    assert testing.cuda_emulation(SOURCE_DIR) is emu  # cached: no second build or load
    other = tmp_path / "csrc"
    shutil.copytree(SOURCE_DIR or testing.default_source_dir(), other)
    with open(other / "cuda" / "diffusion_steps.cu", "a") as f:
        f.write("// another source state\n")
    with pytest.raises(RuntimeError, match="already loaded in this process"):
        testing.cuda_emulation(str(other))


def test_not_part_of_the_extension():
    """ddpm_fast._C has no emulated ops and no emulation engine in it."""
    if not _ext.loaded:
        pytest.skip(f"the C++ extension is not loaded: {_ext.reason}")
    import ddpm_fast._C as ext

    with open(ext.__file__, "rb") as f:
        assert b"ddpm_fast_emu" not in f.read()
    assert os.path.basename(ext.__file__).startswith("_C")
