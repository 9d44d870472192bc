"""q_sample and the step ops of earlier releases on every backend against reference.py.

``ops.reverse_step``, ``ops.ddim_step`` and ``ops.dpm_solver_step`` keep their signatures and
[T, 5] tables; they run on the sampler step, whose own tests (every backend, term, layout,
autograd, opcheck) are in test_sampler_step.py. Here they are checked against the legacy
formula they always had: written out by hand once (test_legacy_tables_map_onto_the_sampler_step)
and otherwise as ``reference.sampler_step`` on ``reference.sampler_table_from_legacy``.

Outputs are compared with the reference computed in float64 from the same inputs and noise:
fp32 within 1e-6 relative (of the output's scale), fp16/bf16 within twice the error of the
reference computed in that dtype. Every run happens with torch's deterministic mode on, which
fills each freshly allocated output with NaN, so an element a kernel fails to write fails.
"""

import os

import pytest
import torch

from conftest import backend_params
from ddpm_fast import GaussianDiffusion, ops, reference, schedules
from ddpm_fast.ops._common import draw_seed
from ddpm_fast.samplers import coefficients

T = 1000
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (shape, memory format); the interpreter runs Triton programs through numpy: keep them small.
SHAPES = [((1, 3, 7, 7), "contiguous"), ((5, 3, 33, 33), "contiguous"), ((5, 3, 33, 33), "channels_last"),
          ((2, 3, 8, 8), "channels_last"), ((3, 17), "contiguous"), ((2, 2, 3, 5, 5), "contiguous")]
BACKENDS = backend_params(include_torch=False)


# Every test runs with outputs poisoned: an element a kernel does not write stays NaN.
pytestmark = pytest.mark.usefixtures("poisoned_outputs")


def _layout(x, fmt):
    return x.to(memory_format=torch.channels_last) if fmt == "channels_last" else x


def _inputs(shape, fmt, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = _layout(torch.randn(shape, generator=g), fmt).to(device=device, dtype=dtype)
    m = _layout(torch.randn(shape, generator=g), fmt).to(device=device, dtype=dtype)
    noise = _layout(torch.randn(shape, generator=g), fmt).to(device=device, dtype=dtype)
    t = torch.randint(0, T, (shape[0],), generator=g).to(device)
    t[0] = 0  # always exercise the last step (no noise) and the first
    if shape[0] > 1:
        t[-1] = T - 1
    return x, m, noise, t


def _tables(device, prediction_type="epsilon", variance_type="posterior"):
    q = schedules.diffusion_quantities(schedules.linear_betas(T))
    return (schedules.q_sample_table(q).float().to(device),
            coefficients.reverse_step_table(q, prediction_type, variance_type).float().to(device))


def legacy_step(x, m, t, table, clip=False, z=None, previous_x0=False):
    """(x_out, x0) of a legacy step: x0 = A x + B m (clamped with clip), x_out = P x0 + Q x + S z,
    with (A, B, P, Q, S) = table[t]; z the noise, or the previous x0 (DPM-Solver++)."""
    sampler_table = reference.sampler_table_from_legacy(table, previous_x0)
    h1, noise = (z, None) if previous_x0 else (None, z)
    return reference.sampler_step(x, m, t, sampler_table, clip, h1, None, noise, True)


def reverse_step_ref(clip):
    """reference of ops.reverse_step / ddim_step as a function of (x_t, model_output, t, table[, noise])."""
    return lambda x, m, t, table, z=None: legacy_step(x, m, t, table, clip, z)[0]


def assert_matches_reference(out, ref_fn, inputs):
    """out vs ref_fn(*inputs) in float64; fp16/bf16 within 2x the same-dtype reference's error."""
    assert not torch.isnan(out).any(), "an output element was not written (NaN poison survived)"
    as64 = [v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v for v in inputs]
    ref64 = ref_fn(*as64)
    scale = ref64.abs().max().item()
    err = (out.double() - ref64).abs().max().item()
    if out.dtype == torch.float32:
        assert err <= 1e-6 * scale, f"fp32 error {err:.3g} exceeds 1e-6 x scale {scale:.3g}"
    else:
        same_dtype = [v.float() if isinstance(v, torch.Tensor) and v.dtype == torch.float32 and v.dim() == 2
                      else v for v in inputs]  # tables are float32; the reference casts them to x's dtype
        ref_err = (ref_fn(*same_dtype).double() - ref64).abs().max().item()
        assert err <= 2 * ref_err + 1e-6 * scale, f"{out.dtype} error {err:.3g} vs reference's {ref_err:.3g}"
    return err


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,fmt", SHAPES)
@pytest.mark.parametrize("backend,device", BACKENDS)
def test_q_sample_given_noise(backend, device, dtype, shape, fmt):
    x, _, noise, t = _inputs(shape, fmt, dtype, device)
    q_table, _ = _tables(device)
    out, returned = ops.q_sample(x, t, q_table, noise=noise, backend=backend)
    assert returned is noise
    assert out.dtype == dtype and out.shape == x.shape and out.stride() == x.stride()
    assert_matches_reference(out, reference.q_sample, (x, t, q_table, noise))


@pytest.mark.parametrize("op", ["reverse_step", "ddim_step"])
@pytest.mark.parametrize("clip", [False, True], ids=["noclip", "clip"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend,device", BACKENDS)
def test_step_given_noise(backend, device, dtype, clip, op):
    _, table = _tables(device)
    for shape, fmt in SHAPES[::2]:  # the layouts; every shape of the step: test_sampler_step.py
        x, m, noise, t = _inputs(shape, fmt, dtype, device)
        out = getattr(ops, op)(x, m, t, table, clip_denoised=clip, noise=noise, backend=backend)
        assert out.dtype == dtype and out.shape == x.shape and out.stride() == x.stride()
        assert_matches_reference(out, reverse_step_ref(clip), (x, m, t, table, noise))


def test_legacy_tables_map_onto_the_sampler_step():
    """reference.sampler_table_from_legacy keeps the legacy formula, written out here in float64."""
    x, m, noise, t = _inputs((3, 3, 5, 5), "contiguous", torch.float64, "cpu")
    _, table = _tables("cpu", "v")
    a, b, p, q, s = (table.double()[t, k].reshape(-1, 1, 1, 1) for k in range(reference.LEGACY_STEP_COLUMNS))
    for clip in (False, True):
        x0 = a * x + b * m
        x0 = x0.clamp(-1, 1) if clip else x0
        for z, previous_x0 in ((noise, False), (None, False), (noise, True)):
            out, got_x0 = legacy_step(x, m, t, table, clip, z, previous_x0)
            expected = p * x0 + q * x + (0 if z is None else s * z)
            torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(got_x0, x0, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("prediction_type", schedules.PREDICTION_TYPES)
@pytest.mark.parametrize("variance_type", schedules.VARIANCE_TYPES)
@pytest.mark.parametrize("backend,device", BACKENDS)
def test_step_tables_of_every_parametrisation(backend, device, prediction_type, variance_type):
    x, m, noise, t = _inputs((4, 3, 5, 5), "contiguous", torch.float32, device)
    _, table = _tables(device, prediction_type, variance_type)
    for clip in (False, True):
        out = ops.reverse_step(x, m, t, table, clip_denoised=clip, noise=noise, backend=backend)
        assert_matches_reference(out, reverse_step_ref(clip), (x, m, t, table, noise))


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_step_without_noise_adds_none(backend, device):
    x, m, _, t = _inputs((3, 3, 7, 7), "contiguous", torch.float32, device)
    _, table = _tables(device)
    out = ops.reverse_step(x, m, t, table, backend=backend)
    assert_matches_reference(out, reverse_step_ref(False), (x, m, t, table))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("fmt", ["contiguous", "channels_last"])
@pytest.mark.parametrize("backend,device", BACKENDS)
def test_in_kernel_noise_is_the_reference_philox_stream(backend, device, dtype, fmt):
    shape = (3, 3, 9, 9)  # 729 elements: not a multiple of 4, exercises the tail group
    x, m, _, t = _inputs(shape, fmt, dtype, device)
    q_table, table = _tables(device)
    seed = torch.tensor([0x1234_5678_9ABC_DEF], dtype=torch.int64, device=device)
    expected = reference.philox_normal_like(x, int(seed)).to(device)

    x_t, drawn = ops.q_sample(x, t, q_table, seed=seed, backend=backend)
    assert drawn.dtype == dtype and drawn.stride() == x.stride()
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(drawn.float(), expected.to(dtype).float(), rtol=tol, atol=tol)
    assert_matches_reference(x_t, reference.q_sample, (x, t, q_table, expected.to(dtype)))

    out = ops.reverse_step(x, m, t, table, seed=seed, backend=backend)
    ref = legacy_step(x.double(), m.double(), t, table.double(), False, expected.double())[0]
    torch.testing.assert_close(out.double(), ref, rtol=tol, atol=tol)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_in_kernel_noise_reproducible_and_normal(backend, device):
    from scipy import stats

    numel = 1 << 16 if backend == "triton" else 1 << 20
    x = torch.zeros(4, numel // 4, device=device)
    q_table = torch.tensor([[0.0, 1.0]], device=device)  # x_t = noise
    t = torch.zeros(4, dtype=torch.long, device=device)

    def draw(generator_seed):
        g = torch.Generator(device=device).manual_seed(generator_seed)
        return ops.q_sample(x, t, q_table, seed=draw_seed(device, g), backend=backend)[1]

    a, b, c = draw(0), draw(0), draw(1)
    assert torch.equal(a, b), "the same generator seed must give the same noise"
    assert (a != c).float().mean() > 0.99, "different generator seeds must give different noise"
    torch.manual_seed(7)
    d = ops.q_sample(x, t, q_table, seed=draw_seed(device), backend=backend)[1]
    torch.manual_seed(7)
    e = ops.q_sample(x, t, q_table, seed=draw_seed(device), backend=backend)[1]
    assert torch.equal(d, e), "torch.manual_seed must make the noise reproducible"
    sample = a.flatten().double().cpu().numpy()
    assert abs(sample.mean()) < 5 / numel**0.5 and abs(sample.var() - 1) < 0.02
    assert stats.kstest(sample, "norm").pvalue > 1e-3
    # Neighbouring elements (the 4 lanes of one Philox call) are uncorrelated.
    assert abs(stats.pearsonr(sample[0::4], sample[1::4])[0]) < 0.02


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_autograd_through_q_sample(backend, device):
    x, _, noise, t = _inputs((2, 3, 4, 4), "contiguous", torch.float32, device)
    q_table, _ = _tables(device)
    x.requires_grad_(True)
    noise.requires_grad_(True)
    out, _ = ops.q_sample(x, t, q_table, noise=noise, backend=backend)
    out.square().sum().backward()
    x_ref, noise_ref = x.detach().clone().requires_grad_(True), noise.detach().clone().requires_grad_(True)
    reference.q_sample(x_ref, t, q_table, noise_ref).square().sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad)
    torch.testing.assert_close(noise.grad, noise_ref.grad)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_autograd_through_step(backend, device):
    x, m, noise, t = _inputs((2, 3, 4, 4), "contiguous", torch.float32, device)
    _, table = _tables(device, "v")
    for clip in (False, True):
        leaves = [v.detach().clone().requires_grad_(True) for v in (x, m, noise)]
        ops.reverse_step(leaves[0], leaves[1], t, table, clip, noise=leaves[2], backend=backend).sum().backward()
        refs = [v.detach().clone().requires_grad_(True) for v in (x, m, noise)]
        legacy_step(refs[0], refs[1], t, table, clip, refs[2])[0].sum().backward()
        for leaf, ref in zip(leaves, refs):
            torch.testing.assert_close(leaf.grad, ref.grad)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_q_sample_opcheck(backend, device):
    """The q_sample op (the step ops run on sampler_step: opcheck in test_sampler_step.py)."""
    x, _, noise, t = _inputs((2, 3, 5, 5), "contiguous", torch.float32, device)
    q_table, _ = _tables(device)
    seed = torch.tensor([42], dtype=torch.int64, device=device)
    op = torch.ops.ddpm_fast_triton.q_sample if backend == "triton" else torch.ops.ddpm_fast.q_sample
    # Deterministic mode is off for opcheck: its own checks compare against fresh allocations.
    torch.use_deterministic_algorithms(False)
    torch.library.opcheck(op, (x, t, q_table, noise, None))
    torch.library.opcheck(op, (x.requires_grad_(), t, q_table, None, seed))


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_compiles_without_graph_break(backend, device):
    x, m, noise, t = _inputs((2, 3, 5, 5), "contiguous", torch.float32, device)
    q_table, table = _tables(device)
    torch.use_deterministic_algorithms(False)
    torch._dynamo.reset()

    def step(x, m, t, noise):
        x_t, _ = ops.q_sample(x, t, q_table, noise=noise, backend=backend)
        return ops.reverse_step(x_t, m, t, table, True, noise=noise, backend=backend)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x, m, t, noise), step(x, m, t, noise))


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_bad_input(backend, device):
    x, m, noise, t = _inputs((2, 3, 4, 4), "contiguous", torch.float32, device)
    q_table, table = _tables(device)
    step = lambda *a, **k: ops.reverse_step(*a, backend=backend, **k)  # noqa: E731
    with pytest.raises(ValueError, match=r"t must lie in \[0, 1000\)"):
        step(x, m, torch.tensor([0, 1000], device=device), table)
    with pytest.raises(ValueError, match="t must lie"):
        step(x, m, torch.tensor([-1, 3], device=device), table)
    with pytest.raises(ValueError, match="t must be on the device"):
        step(x, m, t.to("meta"), table)
    with pytest.raises(ValueError, match=r"t must have shape \[batch_size\]"):
        step(x, m, t[:1], table)
    with pytest.raises(TypeError, match="t must be an integer tensor"):
        step(x, m, t.float(), table)
    with pytest.raises(ValueError, match="model_output must have the shape of x_t"):
        step(x, m[:, :2], t, table)
    with pytest.raises(TypeError, match="model_output must have the dtype of x_t"):
        step(x, m.half(), t, table)
    with pytest.raises(TypeError, match="x_t must have a floating dtype"):
        step(x.long(), m.long(), t, table)
    with pytest.raises(TypeError, match="x_t must have a floating dtype"):
        step(torch.complex(x, x), torch.complex(m, m), t, table)
    with pytest.raises(ValueError, match=r"table must be a float32 tensor of shape \[R, 5\]"):
        step(x, m, t, q_table)
    with pytest.raises(ValueError, match="noise must have the shape of x_t"):
        step(x, m, t, table, noise=noise[:1])
    with pytest.raises(ValueError, match="exactly one of noise= "):
        ops.q_sample(x, t, q_table, backend=backend)


def _available_host_memory():
    """MemAvailable (free plus reclaimable page cache), in bytes."""
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(os.environ.get("DDPM_FAST_SKIP_HUGE") == "1", reason="DDPM_FAST_SKIP_HUGE=1")
@pytest.mark.parametrize("backend,device", [p for p in BACKENDS if p.id in ("cpu", "cuda")])
def test_64bit_offsets(backend, device):
    """A tensor of more than 2**31 elements is indexed correctly to its last element (q_sample;
    the step: test_sampler_step.py)."""
    numel = 2**31 + 40
    free = torch.cuda.mem_get_info()[0] if device == "cuda" else _available_host_memory()
    needed = 2 * 2 * numel + 2**30  # two bfloat16 tensors (input, output) and some headroom
    if free < needed:
        pytest.skip(f"needs {needed / 2**30:.1f} GiB free memory, {free / 2**30:.1f} GiB available")
    torch.use_deterministic_algorithms(False)  # filling 4 GiB with NaN twice is not needed here
    x = torch.empty(2, numel // 2, dtype=torch.bfloat16, device=device)
    x[:, -64:] = torch.randn(2, 64, device=device).to(torch.bfloat16)
    x[:, :64] = torch.randn(2, 64, device=device).to(torch.bfloat16)
    t = torch.tensor([3, 900], device=device)
    q_table, _ = _tables(device)
    out, _ = ops.q_sample(x, t, q_table, noise=x, backend=backend)  # noise = x: 2 tensors of 4 GiB
    for part in (slice(0, 64), slice(-64, None)):
        ref = reference.q_sample(x[:, part].double(), t, q_table.double(), x[:, part].double())
        torch.testing.assert_close(out[:, part].double(), ref, rtol=1e-2, atol=1e-2)


def test_diffusion_uses_fused_step_with_same_result():
    """GaussianDiffusion's fused path and its torch path agree for the same noise."""
    for backend in ("cpu", "triton"):
        from ddpm_fast import backends

        if backends.unavailable_reason(backend, "cpu"):
            continue
        fused = GaussianDiffusion(backend=backend, prediction_type="v")
        plain = GaussianDiffusion(backend="torch", prediction_type="v")
        x, m, noise, t = _inputs((2, 3, 6, 6), "contiguous", torch.float32, "cpu")
        model = lambda x_t, t: m  # noqa: E731
        torch.testing.assert_close(fused.q_sample(x, t, noise), plain.q_sample(x, t, noise), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(fused.p_sample(model, x, t, noise=noise, clip_denoised=True),
                                   plain.p_sample(model, x, t, noise=noise, clip_denoised=True), rtol=1e-5, atol=1e-5)
        t_prev = (t - 100).clamp(min=-1)
        torch.testing.assert_close(fused.ddim_sample(model, x, t, t_prev, eta=0.5, noise=noise),
                                   plain.ddim_sample(model, x, t, t_prev, eta=0.5, noise=noise), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- DPM-Solver++ step

DPM_BACKENDS = backend_params(include_torch=True)
DPM_STEPS = 10  # rows of the DPM-Solver++ table: one per solver step


def _dpm_table(device, prediction_type="epsilon", seed=0):
    """[DPM_STEPS, 5]: columns 0-1 the x0 coefficients of a real schedule at the solver's timesteps
    (999 down to 0), columns 2-4 random in the ranges DPM-Solver++ 2M coefficients take
    (x0 weight in (0, 1.5), x weight in (0, 1), previous x0 weight in (-0.5, 0))."""
    q = schedules.diffusion_quantities(schedules.linear_betas(T))
    timesteps = torch.linspace(T - 1, 0, DPM_STEPS).round().long()
    x0_from_x, x0_from_model = schedules.x0_coefficients(q["alphas_cumprod"][timesteps], prediction_type)
    g = torch.Generator().manual_seed(seed)
    scale = torch.tensor([1.5, 1.0, -0.5], dtype=torch.float64)
    rest = torch.rand(DPM_STEPS, 3, generator=g, dtype=torch.float64) * scale
    return torch.cat([torch.stack([x0_from_x, x0_from_model], dim=1), rest], dim=1).float().to(device)


def _dpm_inputs(shape, fmt, dtype, device, seed=0):
    """(x, model_output, x0_prev, index); index covers the first and the last row."""
    x, m, x0_prev, _ = _inputs(shape, fmt, dtype, device, seed)
    g = torch.Generator().manual_seed(seed + 1)
    index = torch.randint(0, DPM_STEPS, (shape[0],), generator=g)
    index[0] = 0
    if shape[0] > 1:
        index[-1] = DPM_STEPS - 1
    return x, m, x0_prev, index.to(device)


def _dpm_term_magnitudes(x, m, x0_prev, index, table):
    """Per element, the sum of the absolute terms of x_next and of x0 (float64).

    The rounding error of a float32 step is a few ulp of these, not of the result: at high
    noise x0 = A x + B m cancels (|A|, |B| ~ 150 against |x0| <= 1 with clip), so the fp32
    check is per element, relative to them (clamping to [-1, 1] cannot increase an error).
    """
    x, m = x.double(), m.double()
    a, b, p, q, r = (table.double()[index, k].reshape(-1, *([1] * (x.dim() - 1))) for k in range(5))
    x0_terms = (a * x).abs() + (b * m).abs()
    out_terms = (p * x0_terms).abs() + (q * x).abs()
    if x0_prev is not None:
        out_terms = out_terms + (r * x0_prev.double()).abs()
    return out_terms, x0_terms


def dpm_ref(x, m, x0_prev, index, table, clip=False):
    """reference of ops.dpm_solver_step: the legacy step with the previous x0 as its S term."""
    return legacy_step(x, m, index, table, clip, x0_prev, previous_x0=True)


def _check_dpm_solver_step(backend, x, m, x0_prev, index, table, clip):
    """Both outputs of the fused step against the float64 reference.

    fp32: every element within 1e-6 of its terms' magnitude; fp16/bf16: within twice the error
    of the reference computed in that dtype (assert_matches_reference). Returns the largest
    error of (x_next, x0), relative to the terms for fp32 and absolute otherwise.
    """
    out, x0 = ops.dpm_solver_step(x, m, x0_prev, index, table, clip, backend=backend)
    for value in (out, x0):
        assert value.dtype == x.dtype and value.shape == x.shape and value.stride() == x.stride()
    inputs = (x, m, x0_prev, index, table)
    as64 = [v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v for v in inputs]
    errors = []
    for k, (name, value, terms) in enumerate(zip(("x_next", "x0"), (out, x0), _dpm_term_magnitudes(*inputs))):
        if x.dtype == torch.float32:
            assert not torch.isnan(value).any(), f"an element of {name} was not written (NaN poison survived)"
            ref64 = dpm_ref(*as64, clip)[k]
            relative = ((value.double() - ref64).abs() / terms.clamp(min=1e-30)).max().item()
            assert relative <= 1e-6, f"fp32 {name}: error {relative:.3g} of its terms' magnitude exceeds 1e-6"
            errors.append(relative)
        else:
            ref = lambda *a, k=k: dpm_ref(*a, clip)[k]  # noqa: E731
            errors.append(assert_matches_reference(value, ref, inputs))
    if clip:
        assert x0.abs().max() <= 1
    return errors


@pytest.mark.parametrize("x0_prev_given", [True, False], ids=["x0_prev", "first_step"])
@pytest.mark.parametrize("clip", [False, True], ids=["noclip", "clip"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend,device", DPM_BACKENDS)
def test_dpm_solver_step_matches_reference(backend, device, dtype, clip, x0_prev_given):
    for shape, fmt in SHAPES[::2]:
        x, m, x0_prev, index = _dpm_inputs(shape, fmt, dtype, device)
        _check_dpm_solver_step(backend, x, m, x0_prev if x0_prev_given else None, index, _dpm_table(device), clip)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("prediction_type", schedules.PREDICTION_TYPES)
@pytest.mark.parametrize("backend,device", DPM_BACKENDS)
def test_dpm_solver_step_tables_of_every_prediction_type(backend, device, prediction_type, dtype):
    x, m, x0_prev, index = _dpm_inputs((4, 3, 5, 5), "channels_last", dtype, device, seed=3)
    table = _dpm_table(device, prediction_type, seed=1)
    for clip in (False, True):
        for given in (x0_prev, None):
            _check_dpm_solver_step(backend, x, m, given, index, table, clip)


@pytest.mark.parametrize("backend,device", DPM_BACKENDS)
def test_dpm_solver_step_float64_is_the_reference(backend, device):
    x, m, x0_prev, index = _dpm_inputs((2, 3, 4, 4), "contiguous", torch.float64, device)
    table = _dpm_table(device)
    out, x0 = ops.dpm_solver_step(x, m, x0_prev, index, table, True, backend=backend)
    ref_out, ref_x0 = dpm_ref(x, m, x0_prev, index, table.double(), True)
    assert out.dtype == torch.float64 and torch.equal(out, ref_out) and torch.equal(x0, ref_x0)


def test_dpm_solver_step_gradcheck_float64():
    """float64 runs the PyTorch reference path: gradcheck through the public function."""
    x, m, x0_prev, index = _dpm_inputs((2, 3, 4, 4), "contiguous", torch.float64, "cpu")
    table = _dpm_table("cpu", "v")
    leaves = [v.requires_grad_() for v in (x, m, x0_prev)]
    for clip in (False, True):
        assert torch.autograd.gradcheck(
            lambda *a: ops.dpm_solver_step(*a, index, table, clip, backend="torch"), leaves)


@pytest.mark.parametrize("outputs", ["both", "out", "x0"])
@pytest.mark.parametrize("x0_prev_given", [True, False], ids=["x0_prev", "first_step"])
@pytest.mark.parametrize("backend,device", DPM_BACKENDS)
def test_dpm_solver_step_autograd_matches_reference(backend, device, x0_prev_given, outputs):
    """The fused op's backward (fp32) against autograd through the reference, for a loss on
    either output or both; v prediction (x0 depends on x and model_output) with and without clip."""
    x, m, x0_prev, index = _dpm_inputs((3, 3, 4, 4), "contiguous", torch.float32, device, seed=7)
    table = _dpm_table(device, "v")
    g = torch.Generator().manual_seed(11)
    weights = [torch.randn(x.shape, generator=g).to(device) for _ in range(2)]
    names = ("x", "model_output", "x0_prev") if x0_prev_given else ("x", "model_output")

    def grads(step, clip):
        leaves = [v.detach().clone().requires_grad_(True) for v in (x, m, x0_prev)[:len(names)]]
        out, x0 = step(leaves[0], leaves[1], leaves[2] if x0_prev_given else None, index, table, clip)
        loss = {"both": (out * weights[0]).sum() + (x0 * weights[1]).sum(),
                "out": (out * weights[0]).sum(), "x0": (x0 * weights[1]).sum()}[outputs]
        loss.backward()
        return [leaf.grad if leaf.grad is not None else torch.zeros_like(leaf) for leaf in leaves]

    fused = lambda *a: ops.dpm_solver_step(*a, backend=backend)  # noqa: E731
    for clip in (False, True):
        for name, got, expected in zip(names, grads(fused, clip), grads(dpm_ref, clip)):
            torch.testing.assert_close(got, expected, msg=lambda msg, name=name: f"grad of {name}: {msg}")


@pytest.mark.parametrize("backend,device", DPM_BACKENDS)
def test_dpm_solver_step_compiles_without_graph_break(backend, device):
    """Two chained solver steps (the second takes the first's x0) in one compiled graph."""
    x, m, _, index = _dpm_inputs((2, 3, 5, 5), "contiguous", torch.float32, device)
    table = _dpm_table(device)
    torch.use_deterministic_algorithms(False)
    torch._dynamo.reset()

    def two_steps(x, m, index):
        x, x0 = ops.dpm_solver_step(x, m, None, index, table, True, backend=backend)
        return ops.dpm_solver_step(x, m, x0, index + 1, table, True, backend=backend)

    compiled = torch.compile(two_steps, fullgraph=True, backend="aot_eager")
    index = index.clamp(max=DPM_STEPS - 2)
    for got, expected in zip(compiled(x, m, index), two_steps(x, m, index)):
        torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("backend,device", DPM_BACKENDS)
def test_dpm_solver_step_bad_input(backend, device):
    x, m, x0_prev, index = _dpm_inputs((2, 3, 4, 4), "contiguous", torch.float32, device)
    table = _dpm_table(device)
    step = lambda x, m, x0_prev, index, table, clip=False: ops.dpm_solver_step(  # noqa: E731
        x, m, x0_prev, index, table, clip, backend=backend)
    with pytest.raises(ValueError, match=rf"index must lie in \[0, {DPM_STEPS}\)"):
        step(x, m, x0_prev, torch.tensor([0, DPM_STEPS], device=device), table)
    with pytest.raises(ValueError, match="index must lie"):
        step(x, m, x0_prev, torch.tensor([-1, 0], device=device), table)
    with pytest.raises(ValueError, match=r"index must have shape \[batch_size\]"):
        step(x, m, x0_prev, index[:1], table)
    with pytest.raises(TypeError, match="index must be an integer tensor"):
        step(x, m, x0_prev, index.float(), table)
    with pytest.raises(ValueError, match="index must be on the device"):
        step(x, m, x0_prev, index.to("meta"), table)
    with pytest.raises(ValueError, match="x0_prev must have the shape of x"):
        step(x, m, x0_prev[:1], index, table)
    with pytest.raises(TypeError, match="x0_prev must have the dtype of x"):
        step(x, m, x0_prev.half(), index, table)
    with pytest.raises(ValueError, match="x0_prev must be on x's device"):
        step(x, m, x0_prev.to("meta"), index, table)
    with pytest.raises(TypeError, match="x0_prev must be a torch.Tensor"):
        step(x, m, 0.0, index, table)
    with pytest.raises(ValueError, match="model_output must have the shape of x"):
        step(x, m[:, :2], x0_prev, index, table)
    with pytest.raises(TypeError, match="model_output must have the dtype of x"):
        step(x, m.half(), x0_prev, index, table)
    with pytest.raises(TypeError, match="x must have a floating dtype"):
        step(x.long(), m.long(), None, index, table)
    with pytest.raises(ValueError, match="x must have a non-empty batch dimension"):
        step(x[:0], m[:0], None, index[:0], table)
    with pytest.raises(ValueError, match=r"table must be a float32 tensor of shape \[R, 5\]"):
        step(x, m, x0_prev, index, table[:, :2])
    with pytest.raises(TypeError, match=r"table must be a float32 tensor of shape \[R, 5\]"):
        step(x, m, x0_prev, index, table.double())
    with pytest.raises(TypeError, match="clip_denoised must be True or False"):
        step(x, m, x0_prev, index, table, clip=1)
