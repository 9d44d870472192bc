"""Turns a pytest-benchmark JSON file of this suite into a markdown table (CPU or GPU run).

    python benchmarks/report.py bench.json [-o bench.md] [--title "..."]

Columns: op, size, dtype, layout, provider, median, GB/s, fraction of the copy bandwidth and the
speedup over the seed's eager code of the same case; then the end-to-end sampling results and
the issue's goals with the measured value beside each.
"""

import argparse
import json
import math
import sys

FUSED = ("triton", "cuda", "cpu")
PROVIDER_ORDER = ("seed_eager", "diffusers", "torch_compile", "triton", "cuda", "cpu",
                  "fused", "seed_eager_cuda_graph", "fused_cuda_graph")
BASELINES = ("seed_eager", "diffusers")  # what "speedup" compares against, in order of preference
# (op, goal on the CPU: speedup over seed_eager, goal on a GPU: fraction of copy bandwidth)
OP_GOALS = {
    "reverse_step": (3.0, 0.90),
    "q_sample": (2.0, 0.90),
    "ddim_step": (None, 0.90),
    "gn_silu_forward": (1.8, 0.85),
    "gn_silu_forward_backward": (1.5, 0.85),
}
CPU_REFERENCE_NUMEL = {"reverse_step": 256 * 3 * 32 * 32, "q_sample": 256 * 3 * 32 * 32,
                       "gn_silu_forward": 32 * 128 * 32 * 32, "gn_silu_forward_backward": 32 * 128 * 32 * 32}


def load(path):
    with open(path) as f:
        data = json.load(f)
    rows = []
    for bench in data.get("benchmarks", []):
        info = bench.get("extra_info", {})
        if "op" not in info:
            continue
        row = dict(info, name=bench["name"], median=bench["stats"]["median"], min=bench["stats"]["min"])
        row["size"] = f"{info['preset']} b{info['batch']}" if "preset" in info else "x".join(map(str, info["shape"]))
        row["numel"] = math.prod(info["shape"])
        rows.append(row)
    return data, rows


def case_key(row):
    return row["op"], row["size"], row["dtype"], row["layout"]


def speedups(rows):
    """median(baseline) / median(row) for every row whose case has a baseline result.

    The baseline of a case is the seed's eager code, or diffusers where the seed has no such op.
    """
    baseline = {}
    for provider in reversed(BASELINES):
        baseline.update({case_key(r): r["median"] for r in rows if r["provider"] == provider})
    return {id(r): baseline[case_key(r)] / r["median"] for r in rows if case_key(r) in baseline}


def fmt_time(seconds):
    if seconds >= 1:
        return f"{seconds:.3f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.3f} ms"
    return f"{seconds * 1e6:.1f} us"


def fmt(value, spec, missing="-"):
    return missing if value is None else format(value, spec)


def sort_key(row):
    order = PROVIDER_ORDER.index(row["provider"]) if row["provider"] in PROVIDER_ORDER else len(PROVIDER_ORDER)
    return row["op"], row["numel"], row["dtype"], row["layout"], order


def best_fused(rows, key):
    fused = [r for r in rows if case_key(r) == key and r["provider"] in FUSED]
    return min(fused, key=lambda r: r["median"]) if fused else None


def goal_lines(rows, ratio, on_gpu):
    lines = ["| goal | case | measured | met |", "|---|---|---|---|"]
    cases = sorted({case_key(r) for r in rows if r["op"] in OP_GOALS}, key=lambda k: (k[0], k[1], k[2], k[3]))
    for key in cases:
        op = key[0]
        cpu_goal, gpu_goal = OP_GOALS[op]
        best = best_fused(rows, key)
        if best is None:
            continue
        label = f"{op} {key[1]} {key[2]} {key[3]} ({best['provider']})"
        if on_gpu:
            if best["numel"] < 2**24:
                continue
            fraction = best.get("copy_fraction")
            lines.append(f"| >= {gpu_goal:.0%} of copy bandwidth | {label} | {fmt(fraction, '.1%')} | "
                         f"{'yes' if fraction is not None and fraction >= gpu_goal else 'no'} |")
            compiled = [r for r in rows if case_key(r) == key and r["provider"] == "torch_compile"]
            if compiled:
                gain = compiled[0]["median"] / best["median"]
                lines.append(f"| faster than torch.compile | {label} | {gain:.2f}x | {'yes' if gain > 1 else 'no'} |")
        elif cpu_goal is not None and best["numel"] == CPU_REFERENCE_NUMEL.get(op):
            value = ratio.get(id(best))
            lines.append(f"| >= {cpu_goal}x seed_eager | {label} | {fmt(value, '.2f')}x | "
                         f"{'yes' if value is not None and value >= cpu_goal else 'no'} |")
    if on_gpu:
        for provider, batch, goal in (("fused", 128, 1.25), ("fused_cuda_graph", 1, 2.0)):
            for r in rows:
                if r["op"] == "sampling_step" and r["provider"] == provider and r["batch"] == batch:
                    value = ratio.get(id(r))
                    lines.append(f"| >= {goal}x seed_eager | sampling_step {r['size']} ({provider}) | "
                                 f"{fmt(value, '.2f')}x | {'yes' if value is not None and value >= goal else 'no'} |")
    return lines if len(lines) > 2 else []


def render(data, rows, title=None):
    ratio = speedups(rows)
    machine = data.get("machine_info", {})
    devices = sorted({r.get("device", "?") for r in rows})
    on_gpu = any(not d.startswith("cpu") for d in devices)
    copy = next((r["copy_gbps"] for r in rows if r.get("copy_gbps")), None)
    out = [f"# {title or 'ddpm_fast benchmarks'}", ""]
    out.append(f"- date: {data.get('datetime', '?')}")
    out.append(f"- device: {', '.join(devices)}; CPU: {machine.get('cpu', {}).get('brand_raw', '?')}")
    out.append(f"- torch {machine.get('torch', '?')}, python {machine.get('python_version', '?')}")
    if "load_average_at_start" in machine:
        loads = [", ".join(f"{v:.1f}" for v in machine[k]) for k in ("load_average_at_start", "load_average_at_end")]
        out.append(f"- load average (1, 5, 15 min) at start: {loads[0]}; at end: {loads[1]}")
    if copy:
        out.append(f"- copy bandwidth (dst.copy_(src), 256 MiB): {copy:.1f} GB/s")
    out.append("- GB/s from the minimal bytes each op moves and the median time; "
               "speedup = baseline median / median of the same case (baseline: seed_eager, else diffusers)")
    out.append("")

    op_rows = sorted((r for r in rows if "bytes" in r), key=sort_key)
    if op_rows:
        out += ["## Fused ops", "",
                "| op | size | dtype | layout | provider | median | min | GB/s | of copy | vs baseline |",
                "|---|---|---|---|---|---:|---:|---:|---:|---:|"]
        for r in op_rows:
            out.append(f"| {r['op']} | {r['size']} | {r['dtype']} | {r['layout']} | {r['provider']} | "
                       f"{fmt_time(r['median'])} | {fmt_time(r['min'])} | {r['gbps']:.1f} | "
                       f"{fmt(r.get('copy_fraction'), '.0%')} | "
                       f"{fmt(ratio.get(id(r)), '.2f')}x |")
        out.append("")

    e2e_rows = sorted((r for r in rows if "bytes" not in r), key=sort_key)
    if e2e_rows:
        out += ["## End to end (UNet + step)", "",
                "| op | model, batch | dtype | layout | provider | median | min | images/s | vs baseline |",
                "|---|---|---|---|---|---:|---:|---:|---:|"]
        for r in e2e_rows:
            out.append(f"| {r['op']} | {r['size']} | {r['dtype']} | {r['layout']} | {r['provider']} | "
                       f"{fmt_time(r['median'])} | {fmt_time(r['min'])} | {fmt(r.get('images_per_s'), '.1f')} | "
                       f"{fmt(ratio.get(id(r)), '.2f')}x |")
        out.append("")

    goals = goal_lines(rows, ratio, on_gpu)
    if goals:
        out += ["## Goals", ""] + goals + [""]
    return "\n".join(out)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json", help="pytest-benchmark JSON (--benchmark-json)")
    parser.add_argument("-o", "--output", help="markdown file to write (default: stdout)")
    parser.add_argument("--title", help="heading of the report")
    args = parser.parse_args(argv)
    data, rows = load(args.json)
    text = render(data, rows, args.title)
    if args.output:
        with open(args.output, "w") as f:
            f.write(text)
    else:
        sys.stdout.write(text)


if __name__ == "__main__":
    main()
