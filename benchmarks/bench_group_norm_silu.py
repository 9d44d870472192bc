"""GroupNorm + SiLU (32 groups, affine): forward, and forward + backward.

The seed's expression is ``F.silu(F.group_norm(x, 32, weight, bias))`` (nn.GroupNorm then
nn.SiLU in its model). Minimal bytes: forward reads x and writes y; forward + backward adds the
backward's read of x and dy and write of dx (the [C] parameters and their grads are negligible).
"""

import pytest
import torch
import torch.nn.functional as F

from conftest import (COMPILE_SHAPES, DEVICE, GN_SHAPES, assert_close, case_params, check_layout, cycle,
                      make_tensor, rotation_count, run_benchmark)
from ddpm_fast import ops, reference

GROUPS, EPS = 32, 1e-5


def seed_group_norm_silu(x, weight, bias):
    return F.silu(F.group_norm(x, GROUPS, weight, bias, EPS))


compiled_seed_group_norm_silu = torch.compile(seed_group_norm_silu, dynamic=False)


def _function(provider):
    if provider == "seed_eager":
        return seed_group_norm_silu
    if provider == "torch_compile":
        return compiled_seed_group_norm_silu
    return lambda x, weight, bias: ops.group_norm_silu(x, weight, bias, GROUPS, EPS, backend=provider)


def _params(channels, dtype, requires_grad=False):
    generator = torch.Generator(DEVICE).manual_seed(1)
    weight = (1 + 0.1 * torch.randn(channels, device=DEVICE, generator=generator)).to(dtype)
    bias = (0.1 * torch.randn(channels, device=DEVICE, generator=generator)).to(dtype)
    return weight.requires_grad_(requires_grad), bias.requires_grad_(requires_grad)


def _info(op, provider, shape, dtype, layout, buffers):
    return dict(op=op, provider=provider, shape=list(shape), dtype=str(dtype).replace("torch.", ""),
                layout=layout, buffers=buffers, group=f"{op} {'x'.join(map(str, shape))} {dtype} {layout}")


def _expected(x, weight, bias):
    return reference.group_norm_silu(x.double(), weight.double(), bias.double(), GROUPS, EPS)


@pytest.mark.parametrize("provider, shape, dtype, layout", case_params(GN_SHAPES, COMPILE_SHAPES["gn"]))
def test_group_norm_silu_forward(benchmark, copy_bandwidth, provider, shape, dtype, layout):
    nbytes = 2 * torch.Size(shape).numel() * dtype.itemsize
    generator = torch.Generator(DEVICE).manual_seed(0)
    sets = [make_tensor(shape, dtype, layout, generator) for _ in range(rotation_count(nbytes))]
    next_x = cycle(sets)
    weight, bias = _params(shape[1], dtype)
    function = _function(provider)

    def fn():
        x = next_x()
        return function(x, weight, bias), x

    with torch.no_grad():
        y, x = run_benchmark(benchmark, fn, info=_info("gn_silu_forward", provider, shape, dtype, layout, len(sets)),
                             nbytes=nbytes, copy_gbps=copy_bandwidth)
    check_layout(y, layout)
    assert_close(y, _expected(x, weight, bias))


@pytest.mark.parametrize("provider, shape, dtype, layout", case_params(GN_SHAPES, COMPILE_SHAPES["gn"]))
def test_group_norm_silu_forward_backward(benchmark, copy_bandwidth, provider, shape, dtype, layout):
    nbytes = 5 * torch.Size(shape).numel() * dtype.itemsize
    generator = torch.Generator(DEVICE).manual_seed(0)
    sets = [(make_tensor(shape, dtype, layout, generator).requires_grad_(),
             make_tensor(shape, dtype, layout, generator)) for _ in range(rotation_count(nbytes))]
    next_set = cycle(sets)
    weight, bias = _params(shape[1], dtype, requires_grad=True)
    function = _function(provider)

    def fn():
        x, grad_y = next_set()
        y = function(x, weight, bias)
        return torch.autograd.grad(y, (x, weight, bias), grad_y), x, grad_y

    (grad_x, grad_weight, grad_bias), x, grad_y = run_benchmark(
        benchmark, fn, info=_info("gn_silu_forward_backward", provider, shape, dtype, layout, len(sets)),
        nbytes=nbytes, copy_gbps=copy_bandwidth)
    check_layout(grad_x, layout)
    x64, weight64, bias64 = (p.detach().double().requires_grad_() for p in (x, weight, bias))
    expected = torch.autograd.grad(_expected(x64, weight64, bias64), (x64, weight64, bias64), grad_y.double())
    assert_close(grad_x, expected[0])
    # Parameter grads sum over N * H * W elements: compare relative to their size.
    for actual, want in zip((grad_weight, grad_bias), expected[1:]):
        torch.testing.assert_close(actual.double(), want, rtol=2e-2, atol=2e-2 * want.abs().max().item())
