"""Fused GroupNorm + SiLU on every backend against the float64 reference, forward and backward.

Errors are measured against reference.group_norm_silu in float64 (autograd for the gradients),
relative to the largest reference value: fp32 within ~1e-6, fp16/bf16 within twice the error of
eager PyTorch computing the same in that dtype. Deterministic mode is on in every test, so each
freshly allocated output is NaN-filled and an element a kernel fails to write fails the test.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton

import sys  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from conftest import backend_params  # noqa: E402
from ddpm_fast import backends, reference  # noqa: E402
from ddpm_fast.nn import GroupNormSiLU  # noqa: E402
from ddpm_fast.ops import group_norm_silu  # noqa: E402

gns_ops = sys.modules["ddpm_fast.ops.group_norm_silu"]

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Relative error allowed on top of "twice the same-dtype reference's error".
SLACK = {torch.float32: 1e-6, torch.float16: 1e-4, torch.bfloat16: 1e-3}
# (shape, num_groups, fits the Triton interpreter). The interpreter runs each program through
# numpy: only the small shapes run there.
CASES = [
    ((1, 96, 7, 7), 32, True),      # N = 1, C = 96 with 32 groups, 7x7
    ((2, 8, 33, 33), 1, True),      # G = 1, odd 33x33
    ((3, 16, 5, 5), 16, True),      # G = C
    ((2, 12, 10), 3, True),         # 1-D spatial
    ((2, 8, 3, 4, 5), 4, True),     # 3-D spatial (channels_last_3d)
    ((2, 64, 16, 16), 32, False),   # a UNet-like block
    ((1, 4, 72, 72), 1, False),     # a group of 20736 elements: the CUDA chunked path
]
LAYOUTS = ["contiguous", "channels_last"]


def _backends():
    """conftest's (backend, device) pairs, with CUDA devices skipped where torch has no GPU (a
    CUDA-built extension registers its kernels even on a machine without one)."""
    params = []
    for p in backend_params():
        if p.values[1] == "cuda" and not torch.cuda.is_available() and not p.marks:
            p = pytest.param(*p.values, id=p.id, marks=[pytest.mark.skip(reason="CUDA is not available here")])
        params.append(p)
    return params


BACKENDS = _backends()


@pytest.fixture(autouse=True)
def poisoned_outputs():
    """torch.empty / empty_like (Python and C++) return NaN-filled memory while this is on."""
    torch.use_deterministic_algorithms(True, warn_only=True)
    assert torch.utils.deterministic.fill_uninitialized_memory
    assert torch.isnan(torch.empty(4)).all()
    yield
    torch.use_deterministic_algorithms(False)


def _layout(x, layout):
    if layout == "contiguous":
        return x
    if x.dim() == 4:
        return x.to(memory_format=torch.channels_last)
    if x.dim() == 5:
        return x.to(memory_format=torch.channels_last_3d)
    # No channels_last format for 3-D tensors: channels innermost, which the op copies first.
    return x.transpose(1, -1).contiguous().transpose(1, -1)


def _is_channels_last(t):
    fmt = {4: torch.channels_last, 5: torch.channels_last_3d}.get(t.dim())
    return fmt is not None and t.is_contiguous(memory_format=fmt) and not t.is_contiguous()


def _inputs(shape, layout, dtype, device, affine, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = _layout(torch.randn(shape, generator=g) * 1.5 + 0.7, layout).to(device=device, dtype=dtype)
    grad_y = _layout(torch.randn(shape, generator=g), layout).to(device=device, dtype=dtype)
    weight = bias = None
    if affine:  # non-trivial gamma and beta, of both signs
        weight = (torch.randn(shape[1], generator=g) * 0.8 + 0.5).to(device=device, dtype=dtype)
        bias = (torch.randn(shape[1], generator=g) * 0.5).to(device=device, dtype=dtype)
    return x, weight, bias, grad_y


def _forward_backward(fn, x, weight, bias, grad_y):
    """(y, dx, dgamma, dbeta) of fn through autograd, on leaf copies of the inputs."""
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (x, weight, bias)]
    y = fn(*leaves)
    y.backward(grad_y.to(y.dtype))
    return [y.detach()] + [t.grad if t is not None else None for t in leaves]


def _rel_err(out, ref64):
    return ((out.double() - ref64).abs().max() / ref64.abs().max().clamp_min(1e-12)).item()


def _check(name, out, ref64, same_dtype_ref, dtype):
    assert out.dtype == same_dtype_ref.dtype, f"{name}: dtype {out.dtype}, expected {same_dtype_ref.dtype}"
    assert not torch.isnan(out).any(), f"{name}: an element was not written (NaN poison survived)"
    err, ref_err = _rel_err(out, ref64), _rel_err(same_dtype_ref, ref64)
    assert err <= 2 * ref_err + SLACK[dtype], f"{name}: relative error {err:.3g}, same-dtype reference {ref_err:.3g}"


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape,num_groups,tiny", CASES, ids=[f"{c[0]}-G{c[1]}".replace(" ", "") for c in CASES])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("backend,device", BACKENDS)
def test_matches_reference(backend, device, dtype, shape, num_groups, tiny, layout, affine):
    if backend == "triton" and device == "cpu" and not tiny:
        pytest.skip("the Triton interpreter runs only the small shapes (each program goes through numpy)")
    x, weight, bias, grad_y = _inputs(shape, layout, dtype, device, affine)
    fused = _forward_backward(lambda *a: group_norm_silu(*a, num_groups=num_groups, backend=backend),
                              x, weight, bias, grad_y)
    eager = _forward_backward(lambda *a: reference.group_norm_silu(*a, num_groups), x, weight, bias, grad_y)
    as64 = [t.double() if t is not None else None for t in (x, weight, bias)]
    exact = _forward_backward(lambda *a: reference.group_norm_silu(*a, num_groups), *as64, grad_y.double())
    for name, out, ref64, ref in zip(("y", "dx", "dgamma", "dbeta"), fused, exact, eager):
        if ref64 is None:
            assert out is None
            continue
        _check(name, out, ref64, ref, dtype)
    if layout == "channels_last" and x.dim() >= 4:
        assert _is_channels_last(fused[0]), f"y lost the channels_last layout: strides {fused[0].stride()}"
        assert _is_channels_last(fused[1]), f"dx lost the channels_last layout: strides {fused[1].stride()}"


@pytest.mark.parametrize("backend,device", [p for p in BACKENDS if p.values[0] != "torch"])
def test_stats_outputs(backend, device):
    """The forward op's mean and rstd are the float32 per-(sample, group) statistics."""
    x, weight, bias, _ = _inputs((2, 12, 5, 5), "channels_last", torch.float16, device, True)
    ns = torch.ops.ddpm_fast_triton if backend == "triton" else torch.ops.ddpm_fast
    y, mean, rstd = ns.group_norm_silu(x, weight, bias, 3, 1e-5)
    ref_mean, ref_rstd = reference.group_norm_silu_stats(x, 3, 1e-5)
    assert mean.dtype == rstd.dtype == torch.float32 and mean.shape == (2, 3)
    torch.testing.assert_close(mean, ref_mean.to(device), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(rstd, ref_rstd.to(device), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend,device", [p for p in BACKENDS if p.values[0] != "torch"])
def test_backward_is_deterministic(backend, device):
    """The same inputs give the same bits of dx, dgamma and dbeta on every run."""
    shape = (2, 16, 6, 6) if backend == "triton" and device == "cpu" else (8, 64, 24, 24)
    x, weight, bias, grad_y = _inputs(shape, "contiguous", torch.float32, device, True, seed=3)
    fn = lambda *a: group_norm_silu(*a, num_groups=8, backend=backend)  # noqa: E731
    first = _forward_backward(fn, x, weight, bias, grad_y)
    second = _forward_backward(fn, x, weight, bias, grad_y)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_gradcheck_float64():
    """float64 runs the PyTorch reference path: gradcheck through the public function."""
    x, weight, bias, _ = _inputs((2, 6, 3, 3), "contiguous", torch.float64, "cpu", True)
    args = [t.requires_grad_() for t in (x, weight, bias)]
    assert torch.autograd.gradcheck(lambda *a: group_norm_silu(*a, num_groups=3, backend="cpu"), args)


@pytest.mark.filterwarnings("ignore:Input #.* is not a double precision")
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("backend,device", [p for p in BACKENDS if p.values[0] in ("cpu", "cuda")])
def test_gradcheck_kernels_float32(backend, device, layout):
    """The kernels' backward against finite differences of their own forward (float32, so
    the step and the tolerances are wide; the float64 comparison is test_matches_reference)."""
    x, weight, bias, _ = _inputs((2, 6, 3, 3), layout, torch.float32, device, True, seed=5)
    args = [t.requires_grad_() for t in (x, weight, bias)]
    assert torch.autograd.gradcheck(lambda *a: group_norm_silu(*a, num_groups=3, backend=backend), args,
                                    eps=1e-2, atol=2e-2, rtol=2e-2, nondet_tol=0.0)


def _opcheck_samples(device, dtype, tiny):
    shape = (2, 6, 3, 3) if tiny else (2, 12, 5, 5)
    samples = []
    for layout, affine in (("contiguous", True), ("channels_last", False)):
        x, weight, bias, grad_y = _inputs(shape, layout, dtype, device, affine)
        samples.append((x, weight, bias, grad_y))
    return samples


@pytest.mark.parametrize("backend,device", [p for p in BACKENDS if p.values[0] != "torch"])
def test_opcheck(backend, device):
    namespace = "ddpm_fast_triton" if backend == "triton" else "ddpm_fast"
    ns = getattr(torch.ops, namespace)
    for x, weight, bias, grad_y in _opcheck_samples(device, torch.float32, tiny=backend == "triton"):
        args = (x.requires_grad_(), weight.requires_grad_() if weight is not None else None,
                bias.requires_grad_() if bias is not None else None, 3, 1e-5)
        torch.library.opcheck(ns.group_norm_silu, args)
        x = x.detach()
        _, mean, rstd = ns.group_norm_silu(x, weight.detach() if weight is not None else None,
                                           bias.detach() if bias is not None else None, 3, 1e-5)
        params = [p.detach() if p is not None else None for p in (weight, bias)]
        torch.library.opcheck(ns.group_norm_silu_backward, (grad_y, x, *params, mean, rstd, 3))


@pytest.mark.skipif(backends.unavailable_reason("cpu", "cpu") is not None,
                    reason=f"cpu backend unavailable: {backends.unavailable_reason('cpu', 'cpu')}")
def test_torch_compile_fullgraph():
    x, weight, bias, grad_y = _inputs((2, 8, 5, 5), "channels_last", torch.float32, "cpu", True)
    torch._dynamo.reset()
    compiled = torch.compile(lambda *a: group_norm_silu(*a, num_groups=4, backend="cpu"), fullgraph=True)
    got = _forward_backward(compiled, x, weight, bias, grad_y)
    want = _forward_backward(lambda *a: group_norm_silu(*a, num_groups=4, backend="cpu"), x, weight, bias, grad_y)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_bad_input(backend, device):
    x = torch.randn(2, 6, 4, 4, device=device)
    with pytest.raises(ValueError, match="num_groups"):
        group_norm_silu(x, num_groups=4, backend=backend)
    with pytest.raises(ValueError, match="weight"):
        group_norm_silu(x, torch.ones(5, device=device), num_groups=3, backend=backend)
    with pytest.raises(ValueError, match="bias"):
        group_norm_silu(x, None, torch.ones(6, 1, device=device), num_groups=3, backend=backend)
    with pytest.raises(TypeError, match="x"):
        group_norm_silu(x.long(), num_groups=3, backend=backend)
    with pytest.raises(ValueError, match="x"):
        group_norm_silu(torch.randn(6, device=device), num_groups=3, backend=backend)
    with pytest.raises(ValueError, match="eps"):
        group_norm_silu(x, num_groups=3, eps=-1.0, backend=backend)
    with pytest.raises(ValueError, match="backend"):
        group_norm_silu(x, num_groups=3, backend="tpu")


@pytest.mark.parametrize("backend,device", [p for p in BACKENDS if p.values[0] in ("cpu", "cuda")])
def test_extension_op_checks(backend, device):
    """The C++ ops check their own inputs too, with the argument named."""
    op = torch.ops.ddpm_fast
    x = torch.randn(2, 6, 4, 4, device=device)
    with pytest.raises(ValueError, match="num_groups"):
        op.group_norm_silu(x, None, None, 4, 1e-5)
    with pytest.raises(ValueError, match="weight"):
        op.group_norm_silu(x, torch.ones(5, device=device), None, 3, 1e-5)
    with pytest.raises(TypeError, match="x must be float32"):
        op.group_norm_silu(x.double(), None, None, 3, 1e-5)
    _, mean, rstd = op.group_norm_silu(x, None, None, 3, 1e-5)
    with pytest.raises(ValueError, match="grad_y"):
        op.group_norm_silu_backward(x[:1], x, None, None, mean, rstd, 3)
    with pytest.raises(ValueError, match="mean"):
        op.group_norm_silu_backward(x, x, None, None, mean[:1], rstd, 3)


# ----------------------------------------------------------------------------- nn.GroupNormSiLU


def test_module_state_dict_matches_group_norm():
    gn = nn.GroupNorm(8, 32)
    with torch.no_grad():
        gn.weight.normal_()
        gn.bias.normal_()
    module = GroupNormSiLU(8, 32)
    assert {k: v.shape for k, v in module.state_dict().items()} == {k: v.shape for k, v in gn.state_dict().items()}
    module.load_state_dict(gn.state_dict())
    back = nn.GroupNorm(8, 32)
    back.load_state_dict(module.state_dict())
    assert torch.equal(back.weight, gn.weight) and torch.equal(back.bias, gn.bias)
    plain = nn.GroupNorm(8, 32, affine=False)
    assert GroupNormSiLU(8, 32, affine=False).state_dict().keys() == plain.state_dict().keys()


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_module_from_group_norm(backend, device):
    gn = nn.GroupNorm(4, 12, eps=1e-4).to(device)
    with torch.no_grad():
        gn.weight.normal_()
        gn.bias.normal_()
    module = GroupNormSiLU.from_group_norm(gn, backend=backend)
    assert (module.num_groups, module.num_channels, module.eps, module.backend) == (4, 12, 1e-4, backend)
    x = torch.randn(2, 12, 5, 5, device=device)
    torch.testing.assert_close(module(x), F.silu(gn(x)), rtol=1e-5, atol=1e-5)
    module(x).sum().backward()
    assert gn.weight.grad is not None and gn.bias.grad is not None  # shared parameters


def test_module_backend_attribute():
    module = GroupNormSiLU(2, 4)
    assert module.backend == "auto"
    module.backend = "torch"
    assert module.backend == "torch" and "backend='torch'" in repr(module)
    with pytest.raises(ValueError, match="backend"):
        module.backend = "fast"
    with pytest.raises(ValueError, match="num_channels"):
        GroupNormSiLU(3, 4)
    x = torch.randn(1, 4, 3, 3)
    torch.testing.assert_close(module(x), reference.group_norm_silu(x, module.weight, module.bias, 2))
