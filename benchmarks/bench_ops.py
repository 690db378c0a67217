"""Benchmark the com.normfold CPU kernels against what onnxruntime runs without them.

For each op at three sizes, in one run, on the CPU provider with 2 intra-op threads
(onnxruntime optimizations on for every variant; all sessions share one global 2-thread pool, so
the idle spinning of one variant's pool cannot take a core from the next variant; X and a
preallocated Y are bound with IOBinding, so the time is the op's, as inside a model, without the
Python copy of the output):
  custom      the com.normfold op
  decomposed  the subgraph the PyTorch exporters leave (built with onnx.helper)
  standard    onnxruntime's standard op where one exists (LayerNormalization-17,
              GroupNormalization-21, RMSNormalization-23; channel-first LN as Transpose-LN-Transpose)
  copy        numpy copy of the same bytes (np.copyto into a preallocated array): the memory floor
Variants are timed in interleaved rounds (median), so load from other processes hits all alike.
The header of the report gives the machine, the load average before and after, and whether the
kernels ran their AVX2 loops (NORMFOLD_NO_AVX2=1 forces the baseline x86-64 loops). The sections of the
existing report from `## Fused activations` or `## Notes` on are kept.

`--activations` measures instead what a fused activation costs: GroupNorm with and without SiLU and
FilterResponseNorm with and without TLU at 8x128x64x64, each case in its own process (one session,
`--processes` processes per case in rotating order, `--rounds` runs each), with the AVX2 and the
baseline loops: CPU time of the kernel with 1 thread (the calling thread runs it, so other load on the
machine does not count) and wall time with 2 threads. It rewrites only the report's
`## Fused activations` section.

    python benchmarks/bench_ops.py [--rounds 40] [--only GroupNorm,RMS] [--out benchmarks/RESULTS_ops.md]
    python benchmarks/bench_ops.py --activations [--processes 7] [--rounds 40]
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
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.capi import _pybind_state

from normfold.ops.library import register_ops
from normfold.ops.table import DOMAIN

F = TensorProto.FLOAT


def model(nodes, x_shape, params, opset=17, out="Y"):
    """A graph with input X, constant `params` (name -> array) and output `out`."""
    inits = [numpy_helper.from_array(np.asarray(v), k) for k, v in params.items()]
    graph = helper.make_graph(nodes, "bench", [helper.make_tensor_value_info("X", F, list(x_shape))],
                              [helper.make_tensor_value_info(out, F, None)], initializer=inits)
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid(DOMAIN, 1)])
    m.ir_version = 10
    return m


def n(op, inputs, outputs, **attrs):
    return helper.make_node(op, inputs, outputs, **attrs)


def custom(op, inputs, **attrs):
    return [helper.make_node(op, ["X", *inputs], ["Y"], domain=DOMAIN, **attrs)]


def layer_norm_decomposed(axes, scale="scale", bias="bias"):
    """ReduceMean/Sub/Pow/ReduceMean/Add/Sqrt/Div/Mul/Add over `axes` (exporters at opset < 17, ConvNeXt LN2d)."""
    return [n("ReduceMean", ["X"], ["m"], axes=axes), n("Sub", ["X", "m"], ["d"]), n("Pow", ["d", "two"], ["d2"]),
            n("ReduceMean", ["d2"], ["v"], axes=axes), n("Add", ["v", "eps"], ["ve"]), n("Sqrt", ["ve"], ["s"]),
            n("Div", ["d", "s"], ["nrm"]), n("Mul", ["nrm", scale], ["sc"]), n("Add", ["sc", bias], ["Y"])]


def cases():
    """(op, shape, variants) with variants: name -> (model, inputs-are-X-only)."""
    rng = np.random.default_rng(0)
    two, eps = np.float32(2.0), np.float32(1e-5)
    for shape, groups in [((8, 128, 64, 64), 32), ((2, 320, 32, 32), 32), ((1, 64, 128, 128), 8)]:
        c = shape[1]
        g, b = rng.standard_normal(c).astype(np.float32), rng.standard_normal(c).astype(np.float32)
        cshape = np.array([1, c] + [1] * (len(shape) - 2), np.int64)
        dec = [n("Reshape", ["X", "gshape"], ["r"]), n("InstanceNormalization", ["r", "ones", "zeros"], ["i"], epsilon=1e-5),
               n("Reshape", ["i", "xshape"], ["r2"]), n("Mul", ["r2", "gc"], ["m"]), n("Add", ["m", "bc"], ["Y"])]
        yield "GroupNorm", shape, {
            "custom": model(custom("GroupNorm", ["scale", "bias"], num_groups=groups), shape, dict(scale=g, bias=b)),
            "decomposed": model(dec, shape, dict(gshape=np.array([shape[0], groups, -1], np.int64), xshape=np.array(shape, np.int64),
                                                 ones=np.ones(groups, np.float32), zeros=np.zeros(groups, np.float32),
                                                 gc=g.reshape(cshape), bc=b.reshape(cshape))),
            "standard": model([n("GroupNormalization", ["X", "scale", "bias"], ["Y"], num_groups=groups)], shape,
                              dict(scale=g, bias=b), opset=21),
        }
    for shape in [(8, 128, 64, 64), (8, 256, 56, 56), (1, 96, 56, 56)]:
        c = shape[1]
        g, b = rng.standard_normal(c).astype(np.float32), rng.standard_normal(c).astype(np.float32)
        cshape = np.array([1, c, 1, 1], np.int64)
        yield "LayerNorm channel-first", shape, {
            "custom": model(custom("LayerNorm", ["scale", "bias"], channel_first=1), shape, dict(scale=g, bias=b)),
            "decomposed": model(layer_norm_decomposed([1]), shape, dict(scale=g.reshape(cshape), bias=b.reshape(cshape), two=two, eps=eps)),
            "standard": model([n("Transpose", ["X"], ["t"], perm=[0, 2, 3, 1]), n("LayerNormalization", ["t", "scale", "bias"], ["l"], axis=-1),
                               n("Transpose", ["l"], ["Y"], perm=[0, 3, 1, 2])], shape, dict(scale=g, bias=b)),
        }
    for shape in [(32, 512, 1024), (8, 197, 768), (64, 128, 256)]:
        d = shape[-1]
        g, b = rng.standard_normal(d).astype(np.float32), rng.standard_normal(d).astype(np.float32)
        yield "LayerNorm last-axis", shape, {
            "custom": model(custom("LayerNorm", ["scale", "bias"], axis=-1), shape, dict(scale=g, bias=b)),
            "decomposed": model(layer_norm_decomposed([-1]), shape, dict(scale=g, bias=b, two=two, eps=eps)),
            "standard": model([n("LayerNormalization", ["X", "scale", "bias"], ["Y"], axis=-1)], shape, dict(scale=g, bias=b)),
        }
    for shape in [(32, 512, 1024), (8, 197, 768), (16, 256, 2048)]:
        g = rng.standard_normal(shape[-1]).astype(np.float32)
        dec = [n("Pow", ["X", "two"], ["p"]), n("ReduceMean", ["p"], ["m"], axes=[-1]), n("Add", ["m", "eps"], ["a"]),
               n("Sqrt", ["a"], ["s"]), n("Reciprocal", ["s"], ["r"]), n("Mul", ["X", "r"], ["nrm"]), n("Mul", ["nrm", "scale"], ["Y"])]
        yield "RMSNorm", shape, {
            "custom": model(custom("RMSNorm", ["scale"], epsilon=1e-5), shape, dict(scale=g)),
            "decomposed": model(dec, shape, dict(scale=g, two=two, eps=eps)),
            "standard": model([n("RMSNormalization", ["X", "scale"], ["Y"], axis=-1, epsilon=1e-5)], shape, dict(scale=g), opset=23),
        }
    for shape in [(8, 128, 64, 64), (8, 64, 112, 112), (32, 256, 14, 14)]:
        c = shape[1]
        p = {k: rng.standard_normal(c).astype(np.float32) for k in ("gamma", "beta", "tau")}
        pc = {k + "c": v.reshape(1, c, 1, 1) for k, v in p.items()}
        dec = [n("Pow", ["X", "two"], ["p"]), n("ReduceMean", ["p"], ["nu2"], axes=[2, 3]), n("Add", ["nu2", "eps"], ["a"]),
               n("Sqrt", ["a"], ["s"]), n("Reciprocal", ["s"], ["r"]), n("Mul", ["X", "r"], ["nrm"]),
               n("Mul", ["nrm", "gammac"], ["sc"]), n("Add", ["sc", "betac"], ["y"]), n("Max", ["y", "tauc"], ["Y"])]
        yield "FilterResponseNorm", shape, {
            "custom": model(custom("FilterResponseNorm", ["gamma", "beta", "tau"], epsilon=1e-5), shape, p),
            "decomposed": model(dec, shape, dict(pc, two=two, eps=eps)),
        }
    for shape in [(512, 512, 3, 3), (256, 128, 3, 3), (1024, 1024, 1, 1)]:
        g = rng.standard_normal(shape[0]).astype(np.float32)
        dec = [n("Pow", ["X", "two"], ["p"]), n("ReduceSum", ["p", "axes"], ["s"]), n("Sqrt", ["s"], ["nrm"]),
               n("Div", ["g4", "nrm"], ["f"]), n("Mul", ["X", "f"], ["Y"])]
        yield "WeightNorm", shape, {
            "custom": model(custom("WeightNorm", ["g"], dim=0), shape, dict(g=g)),
            "decomposed": model(dec, shape, dict(two=two, axes=np.array([1, 2, 3], np.int64), g4=g.reshape(-1, 1, 1, 1))),
        }


def session(m) -> ort.InferenceSession:
    """CPU session with every graph optimization, on the global 2-thread pool, com.normfold registered."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.use_per_session_threads = False
    options.log_severity_level = 3
    register_ops(options, "cpu")
    return ort.InferenceSession(m.SerializeToString(), options, providers=["CPUExecutionProvider"])


def measure(variants: dict, x: np.ndarray, rounds: int) -> dict:
    """Seconds of every round per variant, timed in interleaved rounds; a variant onnxruntime refuses is left out."""
    out = np.empty_like(x)
    runs = {}
    for name, m in variants.items():
        try:
            s = session(m)
        except Exception as exc:  # noqa: BLE001 - e.g. an op this onnxruntime does not implement
            print(f"  {name}: not run ({str(exc).splitlines()[0][:100]})", file=sys.stderr)
            continue
        binding = s.io_binding()
        binding.bind_cpu_input("X", x)
        binding.bind_output("Y", "cpu", 0, np.float32, list(x.shape), out.ctypes.data)
        runs[name] = lambda s=s, b=binding: s.run_with_iobinding(b)
    runs["copy"] = lambda: np.copyto(out, x)
    times = {name: [] for name in runs}
    for f in runs.values():
        f()
    for _ in range(rounds):
        for name, f in runs.items():
            start = time.perf_counter()
            f()
            times[name].append(time.perf_counter() - start)
    return {name: np.array(t) for name, t in times.items()}


def machine() -> str:
    """CPU model, core count and which loops the kernels run (AVX2 or baseline x86-64)."""
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")),
                 platform.processor() or platform.machine())
    flags = next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), [])
    avx2 = "avx2" in flags and "fma" in flags and os.environ.get("NORMFOLD_NO_AVX2", "0") in ("", "0")
    return f"{model}, {os.cpu_count()} cores; kernels' loops: {'AVX2+FMA' if avx2 else 'baseline x86-64 (SSE2)'}"


ACTIVATION_SHAPE = (8, 128, 64, 64)
ACTIVATION_CASES = {  # name -> (op, parameter inputs, attributes); each pair differs only in its activation
    "GroupNorm": ("GroupNorm", ("scale", "bias"), dict(num_groups=32)),
    "GroupNorm+SiLU": ("GroupNorm", ("scale", "bias"), dict(num_groups=32, activation="silu")),
    "FilterResponseNorm": ("FilterResponseNorm", ("gamma", "beta", "tau"), dict(use_tlu=0)),
    "FilterResponseNorm+TLU": ("FilterResponseNorm", ("gamma", "beta", "tau"), dict(use_tlu=1)),
}
ACTIVATION_PAIRS = [("GroupNorm+SiLU", "GroupNorm"), ("FilterResponseNorm+TLU", "FilterResponseNorm")]


def time_activation_case(name: str, threads: int, rounds: int) -> dict:
    """Median ms of `rounds` runs of one ACTIVATION_CASES model in this process's only session:
    wall time, and with 1 thread the calling thread's CPU time."""
    op, params, attrs = ACTIVATION_CASES[name]
    rng = np.random.default_rng(0)
    c = ACTIVATION_SHAPE[1]
    values = {k: rng.standard_normal(c).astype(np.float32) for k in params}
    m = model(custom(op, list(params), **attrs), ACTIVATION_SHAPE, values)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    register_ops(options, "cpu")
    s = ort.InferenceSession(m.SerializeToString(), options, providers=["CPUExecutionProvider"])
    x = (rng.standard_normal(ACTIVATION_SHAPE) + 0.5).astype(np.float32)
    out = np.empty_like(x)
    binding = s.io_binding()
    binding.bind_cpu_input("X", x)
    binding.bind_output("Y", "cpu", 0, np.float32, list(x.shape), out.ctypes.data)
    for _ in range(3):
        s.run_with_iobinding(binding)
    wall, cpu = [], []
    for _ in range(rounds):
        w, c0 = time.perf_counter(), time.thread_time()
        s.run_with_iobinding(binding)
        cpu.append(time.thread_time() - c0)
        wall.append(time.perf_counter() - w)
    return {"wall": float(np.median(wall)) * 1e3, "cpu": float(np.median(cpu)) * 1e3 if threads == 1 else None}


def activations(args) -> None:
    """Each ACTIVATION_CASES case in its own process, both loop variants, 1 and 2 threads; writes the section."""
    started, load_before = datetime.datetime.now(), os.getloadavg()
    names = list(ACTIVATION_CASES)
    results: dict = {}  # (loops, threads, name) -> per-process medians
    for p in range(args.processes):
        for loops in ("AVX2+FMA", "baseline"):
            for threads in (1, 2):
                for name in names[p % len(names):] + names[:p % len(names)]:  # rotate the order
                    env = {**os.environ, "NORMFOLD_NO_AVX2": "1" if loops == "baseline" else "0"}
                    cmd = [sys.executable, __file__, "--activation-case", name, "--threads", str(threads),
                           "--rounds", str(args.rounds)]
                    r = json.loads(subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout)
                    results.setdefault((loops, threads, name), []).append(r["cpu"] if threads == 1 else r["wall"])
        print(f"process round {p + 1}/{args.processes} done", file=sys.stderr, flush=True)
    rows = []
    for loops in ("AVX2+FMA", "baseline"):
        for threads in (1, 2):
            for fused, plain in ACTIVATION_PAIRS:
                a, b = np.array(results[(loops, threads, fused)]), np.array(results[(loops, threads, plain)])
                noise = [np.subtract(*np.percentile(v, [75, 25])) / np.median(v) for v in (a, b)]
                ratio = float(np.median(a) / np.median(b))
                rows.append(f"| {fused} / {plain} | {loops} | {threads} | {'CPU' if threads == 1 else 'wall'} "
                            f"| {np.median(a):.2f} | {np.median(b):.2f} | {ratio:.2f}x | ±{sum(noise) * ratio:.2f} |")
                print(rows[-1], flush=True)
    write_activations(args, rows, started, load_before, os.getloadavg())


def write_activations(args, rows, started, load_before, load_after) -> None:
    """Replace (or add, before `## Notes`) the report's `## Fused activations` section."""
    command = "python benchmarks/bench_ops.py --activations" \
        + (f" --processes {args.processes}" if args.processes != 7 else "") \
        + (f" --rounds {args.rounds}" if args.rounds != 40 else "")
    section = "\n".join([
        "## Fused activations", "",
        f"Date: {started:%Y-%m-%d %H:%M}. Machine: {machine().split(';')[0]}; onnxruntime {ort.__version__}, fp32, "
        f"{'x'.join(map(str, ACTIVATION_SHAPE))}.",
        f"Command: `{command}`. Load average (1/5/15 min) before: {'/'.join(f'{v:.1f}' for v in load_before)}, "
        f"after: {'/'.join(f'{v:.1f}' for v in load_after)}.", "",
        f"Each case in its own process ({args.processes} processes per case, rotating order, {args.rounds} runs each, "
        "one session per process). With 1 thread the time is the kernel's CPU time in the calling thread "
        "(median per process, then median over processes), which load from other processes does not inflate; "
        "with 2 threads it is wall time. `noise` = the sum of both cases' interquartile ranges / medians "
        "over processes, times the ratio.", "",
        "| fused / alone | loops | threads | time | fused ms | alone ms | ratio | noise |",
        "|---|---|---|---|---|---|---|---|", *rows, "", ""])
    old = args.out.read_text() if args.out.exists() else ""
    if "\n## Fused activations" in old:
        start = old.index("\n## Fused activations") + 1
        end = old.find("\n## ", start)
        new = old[:start] + section + (old[end + 1:] if end >= 0 else "")
    elif "\n## Notes" in old:
        start = old.index("\n## Notes") + 1
        new = old[:start] + section + old[start:]
    else:
        new = old + "\n" + section
    args.out.write_text(new)
    print(f"wrote {args.out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--only", default="", help="comma-separated substrings of op names to run (default: all)")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "RESULTS_ops.md")
    parser.add_argument("--activations", action="store_true", help="measure the fused activations instead (see above)")
    parser.add_argument("--processes", type=int, default=7, help="with --activations: processes per case")
    parser.add_argument("--activation-case", choices=list(ACTIVATION_CASES), help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.activation_case:  # one case in this process: print its medians as JSON
        print(json.dumps(time_activation_case(args.activation_case, args.threads, args.rounds)))
        return
    if args.activations:
        activations(args)
        return
    _pybind_state.set_global_thread_pool_sizes(2, 1)  # before the first session creates the environment
    started, load_before = datetime.datetime.now(), os.getloadavg()
    rng = np.random.default_rng(1)
    rows, min_rows, best_ratio = [], [], {}
    for op, shape, variants in cases():
        x = (rng.standard_normal(shape) + 0.5).astype(np.float32)
        if args.only and not any(part in op for part in args.only.split(",")):
            continue
        times = measure(variants, x, args.rounds)
        spread = max(np.subtract(*np.percentile(v, [75, 25])) / np.median(v) for v in times.values())
        for stat, out in ((np.median, rows), (np.min, min_rows)):
            t = {k: float(stat(v)) for k, v in times.items()}
            existing = {k: v for k, v in t.items() if k in ("decomposed", "standard")}
            best = min(existing, key=existing.get)
            speedup = existing[best] / t["custom"]
            if stat is np.median:
                best_ratio.setdefault(op, []).append((speedup, t.get("standard"), t["custom"]))
            cells = [f"{t[k] * 1e3:.2f}" if k in t else "n/a" for k in ("custom", "decomposed", "standard", "copy")]
            out.append(f"| {op} | {'x'.join(map(str, shape))} | " + " | ".join(cells)
                       + f" | {best} | {speedup:.2f}x | {t['custom'] / t['copy']:.2f} |" + (f" {spread:.0%} |" if out is rows else ""))
        print(rows[-1], flush=True)
    auto = []
    for op, results in best_ratio.items():
        faster_than_standard = [std is None or custom < std for _, std, custom in results]
        pick = "custom" if all(faster_than_standard) else ("standard" if not any(faster_than_standard) else "custom (mixed)")
        vs_standard = ", ".join(f"{std / custom:.2f}x" if std else "n/a" for _, std, custom in results)
        auto.append(f"| {op} | {pick} | {', '.join(f'{s:.2f}x' for s, _, _ in results)} | {vs_standard} |")
    write(args, rows, min_rows, auto, started, load_before, os.getloadavg())


def write(args, rows, min_rows, auto, started, load_before, load_after) -> None:
    old = args.out.read_text() if args.out.exists() else ""
    kept = [old.index(h) for h in ("\n## Fused activations", "\n## Notes") if h in old]
    notes = old[min(kept) + 1:] if kept else ""
    command = "python benchmarks/bench_ops.py" + (f" --rounds {args.rounds}" if args.rounds != 40 else "") \
        + (f" --only {shlex.quote(args.only)}" if args.only else "")
    lines = [
        "# Custom-op benchmark (CPU, 2 threads)", "",
        f"Date: {started:%Y-%m-%d %H:%M}. Machine: {machine()}; onnxruntime {ort.__version__}, numpy {np.__version__}, fp32.",
        f"Command: `{command}` ({args.rounds} rounds). Load average (1/5/15 min) before: "
        f"{'/'.join(f'{v:.1f}' for v in load_before)}, after: {'/'.join(f'{v:.1f}' for v in load_after)}.", "",
        "Median ms per run over interleaved rounds; onnxruntime optimizations on for every variant, one shared",
        "2-thread pool, output written into a preallocated array (IOBinding).",
        "`speedup` = best existing onnxruntime path (decomposed export or standard op) / custom op;",
        "`custom/copy` = custom op time / numpy copy of the same bytes (single-threaded `np.copyto`);",
        "`noise` = the largest interquartile range / median among the row's variants.", "",
        "| op | shape | custom | decomposed | standard | copy | best existing | speedup | custom/copy | noise |",
        "|---|---|---|---|---|---|---|---|---|---|", *rows, "",
        "## Best round (min) instead of median", "",
        "Each variant's fastest round: the time with the least interference from other processes.", "",
        "| op | shape | custom | decomposed | standard | copy | best existing | speedup | custom/copy |",
        "|---|---|---|---|---|---|---|---|---|", *min_rows, "",
        "## What `--target auto` should pick (custom where it beat the standard op at every size, medians)", "",
        "| op | pick | speedup over best existing path, per size | standard op / custom, per size |",
        "|---|---|---|---|", *auto, "",
    ]
    args.out.write_text("\n".join(lines) + ("\n" + notes if notes else ""))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
