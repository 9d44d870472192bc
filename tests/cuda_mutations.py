"""Mutation check of tests/test_cuda_emulated.py: each mutation must make a test fail.

Each mutation is one small edit of a csrc/ file (a deleted __syncthreads(), a wrong shuffle
offset, a wrong tail bound, a wrong channels_last index, ...), applied to a copy of csrc/; the
emulated build of that copy is tested in a fresh process. Prints which tests caught which
mutation, and exits non-zero when one survived. Slow (one build per mutation), so not part of
the default test run:

    python tests/cuda_mutations.py [--first] [name ...]

--first stops each mutation's test run at its first failing test (a faster yes/no per mutation).
"""

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GNS = "cuda/group_norm_silu.cu"
STEPS = "cuda/diffusion_steps.cu"
STEP_H = "include/ddpm_fast/diffusion_steps.h"

# name: (file under csrc/, text, replacement); the text must occur exactly once.
MUTATIONS = {
    "block_sum: first __syncthreads() deleted (smem reused by the next call)": (
        GNS, "  __syncthreads();  // smem may still be read from the previous call\n", ""),
    "block_sum: second __syncthreads() deleted (read before the warps' partial sums are written)": (
        GNS, "  __syncthreads();\n  v = threadIdx.x % 32 < kWarps ? smem[threadIdx.x % 32] : 0.0f;",
        "  v = threadIdx.x % 32 < kWarps ? smem[threadIdx.x % 32] : 0.0f;"),
    "block_welford: __syncthreads() deleted": (
        GNS, "  __syncthreads();\n  v = threadIdx.x % 32 < kWarps ? smem[threadIdx.x % 32] : gns",
        "  v = threadIdx.x % 32 < kWarps ? smem[threadIdx.x % 32] : gns"),
    "backward_channel_sums (channels_last): __syncthreads() deleted": (
        GNS, "  part[1][row][threadIdx.x % 32] = sgx;\n    __syncthreads();\n",
        "  part[1][row][threadIdx.x % 32] = sgx;\n"),
    "block_sum: shuffle offsets start at 8 instead of 16": (
        GNS, "  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);\n  __syncthreads();",
        "  for (int o = 8; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);\n  __syncthreads();"),
    "shfl_welford: lane offset o / 2 instead of o": (
        GNS, "__shfl_xor_sync(0xffffffffu, a.count, o)", "__shfl_xor_sync(0xffffffffu, a.count, o / 2)"),
    "block_sum: the last warp's partial sum dropped (tail bound kWarps - 1)": (
        GNS, "  v = threadIdx.x % 32 < kWarps ? smem[threadIdx.x % 32] : 0.0f;",
        "  v = threadIdx.x % 32 < kWarps - 1 ? smem[threadIdx.x % 32] : 0.0f;"),
    "block_sum: one slot past the partial sums read (tail bound <= kWarps)": (
        GNS, "  v = threadIdx.x % 32 < kWarps ? smem[threadIdx.x % 32] : 0.0f;",
        "  v = threadIdx.x % 32 <= kWarps ? smem[threadIdx.x % 32] : 0.0f;"),
    "forward_onepass: load tail bound e <= d": (
        GNS, "    v[i] = e < d ? to_float(x[ix.offset(n, g, e)]) : 0.0f;",
        "    v[i] = e <= d ? to_float(x[ix.offset(n, g, e)]) : 0.0f;"),
    "forward_onepass: variance counts the padding (no tail bound)": (
        GNS, "    sq += e < d ? dv * dv : 0.0f;", "    sq += dv * dv;"),
    "forward_stats_chunked: Welford loop skips the last element": (
        GNS, "for (int64_t e = threadIdx.x; e < d; e += kBlock) acc",
        "for (int64_t e = threadIdx.x; e < d - 1; e += kBlock) acc"),
    "backward_channel_sums (channels_last): channel tail bound ch <= c": (
        GNS, "    if (row == 0 && ch < c) {", "    if (row == 0 && ch <= c) {"),
    "backward_reduce: tail bound t <= n * groups": (
        GNS, "  if (t < n * groups) {", "  if (t <= n * groups) {"),
    "channels_last index: sample_channel takes the NCHW channel": (
        GNS, "  ch = CL ? i % c : (i / s) % c;", "  ch = CL ? (i / s) % c : (i / s) % c;"),
    "channels_last index: GroupIndex offset swaps row and channel": (
        GNS, "if (CL) return (n * s + e / cg) * c + g * cg + e % cg;",
        "if (CL) return (n * s + e % cg) * c + g * cg + e / cg;"),
    "channels_last backward: wrong channel block stride (16 instead of 32)": (
        GNS, "ch = blockIdx.y * 32 + threadIdx.x % 32;", "ch = blockIdx.y * 16 + threadIdx.x % 32;"),
    "backward_reduce: c2 from the dbeta sums": (GNS, "    c2[t] = bsum / d;", "    c2[t] = a / d;"),
    "steps: vector path taken on misaligned pointers": (
        STEPS, "{ return p == nullptr || reinterpret_cast<uintptr_t>(p) % bytes == 0; }", "{ return true; }"),
    "sampler step: vector path on a misaligned unconditional half (m_u not checked)": (
        STEPS, "aligned(m_u, bytes) && ", ""),
    "sampler step: scalar tail bound e <= numel in for_each_in_group": (
        STEPS, "    if (e < numel) {\n      if (e >= batch_end) {",
        "    if (e <= numel) {\n      if (e >= batch_end) {"),
    "sampler step: tail group deleted (numel / 4 groups)": (
        STEPS, "static_cast<uint64_t>(*a.seed) : 0;\n  const int64_t groups = (a.numel + 3) / 4;\n  for (int64_t g"
        " = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; g < groups;\n       g += static_cast<int64_t>"
        "(gridDim.x) * kThreads) {\n    const int64_t i = g * 4;\n    float xv[4], mc[4]",
        "static_cast<uint64_t>(*a.seed) : 0;\n  const int64_t groups = a.numel / 4;\n  for (int64_t g"
        " = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; g < groups;\n       g += static_cast<int64_t>"
        "(gridDim.x) * kThreads) {\n    const int64_t i = g * 4;\n    float xv[4], mc[4]"),
    "sampler step: the table row not looked up again after a batch boundary": (
        STEPS, "      if (e >= batch_end) {", "      if (k == 0) {"),
    "sampler step: no range check of the index (no __trap)": (
        STEPS, "  if (tb < 0 || tb >= num_rows) __trap();\n", ""),
    "sampler step: range check misses index == num_rows": (
        STEPS, "  if (tb < 0 || tb >= num_rows) __trap();", "  if (tb < 0 || tb > num_rows) __trap();"),
    "sampler step: Philox counter off by one group": (
        STEPS, "if (kNoise == kDrawnNoise) drawn_normals<T>(seed, g, z);",
        "if (kNoise == kDrawnNoise) drawn_normals<T>(seed, g + 1, z);"),
    "sampler step: Philox key loses its high 32 bits": (
        STEPS, "const uint64_t seed = kNoise == kDrawnNoise ? static_cast<uint64_t>(*a.seed) : 0;",
        "const uint64_t seed = kNoise == kDrawnNoise ? static_cast<uint32_t>(*a.seed) : 0;"),
    "sampler step: unconditional half read at per_batch instead of numel": (
        STEPS, "load4<T, kVec>(m + a.numel, i, a.numel, mu);", "load4<T, kVec>(m + a.per_batch, i, a.numel, mu);"),
    "sampler step: h2 read from h1": (
        STEPS, "load4<T, kVec>(static_cast<const T*>(a.h2), i, a.numel, h2);",
        "load4<T, kVec>(static_cast<const T*>(a.h1), i, a.numel, h2);"),
    "sampler step: x0 not stored": (
        STEPS, "    if (a.x0_out != nullptr) store4<T, kVec>(static_cast<T*>(a.x0_out), i, a.numel, x0);\n", ""),
    "shared step formula: guidance mixes from m_c instead of m_u": (
        STEP_H, "m_u + c.guidance_scale * (m_c - m_u)", "m_c + c.guidance_scale * (m_c - m_u)"),
    "shared step formula: guidance difference reversed": (
        STEP_H, "m_u + c.guidance_scale * (m_c - m_u)", "m_u + c.guidance_scale * (m_u - m_c)"),
    "shared step formula: h2 term missing": (STEP_H, "  if (terms.h2) out += c.out_from_h2 * h2;\n", ""),
    "shared step formula: h2 weighted by the h1 column": (
        STEP_H, "row[kOutFromH1],   row[kOutFromH2],", "row[kOutFromH1],   row[kOutFromH1],"),
    "shared step formula: clip bound 1 -> 2": (
        STEP_H, "x0 = x0 < -1.0f ? -1.0f : (x0 > 1.0f ? 1.0f : x0);",
        "x0 = x0 < -1.0f ? -1.0f : (x0 > 2.0f ? 2.0f : x0);"),
}


def apply(source_dir, path, text, replacement):
    full = os.path.join(source_dir, path)
    with open(full) as f:
        content = f.read()
    if content.count(text) != 1:
        raise SystemExit(f"mutation text found {content.count(text)} times in {path}:\n{text}")
    with open(full, "w") as f:
        f.write(content.replace(text, replacement))


def run(name, mutation, workdir, first=False):
    source_dir = os.path.join(workdir, "csrc")
    shutil.rmtree(source_dir, ignore_errors=True)
    shutil.copytree(os.path.join(ROOT, "csrc"), source_dir)
    apply(source_dir, *mutation)
    env = dict(os.environ, DDPM_FAST_EMULATION_SOURCES=source_dir)
    start = time.time()
    result = subprocess.run([sys.executable, "-m", "pytest", os.path.join(ROOT, "tests", "test_cuda_emulated.py"),
                             "-v", "-p", "no:cacheprovider", *(["-x"] if first else [])],
                            capture_output=True, text=True, env=env, cwd=workdir)
    counts = {}
    for test in re.findall(r"::(\w+)\S* (?:FAILED|ERROR)", result.stdout):
        counts[test] = counts.get(test, 0) + 1
    if result.returncode not in (0, 1):  # the test process died (e.g. of a corrupted heap): that fails too
        running = re.findall(r"::(\w+)\S*\s*$", result.stdout.strip().splitlines()[-1] if result.stdout.strip() else "")
        counts[f"process died (exit {result.returncode}) in {running[0] if running else '?'}"] = 1
    return counts, result, time.time() - start


def main(selected):
    first = "--first" in selected
    selected = [s for s in selected if s != "--first"]
    names = [n for n in MUTATIONS if not selected or any(s in n for s in selected)]
    survivors = []
    with tempfile.TemporaryDirectory() as workdir:
        for name in names:
            counts, result, seconds = run(name, MUTATIONS[name], workdir, first)
            caught = ", ".join(f"{test} ({count})" for test, count in sorted(counts.items(), key=lambda kv: -kv[1]))
            print(f"{name}\n    -> {caught or 'NOT CAUGHT'}  [{seconds:.0f} s]", flush=True)
            if not counts:
                survivors.append(name)
                print(result.stdout[-2000:], result.stderr[-2000:])
    if survivors:
        print(f"{len(survivors)} mutation(s) survived: {survivors}")
    return 1 if survivors else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
