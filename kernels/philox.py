"""Philox4x32-10 and Box-Muller in Triton: the in-kernel noise contract of ``ddpm_fast.reference``.

For a one-element int64 seed tensor and the element at linear storage index ``i``: Philox
with key ``(lo32(seed), hi32(seed))`` and counter ``(lo32(i >> 2), hi32(i >> 2), 0, 0)`` gives
``r0..r3``; ``u_j = ((r_j >> 8) + 0.5) * 2**-24``; Box-Muller turns ``(u0, u1)`` into
``n0, n1`` and ``(u2, u3)`` into ``n2, n3``; the element takes ``n_(i & 3)``.

The seed is read with ``tl.load`` inside the kernel, never passed as a Python int, so a
captured CUDA graph draws fresh noise on every replay. ``tl.randn`` is not used: its counter
layout differs from the contract that every backend shares.
"""

import triton
import triton.language as tl

PHILOX_M0 = tl.constexpr(0xD2511F53)
PHILOX_M1 = tl.constexpr(0xCD9E8D57)
PHILOX_W0 = tl.constexpr(0x9E3779B9)
PHILOX_W1 = tl.constexpr(0xBB67AE85)
PHILOX_ROUNDS = tl.constexpr(10)
TWO_PI = tl.constexpr(6.283185307179586)
TWO_POW_MINUS_24 = tl.constexpr(5.960464477539063e-08)
TWO_OVER_PI = tl.constexpr(0.6366197723675814)
# pi / 2 = PIO2_HI + PIO2_MID + PIO2_LO; the first two have few significant bits.
PIO2_HI = tl.constexpr(1.5703125)
PIO2_MID = tl.constexpr(4.837512969970703125e-4)
PIO2_LO = tl.constexpr(7.549789954891882e-8)


@triton.jit
def philox4x32_10(c0, c1, c2, c3, k0, k1):
    """Philox4x32-10 (Salmon et al. 2011) on uint32 tensors; uint32 arithmetic wraps mod 2**32."""
    m0 = tl.full([], PHILOX_M0, tl.uint32)
    m1 = tl.full([], PHILOX_M1, tl.uint32)
    w0 = tl.full([], PHILOX_W0, tl.uint32)
    w1 = tl.full([], PHILOX_W1, tl.uint32)
    for round_index in tl.static_range(PHILOX_ROUNDS):
        if round_index > 0:
            k0 = k0 + w0
            k1 = k1 + w1
        hi0 = tl.umulhi(m0, c0)
        lo0 = m0 * c0
        hi1 = tl.umulhi(m1, c2)
        lo1 = m1 * c2
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return c0, c1, c2, c3


@triton.jit
def _uniform(r):
    """uint32 -> float32 in (0, 1]: the top 24 bits plus half a step (never 0, so log is finite)."""
    return ((r >> 8).to(tl.float32) + 0.5) * TWO_POW_MINUS_24


@triton.jit
def _sincos(theta):
    """(cos(theta), sin(theta)) for theta in [0, 2 pi]: one quadrant reduction, two polynomials.

    Unlike tl.cos / tl.sin this has no slow path for huge arguments, which costs registers
    (and spills) although it never runs here. Cody-Waite reduction by pi / 2 in three parts
    (q <= 4, so each q * part is exact), then the Cephes sinf / cosf minimax polynomials on
    [-pi/4, pi/4]: within about 1e-7 of cos / sin of the float32 theta.
    """
    q = tl.floor(theta * TWO_OVER_PI + 0.5)
    x = theta - q * PIO2_HI
    x = x - q * PIO2_MID
    x = x - q * PIO2_LO
    z = x * x
    sin_x = ((-1.9515295891e-4 * z + 8.3321608736e-3) * z - 1.6666654611e-1) * z * x + x
    cos_x = ((2.443315711809948e-5 * z - 1.388731625493765e-3) * z + 4.166664568298827e-2) * z * z - 0.5 * z + 1.0
    # theta = quadrant * pi / 2 + x
    quadrant = q.to(tl.int32) & 3
    odd = (quadrant & 1) != 0
    cos_v = tl.where(odd, sin_x, cos_x)
    sin_v = tl.where(odd, cos_x, sin_x)
    cos_v = tl.where(((quadrant + 1) & 2) != 0, -cos_v, cos_v)  # quadrants 1, 2
    sin_v = tl.where((quadrant & 2) != 0, -sin_v, sin_v)  # quadrants 2, 3
    return cos_v, sin_v


@triton.jit
def _box_muller(u_radius, u_angle):
    radius = tl.sqrt(-2.0 * tl.log(u_radius))
    cos_v, sin_v = _sincos(u_angle * TWO_PI)  # theta rounded to float32, as in the reference
    return radius * cos_v, radius * sin_v


@triton.jit
def philox_normal4(group, seed_ptr):
    """The four standard normals (n0, n1, n2, n3) of counter groups ``group`` (= i >> 2)."""
    group = group.to(tl.int64)
    seed = tl.load(seed_ptr).to(tl.int64)
    k0 = (seed & 0xFFFFFFFF).to(tl.uint32)
    k1 = ((seed >> 32) & 0xFFFFFFFF).to(tl.uint32)
    c0 = (group & 0xFFFFFFFF).to(tl.uint32)
    c1 = ((group >> 32) & 0xFFFFFFFF).to(tl.uint32)
    zero = tl.zeros_like(c0)
    r0, r1, r2, r3 = philox4x32_10(c0, c1, zero, zero, k0, k1)
    n0, n1 = _box_muller(_uniform(r0), _uniform(r1))
    n2, n3 = _box_muller(_uniform(r2), _uniform(r3))
    return n0, n1, n2, n3


@triton.jit
def philox_normal_block(seed_ptr, start, BLOCK: tl.constexpr):
    """Normals of storage indices start .. start + BLOCK - 1 as a [BLOCK] float32 tensor.

    ``start`` must be a multiple of 4 (any int64 block start ``pid * BLOCK`` with BLOCK % 4 == 0).
    One Philox call feeds four consecutive elements: the generator runs on BLOCK // 4 counters
    and the results are interleaved into storage order n0, n1, n2, n3, n0, ...
    """
    tl.static_assert(BLOCK % 4 == 0, "BLOCK must be a multiple of 4")
    group = start // 4 + tl.arange(0, BLOCK // 4)
    n0, n1, n2, n3 = philox_normal4(group, seed_ptr)
    return tl.interleave(tl.interleave(n0, n2), tl.interleave(n1, n3))
