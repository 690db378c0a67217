"""Benchmark the com.normfold CPU kernels against what onnxruntime runs without them and against a copy.

Every op of normfold's op table that has a CPU kernel, at large sizes (8 MB or more per tensor) and a
small one, on the CPU provider (onnxruntime optimizations on for every variant; inputs and
preallocated outputs bound with IOBinding, so the time is the op's, as inside a model):
  custom      the com.normfold op
  decomposed  the subgraph the PyTorch exporters leave (built with onnx.helper); for the add-fused
              ops, the Add followed by it
  standard    onnxruntime's standard ops where they exist (LayerNormalization-17,
              GroupNormalization-21, RMSNormalization-23, after the Add for the add-fused ops;
              channel-first LN as Transpose-LN-Transpose)
  copy        the physical floor: an onnxruntime graph that reads the op's large inputs and writes its
              outputs once (Add of a runtime zero, or X + skip), in a session with the op's thread count
Each variant runs in its own process (one session, `--rounds` runs, `--processes` processes per
variant in rotating order) with 1 intra-op thread, where the time is the CPU time of the calling
thread (it runs the kernel, so load from other processes does not count), and custom and copy once
more with 2 threads, where it is wall time (as deployed). Ratios are of medians over processes; the noise is the
sum of the two variants' interquartile ranges / medians over processes, times the ratio. The
header of the report gives the machine, the load average before and after, and whether the kernels
ran their AVX-512, AVX2 or baseline x86-64 loops (NORMFOLD_LOOPS=avx2|baseline caps them). The sections of the
existing report from `## Fused activations` or `## Notes` on are kept.

`--activations` measures instead what a fused activation costs: GroupNorm with and without SiLU and
FilterResponseNorm with and without TLU at 8x128x64x64, each case in its own process, with the
widest loops the CPU has and the baseline loops, 1 thread (CPU time) and 2 threads (wall time). It rewrites only the
report's `## Fused activations` section.

    python -m benchmarks.bench_ops [--processes 3] [--rounds 40] [--only GroupNorm,RMS] [--out benchmarks/RESULTS_ops.md]
    python -m benchmarks.bench_ops --activations [--processes 7] [--rounds 40]
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
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from normfold.errors import NormfoldError
from normfold.ops.library import cpu_loops, ops_library_path
from normfold.ops.table import DOMAIN
from normfold.runtime.session import make_session

F = TensorProto.FLOAT


def model(nodes, inputs: dict, params: dict, opset: int = 17, outputs=("Y",)):
    """A graph with float inputs `inputs` (name -> shape), constants `params` (name -> array) and float `outputs`."""
    inits = [numpy_helper.from_array(np.asarray(v), k) for k, v in params.items()]
    graph = helper.make_graph(nodes, "bench", [helper.make_tensor_value_info(k, F, list(s)) for k, s in inputs.items()],
                              [helper.make_tensor_value_info(o, F, None) for o in outputs], initializer=inits)
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid(DOMAIN, 1)])
    m.ir_version = 10
    return m


def n(op, inputs, outputs, **attrs):
    return helper.make_node(op, inputs, outputs, **attrs)


def silu(nodes, y="Y"):
    """`nodes` (which write "Yn") followed by y = Yn·sigmoid(Yn)."""
    return [*nodes, n("Sigmoid", ["Yn"], ["sg"]), n("Mul", ["Yn", "sg"], [y])]


def layer_norm_decomposed(axes, x="X", y="Y"):
    """ReduceMean/Sub/Pow/ReduceMean/Add/Sqrt/Div/Mul/Add over `axes` (exporters at opset < 17, ConvNeXt LN2d)."""
    return [n("ReduceMean", [x], ["m"], axes=axes), n("Sub", [x, "m"], ["d"]), n("Pow", ["d", "two"], ["d2"]),
            n("ReduceMean", ["d2"], ["v"], axes=axes), n("Add", ["v", "eps"], ["ve"]), n("Sqrt", ["ve"], ["s"]),
            n("Div", ["d", "s"], ["nrm"]), n("Mul", ["nrm", "scale"], ["sc"]), n("Add", ["sc", "bias"], [y])]


def rms_norm_decomposed(x="X", y="Y"):
    return [n("Pow", [x, "two"], ["p"]), n("ReduceMean", ["p"], ["m"], axes=[-1]), n("Add", ["m", "eps"], ["a"]),
            n("Sqrt", ["a"], ["s"]), n("Reciprocal", ["s"], ["r"]), n("Mul", [x, "r"], ["nrm"]), n("Mul", ["nrm", "scale"], [y])]


@dataclass
class Row:
    """One op at one shape: its graph inputs and outputs and its variants (name -> model)."""

    op: str
    shape: tuple
    inputs: dict
    outputs: tuple
    variants: dict

    @property
    def copy_model(self):
        """The floor: reads each input of X's size once and writes each output once (onnxruntime's Add; the
        tensors flattened, so that no trailing 1-sized axis puts the Add on its per-element broadcast path)."""
        size = int(np.prod(self.shape))
        big = [k for k, s in self.inputs.items() if int(np.prod(s)) == size]
        if len(big) == 2 and len(self.outputs) == 1:
            nodes = [n("Add", big, list(self.outputs))]
        else:
            nodes = [n("Add", [src, "zero"], [out]) for src, out in zip(big, self.outputs)]
        return model(nodes, {**{k: (size,) for k in big}, "zero": (1,)}, {}, outputs=self.outputs)

    @property
    def megabytes(self) -> float:
        """fp32 bytes the copy reads and writes."""
        size = int(np.prod(self.shape))
        reads = sum(int(np.prod(s)) == size for s in self.inputs.values())
        return (reads + len(self.outputs)) * size * 4 / 1e6


def group_norm_rows(rng):
    """GroupNorm, GroupNorm+SiLU, BiasGroupNorm(+SiLU): X (+ add[N, C, 1, 1]) -> Y."""
    sizes = {"GroupNorm": [((8, 128, 64, 64), 32), ((1, 512, 64, 64), 32), ((2, 320, 32, 32), 32), ((1, 64, 32, 32), 8)],
             "GroupNorm+SiLU": [((8, 128, 64, 64), 32), ((2, 320, 32, 32), 32)],
             "BiasGroupNorm": [((8, 128, 64, 64), 32), ((2, 320, 32, 32), 32)],
             "BiasGroupNorm+SiLU": [((8, 128, 64, 64), 32), ((2, 320, 32, 32), 32)]}
    for op, shapes in sizes.items():
        for shape, groups in shapes:
            c, with_add, act = shape[1], op.startswith("Bias"), op.endswith("SiLU")
            g, b = rng.standard_normal(c).astype(np.float32), rng.standard_normal(c).astype(np.float32)
            cshape = [1, c] + [1] * (len(shape) - 2)
            inputs = {"X": shape, **({"add": shape[:2] + (1,) * (len(shape) - 2)} if with_add else {})}
            x, pre = ("S", [n("Add", ["X", "add"], ["S"])]) if with_add else ("X", [])
            y = "Yn" if act else "Y"
            finish = silu if act else (lambda nodes: nodes)
            attrs = dict(num_groups=groups, **({"activation": "silu"} if act else {}))
            dec = [*pre, n("Reshape", [x, "gshape"], ["r"]), n("InstanceNormalization", ["r", "ones", "zeros"], ["i"], epsilon=1e-5),
                   n("Reshape", ["i", "xshape"], ["r2"]), n("Mul", ["r2", "gc"], ["m"]), n("Add", ["m", "bc"], [y])]
            dec_params = dict(gshape=np.array([shape[0], groups, -1], np.int64), xshape=np.array(shape, np.int64),
                              ones=np.ones(groups, np.float32), zeros=np.zeros(groups, np.float32),
                              gc=g.reshape(cshape), bc=b.reshape(cshape))
            kernel = "BiasGroupNorm" if with_add else "GroupNorm"
            yield Row(op, shape, inputs, ("Y",), {
                "custom": model([n(kernel, list(inputs) + ["scale", "bias"], ["Y"], domain=DOMAIN, **attrs)], inputs,
                                dict(scale=g, bias=b)),
                "decomposed": model(finish(dec), inputs, dec_params),
                "standard": model(finish([*pre, n("GroupNormalization", [x, "scale", "bias"], [y], num_groups=groups)]),
                                  inputs, dict(scale=g, bias=b), opset=21),
            })


def layer_norm_rows(rng):
    """LayerNorm channel-first and last-axis, RMSNorm, and the add-fused Skip* ops (sum output or not)."""
    two, eps = np.float32(2.0), np.float32(1e-5)
    for shape in [(8, 128, 64, 64), (8, 256, 56, 56), (1, 96, 56, 56)]:
        c = shape[1]
        g, b = rng.standard_normal(c).astype(np.float32), rng.standard_normal(c).astype(np.float32)
        cshape = np.array([1, c, 1, 1], np.int64)
        inputs = {"X": shape}
        yield Row("LayerNorm channel-first", shape, inputs, ("Y",), {
            "custom": model([n("LayerNorm", ["X", "scale", "bias"], ["Y"], domain=DOMAIN, channel_first=1)], inputs,
                            dict(scale=g, bias=b)),
            "decomposed": model(layer_norm_decomposed([1]), inputs,
                                dict(scale=g.reshape(cshape), bias=b.reshape(cshape), two=two, eps=eps)),
            "standard": model([n("Transpose", ["X"], ["t"], perm=[0, 2, 3, 1]), n("LayerNormalization", ["t", "scale", "bias"], ["l"], axis=-1),
                               n("Transpose", ["l"], ["Y"], perm=[0, 3, 1, 2])], inputs, dict(scale=g, bias=b)),
        })
    last_axis = [(32, 512, 1024), (16, 256, 2048), (8, 197, 768)]
    for op in ("LayerNorm last-axis", "RMSNorm", "SkipLayerNorm", "SkipLayerNormSum", "SkipRMSNorm", "SkipRMSNormSum"):
        for shape in last_axis if not op.startswith("Skip") else [last_axis[0], last_axis[2]]:
            d, layer = shape[-1], "LayerNorm" in op
            params = {"scale": rng.standard_normal(d).astype(np.float32)}
            if layer:
                params["bias"] = rng.standard_normal(d).astype(np.float32)
            skip, with_sum = op.startswith("Skip"), op.endswith("Sum")
            inputs = {"X": shape, **({"skip": shape} if skip else {})}
            outputs = ("Y", "S") if with_sum else ("Y",)
            x, pre = ("S", [n("Add", ["X", "skip"], ["S"])]) if skip else ("X", [])
            kernel, attrs = op.split()[0], dict(epsilon=1e-5)
            if kernel == "LayerNorm":
                attrs["axis"] = -1
            decomposed = layer_norm_decomposed([-1], x) if layer else rms_norm_decomposed(x)
            standard = n("LayerNormalization" if layer else "RMSNormalization", [x, *params], ["Y"], axis=-1, epsilon=1e-5)
            yield Row(op, shape, inputs, outputs, {
                "custom": model([n(kernel, [*inputs, *params], list(outputs), domain=DOMAIN, **attrs)], inputs, params,
                                outputs=outputs),
                "decomposed": model([*pre, *decomposed], inputs, dict(params, two=two, eps=eps), outputs=outputs),
                "standard": model([*pre, standard], inputs, params, opset=17 if layer else 23, outputs=outputs),
            })


def other_rows(rng):
    """FilterResponseNorm and WeightNorm (no standard op)."""
    two, eps = np.float32(2.0), np.float32(1e-5)
    for shape in [(8, 128, 64, 64), (8, 64, 112, 112), (32, 256, 14, 14)]:
        c = shape[1]
        p = {k: rng.standard_normal(c).astype(np.float32) for k in ("gamma", "beta", "tau")}
        pc = {k + "c": v.reshape(1, c, 1, 1) for k, v in p.items()}
        dec = [n("Pow", ["X", "two"], ["p"]), n("ReduceMean", ["p"], ["nu2"], axes=[2, 3]), n("Add", ["nu2", "eps"], ["a"]),
               n("Sqrt", ["a"], ["s"]), n("Reciprocal", ["s"], ["r"]), n("Mul", ["X", "r"], ["nrm"]),
               n("Mul", ["nrm", "gammac"], ["sc"]), n("Add", ["sc", "betac"], ["y"]), n("Max", ["y", "tauc"], ["Y"])]
        yield Row("FilterResponseNorm", shape, {"X": shape}, ("Y",), {
            "custom": model([n("FilterResponseNorm", ["X", "gamma", "beta", "tau"], ["Y"], domain=DOMAIN, epsilon=1e-5)],
                            {"X": shape}, p),
            "decomposed": model(dec, {"X": shape}, dict(pc, two=two, eps=eps)),
        })
    for shape in [(2048, 1024, 1, 1), (512, 512, 3, 3), (256, 128, 3, 3)]:
        g = rng.standard_normal(shape[0]).astype(np.float32)
        dec = [n("Pow", ["X", "two"], ["p"]), n("ReduceSum", ["p", "axes"], ["s"]), n("Sqrt", ["s"], ["nrm"]),
               n("Div", ["g4", "nrm"], ["f"]), n("Mul", ["X", "f"], ["Y"])]
        yield Row("WeightNorm", shape, {"X": shape}, ("Y",), {
            "custom": model([n("WeightNorm", ["X", "g"], ["Y"], domain=DOMAIN, dim=0)], {"X": shape}, dict(g=g)),
            "decomposed": model(dec, {"X": shape}, dict(two=two, axes=np.array([1, 2, 3], np.int64), g4=g.reshape(-1, 1, 1, 1))),
        })


def cases() -> list[Row]:
    """Every row of the table, in order."""
    rng = np.random.default_rng(0)
    return [*group_norm_rows(rng), *layer_norm_rows(rng), *other_rows(rng)]


def time_model(path: Path, threads: int, rounds: int) -> dict:
    """Median ms of `rounds` runs of the model at `path` in this process's only session: wall time, and with
    1 thread the calling thread's CPU time; {"error": ...} when onnxruntime refuses the model."""
    try:
        s = make_session(str(path), optimize=True, threads=threads)
    except NormfoldError as exc:  # e.g. an op this onnxruntime does not implement
        return {"error": str(exc.__cause__ or exc).strip().splitlines()[0][:100]}
    spec = json.loads(path.with_suffix(".json").read_text())
    rng = np.random.default_rng(1)
    binding, keep = s.io_binding(), []
    for name, shape in spec["inputs"].items():
        value = np.zeros(shape, np.float32) if name == "zero" else (rng.standard_normal(shape) + 0.5).astype(np.float32)
        keep.append(value)
        binding.bind_cpu_input(name, value)
    for name in spec["outputs"]:
        keep.append(np.empty(spec["shape"], np.float32))
        binding.bind_output(name, "cpu", 0, np.float32, spec["shape"], keep[-1].ctypes.data)
    wall, cpu = timed_runs(s, binding, rounds)
    return {"wall": wall, "cpu": cpu}


def timed_runs(session, binding, rounds: int) -> tuple[float, float]:
    """Median wall and calling-thread CPU ms of `rounds` runs of a bound session, after 3 warm-up runs."""
    for _ in range(3):
        session.run_with_iobinding(binding)
    wall, cpu = [], []
    for _ in range(rounds):
        w, c0 = time.perf_counter(), time.thread_time()
        session.run_with_iobinding(binding)
        cpu.append(time.thread_time() - c0)
        wall.append(time.perf_counter() - w)
    return float(np.median(wall)) * 1e3, float(np.median(cpu)) * 1e3


def spread(values) -> float:
    """Interquartile range / median."""
    return float(np.subtract(*np.percentile(values, [75, 25])) / np.median(values))


def machine() -> str:
    """CPU model, core count and which loops the kernels run (AVX-512, AVX2 or baseline x86-64)."""
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")),
                 platform.processor() or platform.machine())
    return f"{model}, {os.cpu_count()} cores; kernels' loops: {cpu_loops(ops_library_path())}"


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
    m = model([helper.make_node(op, ["X", *params], ["Y"], domain=DOMAIN, **attrs)], {"X": ACTIVATION_SHAPE}, values)
    s = make_session(m, optimize=True, threads=threads)
    x = (rng.standard_normal(ACTIVATION_SHAPE) + 0.5).astype(np.float32)
    out = np.empty_like(x)
    binding = s.io_binding()
    binding.bind_cpu_input("X", x)
    binding.bind_output("Y", "cpu", 0, np.float32, list(x.shape), out.ctypes.data)
    wall, cpu = timed_runs(s, binding, rounds)
    return {"wall": wall, "cpu": cpu if threads == 1 else None}


def activations(args) -> None:
    """Each ACTIVATION_CASES case in its own process, both loop variants, 1 and 2 threads; writes the section."""
    started, load_before = datetime.datetime.now(), os.getloadavg()
    names = list(ACTIVATION_CASES)
    copies = list(dict.fromkeys([cpu_loops(ops_library_path()), "baseline"]))  # the widest the CPU has, and baseline
    results: dict = {}  # (loops, threads, name) -> per-process medians
    for p in range(args.processes):
        for loops in copies:
            for threads in (1, 2):
                for name in names[p % len(names):] + names[:p % len(names)]:  # rotate the order
                    env = {**os.environ, "NORMFOLD_LOOPS": loops}
                    cmd = [sys.executable, __file__, "--activation-case", name, "--threads", str(threads),
                           "--rounds", str(args.rounds)]
                    r = json.loads(subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout)
                    results.setdefault((loops, threads, name), []).append(r["cpu"] if threads == 1 else r["wall"])
        print(f"process round {p + 1}/{args.processes} done", file=sys.stderr, flush=True)
    rows = []
    for loops in copies:
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
    command = "python -m benchmarks.bench_ops --activations" \
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


def run_table(args) -> None:
    """Every selected row's variants and its copy, each in its own process, 1 and 2 threads; writes the report."""
    started, load_before = datetime.datetime.now(), os.getloadavg()
    rows = [r for r in cases() if not args.only or any(part in r.op for part in args.only.split(","))]
    results: dict = {}  # (row index, variant, threads) -> per-process medians (ms)
    with tempfile.TemporaryDirectory() as tmp:
        names = []
        for i, row in enumerate(rows):
            names.append([*row.variants, "copy"])
            for name, m in {**row.variants, "copy": row.copy_model}.items():
                path = Path(tmp) / f"{i}-{name}.onnx"
                path.write_bytes(m.SerializeToString())
                inputs = {k: list(v) for k, v in row.inputs.items()} if name != "copy" else \
                    {i.name: [d.dim_value for d in i.type.tensor_type.shape.dim] for i in m.graph.input}
                shape = list(row.shape) if name != "copy" else [int(np.prod(row.shape))]
                path.with_suffix(".json").write_text(json.dumps({"inputs": inputs, "outputs": list(row.outputs), "shape": shape}))
        for p in range(args.processes):
            for i, row in enumerate(rows):
                order = names[i][p % len(names[i]):] + names[i][:p % len(names[i])]  # rotate the order
                for threads in (1, 2):
                    for name in order if threads == 1 else ("custom", "copy"):  # existing paths: 1 thread
                        cmd = [sys.executable, "-m", "benchmarks.bench_ops", "--model", f"{tmp}/{i}-{name}.onnx",
                               "--threads", str(threads), "--rounds", str(args.rounds)]
                        out = subprocess.run(cmd, check=True, capture_output=True, text=True,
                                             cwd=Path(__file__).resolve().parents[1]).stdout
                        r = json.loads(out.splitlines()[-1])
                        if "error" in r:
                            print(f"  {row.op} {name}: not run ({r['error']})", file=sys.stderr)
                            continue
                        results.setdefault((i, name, threads), []).append(r["cpu" if threads == 1 else "wall"])
            print(f"process round {p + 1}/{args.processes} done", file=sys.stderr, flush=True)
    table, auto = [], {}
    for i, row in enumerate(rows):
        med = {(k[1], k[2]): np.array(v) for k, v in results.items() if k[0] == i}

        def ratio(a, b, threads):
            x, y = med[(a, threads)], med[(b, threads)]
            r = float(np.median(x) / np.median(y))
            return r, (spread(x) + spread(y)) * r

        cells = [row.op, "x".join(map(str, row.shape)), f"{row.megabytes:.1f}"]
        for threads in (1, 2):
            r, noise = ratio("custom", "copy", threads)
            cells += [f"{np.median(med[('custom', threads)]):.3f}", f"{np.median(med[('copy', threads)]):.3f}",
                      f"**{r:.2f}**" if r > 1.15 else f"{r:.2f}", f"±{noise:.2f}"]
        existing = {k: float(np.median(med[(k, 1)])) for k in ("decomposed", "standard") if (k, 1) in med}
        best = min(existing, key=existing.get)
        r, noise = ratio(best, "custom", 1)
        cells += [f"{best} {existing[best]:.3f}", f"{r:.2f}x", f"±{noise:.2f}"]
        table.append("| " + " | ".join(cells) + " |")
        print(table[-1], flush=True)
        if "standard" in existing:
            auto.setdefault(row.op, []).append(existing["standard"] / float(np.median(med[("custom", 1)])))
    auto_rows = [f"| {op} | {'custom' if min(v) > 1 else 'standard' if max(v) < 1 else 'custom (mixed)'} | "
                 + ", ".join(f"{x:.2f}x" for x in v) + " |" for op, v in auto.items()]
    write(args, table, auto_rows, started, load_before, os.getloadavg())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=40, help="runs per process (default 40)")
    parser.add_argument("--processes", type=int, default=3,
                        help="processes per variant (default 3; with --activations: per case, default 7)")
    parser.add_argument("--only", default="", help="comma-separated substrings of op names to run (default: all)")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "RESULTS_ops.md")
    parser.add_argument("--activations", action="store_true", help="measure the fused activations instead (see above)")
    parser.add_argument("--activation-case", choices=list(ACTIVATION_CASES), help=argparse.SUPPRESS)
    parser.add_argument("--model", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.activation_case:  # one case in this process: print its medians as JSON
        print(json.dumps(time_activation_case(args.activation_case, args.threads, args.rounds)))
    elif args.model:  # one model in this process
        print(json.dumps(time_model(args.model, args.threads, args.rounds)))
    elif args.activations:
        if "--processes" not in sys.argv:
            args.processes = 7
        activations(args)
    else:
        run_table(args)


def write(args, table, auto, started, load_before, load_after) -> None:
    old = args.out.read_text() if args.out.exists() else ""
    kept = [old.index(h) for h in ("\n## Fused activations", "\n## Notes") if h in old]
    notes = old[min(kept) + 1:] if kept else ""
    command = "python -m benchmarks.bench_ops" + (f" --processes {args.processes}" if args.processes != 3 else "") \
        + (f" --rounds {args.rounds}" if args.rounds != 40 else "") + (f" --only {shlex.quote(args.only)}" if args.only else "")
    lines = [
        "# Custom-op benchmark (CPU)", "",
        f"Date: {started:%Y-%m-%d %H:%M}. Machine: {machine()}; onnxruntime {ort.__version__}, numpy {np.__version__}, fp32.",
        f"Command: `{command}`. Load average (1/5/15 min) before: "
        f"{'/'.join(f'{v:.1f}' for v in load_before)}, after: {'/'.join(f'{v:.1f}' for v in load_after)}.", "",
        f"Each variant in its own process ({args.processes} processes per variant, rotating order, {args.rounds} runs each, "
        "one session per process, onnxruntime optimizations on, inputs and outputs bound with IOBinding). "
        "`1 thread`: the CPU time of the calling thread, which runs the kernel (median per process, then median over "
        "processes): time slices given to other processes do not count, their use of the caches and of memory "
        "bandwidth does; `2 threads`: wall time, as deployed. "
        "`copy`: an onnxruntime graph with the op's thread count that reads each of the op's large inputs and writes "
        "each of its outputs once (`MB` = those bytes): the physical floor. `op/copy` over 1.15 in bold. "
        "`best existing` = the faster of the decomposed export and the standard ops (1 thread, CPU time); "
        "`speedup` = it / custom (1 thread). "
        "`noise` = the sum of both variants' interquartile ranges / medians over processes, times the ratio.", "",
        "| op | shape | MB | custom ms, 1 thread | copy ms, 1 thread | op/copy, 1 thread | noise "
        "| custom ms, 2 threads | copy ms, 2 threads | op/copy, 2 threads | noise | best existing ms, 1 thread | speedup | noise |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|", *table, "",
        "## What `--target auto` should pick (custom where it beat the standard op at every size, 1 thread)", "",
        "| op | pick | standard op / custom, per size |", "|---|---|---|", *auto, "",
    ]
    args.out.write_text("\n".join(lines) + ("\n" + notes if notes else ""))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
