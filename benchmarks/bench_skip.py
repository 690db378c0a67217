"""Does fusing an add into the norm pay off? `Add(X, skip) → norm` against the fused ops.

Each case (an op at one shape) runs in its own process (a fresh onnxruntime environment, as
deployed), CPU provider, `--threads` intra-op threads, onnxruntime optimizations on for every
variant. The variants of a case are timed in interleaved rounds on the same inputs (bound with
IOBinding into preallocated outputs), and each is reported as the median over rounds of its time
relative to `add+custom` (what `normfold fuse` wrote before this op existed), with the half-width
of the interquartile range of those per-round ratios as the noise:

  add+custom      Add → com.normfold.LayerNorm / RMSNorm (fuse's output at opset < 17 / < 23)
  add+standard    Add → LayerNormalization-17 / RMSNormalization-23 (onnxruntime fuses the first
                  into its own SkipLayerNormalization)
  skip            com.normfold.SkipLayerNorm / SkipRMSNorm (sum not output)
  skip+sum        the same, with the sum as a second output (another node reads it)
  copy            numpy X + skip into Y (read both, write one): the memory floor

and for `Add(X, t[N, C, 1, 1]) → GroupNorm(32 groups) + SiLU` (the time-embedding add):

  add+custom      Add → com.normfold.GroupNorm (silu)
  exported        the exporter's Add → Reshape → InstanceNormalization → Reshape → Mul → Add → Sigmoid → Mul
  skip            com.normfold.BiasGroupNorm (silu)

    python benchmarks/bench_skip.py [--rounds 60] [--threads 2] [--out benchmarks/RESULTS_skip.md]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from onnx import TensorProto, helper, numpy_helper

F = TensorProto.FLOAT
SHAPES = {"LayerNorm": [(8, 197, 768), (1, 512, 4096), (32, 128, 256)],
          "RMSNorm": [(8, 197, 768), (1, 512, 4096), (32, 128, 256)],
          "GroupNorm": [(2, 320, 32, 32), (2, 128, 64, 64), (1, 512, 16, 16)]}
OPS = {"LayerNorm": ("LayerNormalization", 17), "RMSNorm": ("RMSNormalization", 23)}


def model(nodes, d, params, opset, outputs=("Y",)):
    inits = [numpy_helper.from_array(v, k) for k, v in params.items()]
    graph = helper.make_graph(nodes, "bench", [helper.make_tensor_value_info(k, F, None) for k in ("X", "skip")],
                              [helper.make_tensor_value_info(o, F, None) for o in outputs], initializer=inits)
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid("com.normfold", 1)])
    m.ir_version = 10
    return m


def group_norm_variants(c: int) -> dict:
    """Add(X, t[N, C, 1, 1]) → GroupNorm(32 groups)+SiLU: before and after, and as exported."""
    rng = np.random.default_rng(0)
    groups = 32
    params = {"scale": rng.standard_normal(c).astype(np.float32), "bias": rng.standard_normal(c).astype(np.float32)}
    attrs = {"num_groups": groups, "epsilon": 1e-5, "activation": "silu"}
    exported = {**params, "gshape": np.array([0, groups, -1], np.int64), "ones": np.ones(groups, np.float32),
                "zeros": np.zeros(groups, np.float32), "gc": params["scale"].reshape(c, 1, 1),
                "bc": params["bias"].reshape(c, 1, 1)}
    add = helper.make_node("Add", ["X", "skip"], ["S"])
    decomposed = [add, helper.make_node("Reshape", ["S", "gshape"], ["r"]),
                  helper.make_node("InstanceNormalization", ["r", "ones", "zeros"], ["i"], epsilon=1e-5),
                  helper.make_node("Shape", ["S"], ["xshape"]), helper.make_node("Reshape", ["i", "xshape"], ["r2"]),
                  helper.make_node("Mul", ["r2", "gc"], ["m"]), helper.make_node("Add", ["m", "bc"], ["g"]),
                  helper.make_node("Sigmoid", ["g"], ["sg"]), helper.make_node("Mul", ["g", "sg"], ["Y"])]
    return {
        "add+custom": model([add, helper.make_node("GroupNorm", ["S", "scale", "bias"], ["Y"], domain="com.normfold",
                                                   **attrs)], c, params, 17),
        "exported": model(decomposed, c, exported, 17),
        "skip": model([helper.make_node("BiasGroupNorm", ["X", "skip", "scale", "bias"], ["Y"],
                                        domain="com.normfold", **attrs)], c, params, 17),
    }


def variants(op: str, d: int) -> dict:
    if op == "GroupNorm":
        return group_norm_variants(d)
    rng = np.random.default_rng(0)
    params = {"scale": rng.standard_normal(d).astype(np.float32)}
    if op == "LayerNorm":
        params["bias"] = rng.standard_normal(d).astype(np.float32)
    names = list(params)
    attrs = {"epsilon": 1e-5}
    standard, opset = OPS[op]
    add = helper.make_node("Add", ["X", "skip"], ["S"])
    return {
        "add+custom": model([add, helper.make_node(op, ["S", *names], ["Y"], domain="com.normfold", **attrs)],
                            d, params, 17),
        "add+standard": model([add, helper.make_node(standard, ["S", *names], ["Y"], axis=-1, **attrs)], d, params,
                              opset),
        "skip": model([helper.make_node(f"Skip{op}", ["X", "skip", *names], ["Y"], domain="com.normfold", **attrs)],
                      d, params, 17),
        "skip+sum": model([helper.make_node(f"Skip{op}", ["X", "skip", *names], ["Y", "S"], domain="com.normfold",
                                            **attrs)], d, params, 17, outputs=("Y", "S")),
    }


def run_case(op: str, shape: tuple, rounds: int, threads: int) -> dict:
    import onnxruntime as ort

    from normfold.ops.library import register_ops

    rng = np.random.default_rng(1)
    x = rng.standard_normal(shape).astype(np.float32)
    skip = rng.standard_normal(shape[:2] + (1,) * (len(shape) - 2) if op == "GroupNorm" else shape).astype(np.float32)
    y, s = np.empty_like(x), np.empty_like(x)
    runs = {}
    for name, m in variants(op, shape[1] if op == "GroupNorm" else shape[-1]).items():
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.log_severity_level = 3
        register_ops(options, "cpu")
        try:
            sess = ort.InferenceSession(m.SerializeToString(), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # noqa: BLE001 - an op this onnxruntime does not implement
            print(f"  {name}: not run ({str(exc).splitlines()[0][:100]})", file=sys.stderr)
            continue
        b = sess.io_binding()
        b.bind_cpu_input("X", x)
        b.bind_cpu_input("skip", skip)
        b.bind_output("Y", "cpu", 0, np.float32, list(shape), y.ctypes.data)
        if name == "skip+sum":
            b.bind_output("S", "cpu", 0, np.float32, list(shape), s.ctypes.data)
        runs[name] = lambda sess=sess, b=b: sess.run_with_iobinding(b)

    def copy():  # X (and skip) read, Y written
        np.add(x, skip, out=y)

    runs["copy"] = copy
    for f in runs.values():
        f()
    times = {name: [] for name in runs}
    for r in range(rounds):
        order = list(runs) if r % 2 == 0 else list(reversed(runs))
        for name in order:
            start = time.perf_counter()
            runs[name]()
            times[name].append(time.perf_counter() - start)
    base = np.array(times["add+custom"])
    out = {}
    for name, t in times.items():
        ratio = np.array(t) / base
        q1, q3 = np.percentile(ratio, [25, 75])
        out[name] = {"ms": float(np.median(t) * 1e3), "vs_add_custom": float(np.median(ratio)),
                     "noise": float((q3 - q1) / 2)}
    return out


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return f"{cpu}, {os.cpu_count()} cores, {platform.system()} {platform.release()}, Python {platform.python_version()}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=60)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("RESULTS_skip.md"))
    parser.add_argument("--case", help=argparse.SUPPRESS)  # OP:SHAPE, run in this process (the child)
    args = parser.parse_args()
    if args.case:
        op, shape = args.case.split(":")
        print(json.dumps(run_case(op, tuple(int(v) for v in shape.split("x")), args.rounds, args.threads)))
        return
    started = datetime.datetime.now(datetime.timezone.utc)
    load_before = os.getloadavg()
    rows = []
    for op, shapes in SHAPES.items():
        for shape in shapes:
            case = f"{op}:{'x'.join(map(str, shape))}"
            done = subprocess.run([sys.executable, __file__, "--case", case, "--rounds", str(args.rounds),
                                   "--threads", str(args.threads)], capture_output=True, text=True, check=True)
            rows.append((op, shape, json.loads(done.stdout.strip().splitlines()[-1])))
            print(case, {k: round(v["vs_add_custom"], 3) for k, v in rows[-1][2].items()}, file=sys.stderr)
    names = ["add+custom", "add+standard", "exported", "skip", "skip+sum", "copy"]
    lines = [
        "# Adds fused into the norm: `benchmarks/bench_skip.py`", "",
        f"- machine: {machine()}",
        f"- command: `python benchmarks/{Path(__file__).name} {shlex.join(sys.argv[1:])}`",
        f"- date: {started:%Y-%m-%d %H:%M} UTC; load average before {load_before[0]:.2f}, "
        f"after {os.getloadavg()[0]:.2f}",
        f"- CPU provider, {args.threads} intra-op threads, onnxruntime optimizations on, each case in its own "
        f"process, {args.rounds} interleaved rounds; float32",
        "- each cell: median time relative to `add+custom` (< 1: faster) ± half the interquartile range of "
        "the per-round ratios; `add+custom` in ms", "",
        "| op | shape | " + " | ".join(names) + " |", "|---|---|" + "---:|" * len(names),
    ]
    for op, shape, result in rows:
        cells = []
        for name in names:
            if name not in result:
                cells.append("—")
            elif name == "add+custom":
                cells.append(f"{result[name]['ms']:.3f} ms")
            else:
                cells.append(f"{result[name]['vs_add_custom']:.2f} ± {result[name]['noise']:.2f}")
        lines.append(f"| {op} | {'x'.join(map(str, shape))} | " + " | ".join(cells) + " |")
    args.out.write_text("\n".join(lines) + "\n")
    print(args.out.read_text())


if __name__ == "__main__":
    main()
