"""The sampler step (``ops.sampler_step``) on every backend against ``reference.sampler_step``.

Every combination of terms the samplers use -- DDPM (given and drawn noise), DDIM (eta 0 and
> 0), DPM-Solver++ 2M (its first step without h1, then h1), 3M (h1 and h2), SDE 2M (h1 and drawn
noise) -- unguided and guided (model_output [2B]), with and without clip, in fp32, fp16 and bf16,
on contiguous, channels_last and odd shapes. Outputs are compared with the reference computed in
float64 from the same inputs and noise: fp32 every element within 1e-6 of the magnitude of its
terms (at high noise x0 = A x + B m cancels, |A|, |B| ~ 150), fp16/bf16 within twice the error
of the reference computed in that dtype. Outputs are poisoned: an element a kernel does not
write stays NaN and fails.
"""

import os
import re

import pytest
import torch

from conftest import backend_params
from ddpm_fast import ops, reference
from ddpm_fast.ops._common import draw_seed

BACKENDS = backend_params()
KERNEL_BACKENDS = [p for p in BACKENDS if p.id != "torch"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
T, ROWS = 1000, 10  # a 1000-step schedule; a table of one row per sampler step
SEED = 0x1234_5678_9ABC_DEF
# (shape, memory format). The interpreter runs each Triton program through numpy: keep them
# tiny. 2x3x27x27 has 2187 elements per sample, more than a Triton block (the two-row lookup).
SHAPES = [((1, 3, 7, 7), "contiguous"), ((2, 3, 27, 27), "channels_last"), ((3, 17), "contiguous"),
          ((2, 2, 3, 5, 5), "channels_last_3d")]
# name: (h1, h2, noise, store_x0) -- the terms each sampler's step has.
COMBOS = {
    "ddpm_given_noise": (False, False, "given", False),
    "ddpm_drawn_noise": (False, False, "drawn", False),
    "ddim_eta0": (False, False, None, False),
    "ddim_eta": (False, False, "given", False),
    "dpm2m_first_step": (False, False, None, True),
    "dpm2m": (True, False, None, True),
    "dpm3m": (True, True, None, True),
    "sde2m": (True, False, "drawn", True),
}

pytestmark = pytest.mark.usefixtures("poisoned_outputs")


def _layout(x, fmt):
    if fmt == "channels_last":
        return x.contiguous(memory_format=torch.channels_last)
    if fmt == "channels_last_3d":
        return x.contiguous(memory_format=torch.channels_last_3d)
    return x


def make_table(prediction_type="epsilon", seed=0, device="cpu"):
    """[ROWS, 8] float32: x0 coefficients of a linear schedule at timesteps 999 .. 0, the other
    columns random in the ranges sampler rows take (guidance scale 1-8, h1 weight negative)."""
    abar = torch.cumprod(1 - torch.linspace(1e-4, 0.02, T, dtype=torch.float64), 0)
    abar = abar[torch.linspace(T - 1, 0, ROWS).round().long()]
    if prediction_type == "epsilon":
        x0_from_x, x0_from_model = abar.rsqrt(), -(1 - abar).sqrt() * abar.rsqrt()
    else:  # v
        x0_from_x, x0_from_model = abar.sqrt(), -(1 - abar).sqrt()
    g = torch.Generator().manual_seed(seed)
    ranges = [(1.0, 8.0), (0.0, 1.0), (0.0, 1.5), (-0.5, 0.0), (0.0, 0.2), (0.0, 0.3)]
    rest = [lo + (hi - lo) * torch.rand(ROWS, generator=g, dtype=torch.float64) for lo, hi in ranges]
    return torch.stack([x0_from_x, x0_from_model, *rest], dim=1).float().to(device)


def make_inputs(shape, fmt, dtype, device, combo="dpm3m", guided=False, seed=0):
    """dict of the step's tensor arguments for a combo: x, model_output, index, h1, h2, noise, seed."""
    has_h1, has_h2, noise_kind, _ = COMBOS[combo]
    g = torch.Generator().manual_seed(seed)

    def tensor(batch=shape[0]):
        return _layout(torch.randn((batch, *shape[1:]), generator=g), fmt).to(device=device, dtype=dtype)

    index = torch.randint(0, ROWS, (shape[0],), generator=g)
    index[0] = 0  # the first and the last row (x0 weights ~150 and ~1)
    if shape[0] > 1:
        index[-1] = ROWS - 1
    return dict(x=tensor(), model_output=tensor(2 * shape[0] if guided else shape[0]), index=index.to(device),
                h1=tensor() if has_h1 else None, h2=tensor() if has_h2 else None,
                noise=tensor() if noise_kind == "given" else None,
                seed=torch.tensor([SEED], device=device) if noise_kind == "drawn" else None)


def _term_magnitudes(x, model_output, index, table, h1, h2, noise):
    """Per element, the sum of the absolute terms of x_out and of x0 (float64): the scale of a
    float32 rounding error (clamping x0 cannot increase an error)."""
    def col(k):
        return table.double()[index, k].reshape(-1, *([1] * (x.dim() - 1)))

    x, m = x.double(), model_output.double()
    batch = x.shape[0]
    if m.shape[0] == batch:
        model_terms = m.abs()
    else:
        model_terms = m[batch:].abs() + col(reference.GUIDANCE_SCALE).abs() * (m[:batch].abs() + m[batch:].abs())
    x0_terms = (col(reference.X0_FROM_X) * x).abs() + col(reference.X0_FROM_MODEL).abs() * model_terms
    out_terms = (col(reference.OUT_FROM_X) * x).abs() + col(reference.OUT_FROM_X0).abs() * x0_terms
    for column, term in ((reference.OUT_FROM_H1, h1), (reference.OUT_FROM_H2, h2), (reference.OUT_FROM_Z, noise)):
        if term is not None:
            out_terms = out_terms + (col(column) * term.double()).abs()
    return out_terms, x0_terms


def check_step(backend, table, clip, store_x0, x, model_output, index, h1=None, h2=None, noise=None, seed=None):
    """Both outputs of the op against the float64 reference; returns {output: error} (relative
    to the terms for fp32, absolute otherwise) with the same-dtype reference's error beside it."""
    out, x0 = ops.sampler_step(x, model_output, index, table, clip_denoised=clip, h1=h1, h2=h2, noise=noise,
                               seed=seed, store_x0=store_x0, backend=backend)
    for value in (out, x0) if store_x0 else (out,):
        assert value.dtype == x.dtype and value.shape == x.shape and value.stride() == x.stride()
    if not store_x0:
        assert x0.shape == (0,) and x0.dtype == x.dtype and x0.device == x.device
    z = noise if seed is None else reference.philox_normal_like(x, int(seed))  # float32 in x's layout

    def ref(dtype):
        cast = [None if v is None else v.to(dtype) for v in (x, model_output, h1, h2, z)]
        return reference.sampler_step(cast[0], cast[1], index, table, clip, cast[2], cast[3], cast[4], store_x0)

    ref64, ref_same = ref(torch.float64), ref(x.dtype)
    terms = _term_magnitudes(x, model_output, index, table, h1, h2, z)
    errors = {}
    for k, name in enumerate(("x_out", "x0")[:2 if store_x0 else 1]):
        got = (out, x0)[k]
        assert not torch.isnan(got).any(), f"an element of {name} was not written (NaN poison survived)"
        err = (got.double() - ref64[k]).abs()
        ref_err = (ref_same[k].double() - ref64[k]).abs().max().item()
        if x.dtype == torch.float32:
            relative = (err / terms[k].clamp(min=1e-30)).max().item()
            assert relative <= 1e-6, f"fp32 {name}: error {relative:.3g} of its terms' magnitude exceeds 1e-6"
            errors[name] = (relative, (ref_err / terms[k].max().item()))
        else:
            scale = ref64[k].abs().max().item()
            assert err.max() <= 2 * ref_err + 1e-6 * scale, \
                f"{x.dtype} {name}: error {err.max():.3g} vs the same-dtype reference's {ref_err:.3g}"
            errors[name] = (err.max().item(), ref_err)
    if clip and store_x0:
        assert x0.abs().max() <= 1
    return errors


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("guided", [False, True], ids=["unguided", "guided"])
@pytest.mark.parametrize("combo", list(COMBOS))
@pytest.mark.parametrize("backend,device", BACKENDS)
def test_matches_reference(backend, device, combo, guided, dtype):
    table = make_table(device=device)
    drawn = COMBOS[combo][2] == "drawn"
    for k, (shape, fmt) in enumerate(SHAPES):
        inputs = make_inputs(shape, fmt, dtype, device, combo, guided)
        # Drawing noise is slow in the interpreter and independent of clip: one clip per shape.
        for clip in ((k % 2 == 1,) if drawn else (False, True)):
            check_step(backend, table, clip, COMBOS[combo][3], **inputs)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v"])
@pytest.mark.parametrize("backend,device", BACKENDS)
def test_tables_of_both_prediction_types(backend, device, prediction_type):
    """v prediction: x0 weights of x and of the model both O(1) (the gradient test uses it too)."""
    table = make_table(prediction_type, seed=1, device=device)
    inputs = make_inputs((4, 3, 5, 5), "channels_last", torch.float32, device, "dpm3m", guided=True, seed=3)
    for clip in (False, True):
        check_step(backend, table, clip, True, **inputs)


@pytest.mark.parametrize("misaligned", ["x", "model_output", "h1", "h2", "noise", "all"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend,device", BACKENDS)
def test_misaligned_storage(backend, device, dtype, misaligned):
    """Tensors starting one element into their storage (no vector accesses on a GPU), every term
    present: the same result."""
    inputs = make_inputs((2, 3, 7, 7), "contiguous", dtype, device, "dpm3m", guided=True)
    inputs["noise"] = torch.randn_like(inputs["x"])
    for name in ("x", "model_output", "h1", "h2", "noise"):
        if misaligned in (name, "all"):
            value = inputs[name]
            storage = torch.empty(value.numel() + 1, dtype=dtype, device=device)
            inputs[name] = storage[1:].view_as(value).copy_(value)
    check_step(backend, make_table(device=device), True, True, **inputs)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_mixed_layouts(backend, device):
    """model_output, h1 and noise in another memory format than x: still exact."""
    inputs = make_inputs((2, 3, 8, 8), "channels_last", torch.float32, device, "dpm2m", guided=True)
    inputs.update(model_output=inputs["model_output"].contiguous(), h1=inputs["h1"].contiguous(),
                  noise=torch.randn(2, 3, 8, 8, device=device))
    check_step(backend, make_table(device=device), False, True, **inputs)


@pytest.mark.parametrize("guided", [False, True], ids=["unguided", "guided"])
@pytest.mark.parametrize("backend,device", BACKENDS)
def test_absent_terms_are_not_read(backend, device, guided):
    """The table columns of absent terms (and the guidance scale of an unguided step) may hold
    anything, NaN included: an absent term is no term, not a term times 0."""
    table = make_table(device=device)
    absent = [reference.OUT_FROM_H1, reference.OUT_FROM_H2, reference.OUT_FROM_Z] + \
        ([] if guided else [reference.GUIDANCE_SCALE])
    table[:, absent] = float("nan")
    inputs = make_inputs((2, 3, 5, 5), "contiguous", torch.float32, device, "dpm2m_first_step", guided)
    for clip in (False, True):
        check_step(backend, table, clip, True, **inputs)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("fmt", ["contiguous", "channels_last"])
@pytest.mark.parametrize("backend,device", BACKENDS)
def test_in_kernel_noise_is_the_reference_philox_stream(backend, device, dtype, fmt):
    """With x_out = z (a row of C = D = 0, G = 1) the op returns the noise it drew: the reference
    Philox stream in x's storage order (729 elements: the tail group of 4 is partial)."""
    x = _layout(torch.randn(3, 3, 9, 9), fmt).to(device=device, dtype=dtype)
    table = torch.zeros(1, 8, device=device)
    table[0, reference.OUT_FROM_Z] = 1.0
    index = torch.zeros(3, dtype=torch.long, device=device)
    seed = torch.tensor([SEED], device=device)
    out, _ = ops.sampler_step(x, x, index, table, seed=seed, backend=backend)
    expected = reference.philox_normal_like(x, SEED).to(device)
    assert out.stride() == x.stride()
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(out.float(), expected.to(dtype).float(), rtol=tol, atol=tol)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_in_kernel_noise_reproducible_under_a_drawn_seed(backend, device):
    x = torch.zeros(4, 1024, device=device)
    table = torch.zeros(1, 8, device=device)
    table[0, reference.OUT_FROM_Z] = 1.0
    index = torch.zeros(4, dtype=torch.long, device=device)

    def draw(seed):
        return ops.sampler_step(x, x, index, table, seed=seed, backend=backend)[0]

    a = draw(draw_seed(device, torch.Generator(device=device).manual_seed(0)))
    b = draw(draw_seed(device, torch.Generator(device=device).manual_seed(0)))
    c = draw(draw_seed(device, torch.Generator(device=device).manual_seed(1)))
    assert torch.equal(a, b), "the same generator seed must give the same noise"
    assert (a != c).float().mean() > 0.99, "different generator seeds must give different noise"
    torch.manual_seed(7)
    d = draw(draw_seed(device))
    torch.manual_seed(7)
    assert torch.equal(d, draw(draw_seed(device))), "torch.manual_seed must make the noise reproducible"
    assert abs(a.mean().item()) < 0.1 and abs(a.var().item() - 1) < 0.1


@pytest.mark.parametrize("outputs,store_x0", [("both", True), ("out", True), ("x0", True), ("out", False)])
@pytest.mark.parametrize("guided", [False, True], ids=["unguided", "guided"])
@pytest.mark.parametrize("backend,device", BACKENDS)
def test_autograd_matches_reference(backend, device, guided, outputs, store_x0):
    """The op's backward (fp32) against autograd through the reference, for a loss on either
    output or both, every input term present; v prediction, with and without clip."""
    inputs = make_inputs((3, 3, 4, 4), "contiguous", torch.float32, device, "dpm3m", guided, seed=7)
    inputs["noise"] = torch.randn_like(inputs["x"])
    names = ("x", "model_output", "h1", "h2", "noise")
    table = make_table("v", device=device)
    g = torch.Generator().manual_seed(11)
    weights = [torch.randn(inputs["x"].shape, generator=g).to(device) for _ in range(2)]

    def grads(step, clip):
        leaves = {name: inputs[name].detach().clone().requires_grad_(True) for name in names}
        out, x0 = step(leaves, clip)
        loss = {"both": lambda: (out * weights[0]).sum() + (x0 * weights[1]).sum(),
                "out": lambda: (out * weights[0]).sum(), "x0": lambda: (x0 * weights[1]).sum()}[outputs]()
        loss.backward()
        return {name: leaf.grad if leaf.grad is not None else torch.zeros_like(leaf) for name, leaf in leaves.items()}

    def fused(v, clip):
        return ops.sampler_step(v["x"], v["model_output"], inputs["index"], table, clip_denoised=clip, h1=v["h1"],
                                h2=v["h2"], noise=v["noise"], store_x0=store_x0, backend=backend)

    def ref(v, clip):
        return reference.sampler_step(v["x"], v["model_output"], inputs["index"], table, clip, v["h1"], v["h2"],
                                      v["noise"], store_x0)

    for clip in (False, True):
        got, expected = grads(fused, clip), grads(ref, clip)
        for name in names:
            torch.testing.assert_close(got[name], expected[name], msg=lambda msg, name=name: f"grad of {name}: {msg}")


def _kernel_op(backend):
    return torch.ops.ddpm_fast_triton.sampler_step if backend == "triton" else torch.ops.ddpm_fast.sampler_step


@pytest.mark.parametrize("backend,device", KERNEL_BACKENDS)
def test_opcheck(backend, device):
    table = make_table(device=device)
    op = _kernel_op(backend)
    torch.use_deterministic_algorithms(False)  # opcheck compares against fresh allocations itself
    v = make_inputs((2, 3, 5, 5), "contiguous", torch.float32, device, "dpm3m", guided=True)
    x, m, index, h1, h2 = v["x"], v["model_output"], v["index"], v["h1"], v["h2"]
    noise, seed = torch.randn_like(x), torch.tensor([SEED], device=device)
    torch.library.opcheck(op, (x, m[:2], index, table, True, None, None, noise, None, False))
    torch.library.opcheck(op, (x.requires_grad_(), m.requires_grad_(), index, table, True, h1.requires_grad_(),
                               h2, None, None, True))
    cl = [_layout(t.detach(), "channels_last") for t in (x, m, h1)]
    torch.library.opcheck(op, (cl[0].requires_grad_(), cl[1], index, table, False, cl[2], None, None, seed, True))


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_compiles_without_graph_break(backend, device):
    """Two chained guided DPM-Solver++ steps (the second takes the first's x0) and a DDPM step, in
    one compiled graph; the drawn-noise step only on the kernels (the torch backend draws its
    noise on the host from the seed's value)."""
    table = make_table(device=device)
    v = make_inputs((2, 3, 5, 5), "contiguous", torch.float32, device, "dpm2m", guided=True)
    x, m, index = v["x"], v["model_output"], v["index"].clamp(max=ROWS - 2)
    seed = torch.tensor([SEED], device=device) if backend != "torch" else None
    torch.use_deterministic_algorithms(False)
    torch._dynamo.reset()

    def steps(x, m, index):
        x, x0 = ops.sampler_step(x, m, index, table, clip_denoised=True, store_x0=True, backend=backend)
        x, x0 = ops.sampler_step(x, m, index + 1, table, clip_denoised=True, h1=x0, store_x0=True, backend=backend)
        return ops.sampler_step(x, m[:2], index, table, noise=x0 if seed is None else None, seed=seed,
                                backend=backend)[0], x0

    compiled = torch.compile(steps, fullgraph=True, backend="aot_eager")
    for got, expected in zip(compiled(x, m, index), steps(x, m, index)):
        torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_float64_goes_to_the_reference(backend, device):
    v = make_inputs((2, 3, 4, 4), "contiguous", torch.float64, device, "sde2m", guided=True)
    table = make_table(device=device)
    out, x0 = ops.sampler_step(v["x"], v["model_output"], v["index"], table, clip_denoised=True, h1=v["h1"],
                               seed=v["seed"], store_x0=True, backend=backend)
    noise = reference.philox_normal_like(v["x"], SEED).double()
    ref_out, ref_x0 = reference.sampler_step(v["x"], v["model_output"], v["index"], table.double(), True, v["h1"],
                                             None, noise, True)
    assert out.dtype == torch.float64 and torch.equal(out, ref_out) and torch.equal(x0, ref_x0)


def _bad_calls(device):
    """(argument named in the message, error type, keyword changes to a good call)."""
    x = torch.randn(2, 3, 4, 4, device=device)
    meta = torch.empty(2, 3, 4, 4, device="meta")
    calls = [
        ("model_output", ValueError, dict(model_output=torch.randn(6, 3, 4, 4, device=device))),  # 3B
        ("model_output", ValueError, dict(model_output=torch.randn(4, 3, 4, 5, device=device))),
        ("model_output", ValueError, dict(model_output=x[:, :2])),
        ("model_output", TypeError, dict(model_output=x.half())),
        ("model_output", TypeError, dict(model_output=torch.randn(4, 3, 4, 4, device=device).half())),
        ("model_output", TypeError, dict(model_output=0.5)),
        ("x", TypeError, dict(x=x.long())),
        ("x", ValueError, dict(x=x[:0], model_output=x[:0], index=torch.zeros(0, dtype=torch.long, device=device))),
        ("index", ValueError, dict(index=torch.tensor([0, ROWS], device=device))),
        ("index", ValueError, dict(index=torch.tensor([-1, 0], device=device))),
        ("index", ValueError, dict(index=torch.tensor([0], device=device))),
        ("index", TypeError, dict(index=torch.tensor([0.0, 1.0], device=device))),
        ("index", ValueError, dict(index=torch.tensor([0, 1], device="meta"))),
        ("table", ValueError, dict(table=torch.zeros(ROWS, 5, device=device))),
        ("table", ValueError, dict(table=torch.zeros(0, 8, device=device))),
        ("table", TypeError, dict(table=torch.zeros(ROWS, 8, device=device, dtype=torch.float64))),
        ("table", ValueError, dict(table=torch.zeros(ROWS, 8, device="meta"))),
        ("seed", TypeError, dict(seed=torch.tensor([1], dtype=torch.int32, device=device))),
        ("seed", ValueError, dict(seed=torch.tensor([1, 2], device=device))),
        ("seed", TypeError, dict(seed=1)),
        ("clip_denoised", TypeError, dict(clip_denoised=1)),
        ("store_x0", TypeError, dict(store_x0="yes")),
        ("noise.*seed", ValueError, dict(noise=x, seed=torch.tensor([1], device=device))),
    ]
    for name in ("h1", "h2", "noise"):
        calls += [(name, ValueError, {name: x[:1]}), (name, TypeError, {name: x.half()}),
                  (name, ValueError, {name: meta}), (name, TypeError, {name: 0.0})]
    return calls


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_bad_input(backend, device):
    g = torch.Generator().manual_seed(0)
    good = dict(x=torch.randn(2, 3, 4, 4, generator=g).to(device), model_output=torch.randn(2, 3, 4, 4).to(device),
                index=torch.tensor([0, 1], device=device), table=make_table(device=device))
    for name, error, change in _bad_calls(device):
        args = {**good, **change}
        with pytest.raises(error) as info:
            ops.sampler_step(args.pop("x"), args.pop("model_output"), args.pop("index"), args.pop("table"),
                             backend=backend, **args)
        assert re.match(rf"(give at most one of )?{name}\b", str(info.value)), \
            f"{sorted(change)}: the message does not name {name}: {info.value}"


@pytest.mark.parametrize("backend,device", KERNEL_BACKENDS)
def test_op_checks_its_inputs(backend, device):
    """The registered op itself (what torch.compile calls) rejects what the front end would."""
    v = make_inputs((2, 3, 4, 4), "contiguous", torch.float32, device, "dpm3m", guided=True)
    x, m, index, h1, h2 = v["x"], v["model_output"], v["index"], v["h1"], v["h2"]
    table = make_table(device=device)
    op = _kernel_op(backend)

    def call(**change):
        args = dict(x=x, model_output=m, index=index, table=table, clip_denoised=False, h1=h1, h2=h2, noise=None,
                    seed=None, store_x0=True)
        args.update(change)
        return op(*args.values())

    for name in ("h1", "h2", "noise"):
        with pytest.raises(ValueError, match=f"{name} must have the (memory layout|strides) of x"):
            call(**{name: _layout(torch.randn_like(x), "channels_last")})
        with pytest.raises(TypeError, match=f"{name} must have the dtype of x"):
            call(**{name: x.half()})
        with pytest.raises(ValueError, match=f"{name} must have the shape of x"):
            call(**{name: x[:1]})
    with pytest.raises(ValueError, match="model_output"):
        call(model_output=torch.cat([m, x]))  # 3B
    with pytest.raises(ValueError, match="model_output.* must have the (memory layout|strides) of x"):
        call(model_output=_layout(m, "channels_last"))
    with pytest.raises(ValueError, match=r"index must have shape \[batch_size\]"):
        call(index=index[:1])
    with pytest.raises(ValueError, match="table must be a float32 tensor"):
        call(table=table[:, :5])
    with pytest.raises(ValueError, match="at most one of noise"):
        call(noise=torch.randn_like(x), seed=torch.tensor([1], device=device))
    if backend == "cpu":  # the Triton kernel checks the range on the device (an assert on CUDA)
        with pytest.raises(ValueError, match=rf"index must lie in \[0, {ROWS}\)"):
            call(index=torch.tensor([0, ROWS], device=device))


def _available_host_memory():
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(os.environ.get("DDPM_FAST_SKIP_HUGE") == "1", reason="DDPM_FAST_SKIP_HUGE=1")
@pytest.mark.parametrize("backend,device", [p for p in KERNEL_BACKENDS if p.id == "cpu" or p.values[1] == "cuda"])
def test_64bit_offsets(backend, device):
    """A tensor of more than 2**31 elements is indexed correctly to its last element."""
    numel = 2**31 + 40
    free = torch.cuda.mem_get_info()[0] if device == "cuda" else _available_host_memory()
    needed = 2 * 2 * numel + 2**30  # two bfloat16 tensors (input, output) and some headroom
    if free < needed:
        pytest.skip(f"needs {needed / 2**30:.1f} GiB free memory, {free / 2**30:.1f} GiB available")
    torch.use_deterministic_algorithms(False)  # filling 4 GiB with NaN is not needed here
    x = torch.empty(2, numel // 2, dtype=torch.bfloat16, device=device)
    x[:, -64:] = torch.randn(2, 64, device=device).to(torch.bfloat16)
    x[:, :64] = torch.randn(2, 64, device=device).to(torch.bfloat16)
    index = torch.tensor([3, ROWS - 1], device=device)
    table = make_table(device=device)
    out, _ = ops.sampler_step(x, x, index, table, clip_denoised=True, backend=backend)  # model_output = x
    for part in (slice(0, 64), slice(-64, None)):
        ref, _ = reference.sampler_step(x[:, part].double(), x[:, part].double(), index, table, True)
        torch.testing.assert_close(out[:, part].double(), ref, rtol=1e-2, atol=1e-2)
