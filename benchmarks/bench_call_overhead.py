"""What one call of a com.normfold op costs on a small tensor, against onnxruntime's own fused op.

Decoding (one token per step) and the tiny models of the zoo run norms over a few hundred to a few
thousand elements, where a kernel's fixed cost per call (reading its arguments, allocating its
output) decides, not its loops. Each case is a chain of CHAIN nodes of one op, each reading the
previous one's output (the Skip ops also one shared `S`), in one session with one thread; the cases
of a shape run interleaved in one process, `--rounds` runs each, timed by the calling thread's CPU
time. Per node: median time of a run / CHAIN. `Neg` (the same chain of one element-wise op) is the
floor of what onnxruntime spends per node.

  custom    com.normfold RMSNorm / LayerNorm / SkipRMSNorm / SkipLayerNorm
  ort       onnxruntime's SimplifiedLayerNormalization / LayerNormalization-17 /
            com.microsoft SkipSimplifiedLayerNormalization / SkipLayerNormalization

ratio: median over rounds of custom / ort per round; noise: half its interquartile range.

    python -m benchmarks.bench_call_overhead [--rounds 300] [--out benchmarks/RESULTS_call_overhead.md]
"""

from __future__ import annotations

import argparse
import datetime
import os
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from benchmarks.bench_ops import machine
from normfold.ops.library import register_ops
from normfold.ops.table import DOMAIN

CHAIN = 16
SHAPES = [(1, 12, 32), (1, 1, 768), (1, 1, 4096), (1, 128, 768)]
# case -> (op, domain, inputs after X, attributes)
CASES = {
    "RMSNorm": ("RMSNorm", DOMAIN, ["g"], {"epsilon": 1e-6}),
    "RMSNorm ort": ("SimplifiedLayerNormalization", "", ["g"], {"epsilon": 1e-6}),
    "LayerNorm": ("LayerNorm", DOMAIN, ["g", "b"], {"epsilon": 1e-5}),
    "LayerNorm ort": ("LayerNormalization", "", ["g", "b"], {"epsilon": 1e-5}),
    "SkipRMSNorm": ("SkipRMSNorm", DOMAIN, ["S", "g"], {"epsilon": 1e-6}),
    "SkipRMSNorm ort": ("SkipSimplifiedLayerNormalization", "com.microsoft", ["S", "g"], {"epsilon": 1e-6}),
    "SkipLayerNorm": ("SkipLayerNorm", DOMAIN, ["S", "g", "b"], {"epsilon": 1e-5}),
    "SkipLayerNorm ort": ("SkipLayerNormalization", "com.microsoft", ["S", "g", "b"], {"epsilon": 1e-5}),
    "Neg": ("Neg", "", [], {}),
}
PAIRS = ["RMSNorm", "LayerNorm", "SkipRMSNorm", "SkipLayerNorm"]


def chain_model(case: str, shape: tuple) -> bytes:
    """CHAIN nodes of `case`'s op, X → ... → Y."""
    op, domain, params, attrs = CASES[case]
    d = shape[-1]
    nodes = [helper.make_node(op, [f"t{k}", *params], [f"t{k + 1}" if k < CHAIN - 1 else "Y"], domain=domain, **attrs)
             for k in range(CHAIN)]
    nodes[0].input[0] = "X"
    inputs = [helper.make_tensor_value_info("X", TensorProto.FLOAT, list(shape))]
    if "S" in params:
        inputs.append(helper.make_tensor_value_info("S", TensorProto.FLOAT, list(shape)))
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.uniform(0.5, 1.5, d).astype(np.float32), "g"),
             numpy_helper.from_array(rng.uniform(-0.5, 0.5, d).astype(np.float32), "b")]
    inits = [i for i in inits if i.name in params]
    graph = helper.make_graph(nodes, "chain", inputs, [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)],
                              initializer=inits)
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid(DOMAIN, 1), helper.make_opsetid("com.microsoft", 1)]
    return helper.make_model(graph, opset_imports=opsets, ir_version=10).SerializeToString()


def per_node_times(shape: tuple, rounds: int) -> dict[str, np.ndarray]:
    """µs per node of every case at `shape`, one value per round (cases interleaved)."""
    sessions = {}
    for case in CASES:
        options = ort.SessionOptions()
        options.intra_op_num_threads = options.inter_op_num_threads = 1
        options.log_severity_level = 3
        register_ops(options)
        sessions[case] = ort.InferenceSession(chain_model(case, shape), options, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(1)
    feeds = {"X": rng.standard_normal(shape, dtype=np.float32), "S": rng.standard_normal(shape, dtype=np.float32)}
    bound = {case: {i.name: feeds[i.name] for i in s.get_inputs()} for case, s in sessions.items()}
    for case, s in sessions.items():
        for _ in range(20):
            s.run(None, bound[case])
    times = {case: np.empty(rounds) for case in CASES}
    for r in range(rounds):
        for case, s in sessions.items():
            start = time.thread_time_ns()
            s.run(None, bound[case])
            times[case][r] = (time.thread_time_ns() - start) / 1e3 / CHAIN
    return times


def report(rows: list[tuple[tuple, dict]], args, started: datetime.datetime, load: tuple) -> str:
    """The markdown report."""
    lines = [
        "# Cost of one call of a small norm: com.normfold op against onnxruntime's own fused op", "",
        f"Date: {started:%Y-%m-%d %H:%M} UTC. Machine: {machine()}; onnxruntime {ort.__version__}, fp32, 1 thread.",
        f"Command: `python -m benchmarks.bench_call_overhead --rounds {args.rounds}`. "
        f"Load average (1 min) before: {load[0]:.2f}, after: {load[1]:.2f}.", "",
        f"Chains of {CHAIN} nodes in one session each, the cases of a shape interleaved in one process, "
        f"{args.rounds} rounds, calling thread's CPU time; µs per node (median). `Neg`: onnxruntime's floor per node. "
        "ratio: median per-round custom / onnxruntime ± half its interquartile range (below 1: the custom op costs less).", "",
        "| op | shape | custom µs | onnxruntime µs | ratio | Neg µs |", "|---|---|---:|---:|---:|---:|"]
    for shape, times in rows:
        for op in PAIRS:
            ratio = times[op] / times[f"{op} ort"]
            q1, q3 = np.percentile(ratio, [25, 75])
            lines.append(f"| {op} | {'x'.join(map(str, shape))} | {np.median(times[op]):.2f} | "
                         f"{np.median(times[f'{op} ort']):.2f} | {np.median(ratio):.2f} ± {(q3 - q1) / 2:.2f} | "
                         f"{np.median(times['Neg']):.2f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=300, help="runs of each case (default 300)")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "RESULTS_call_overhead.md")
    args = parser.parse_args()
    started, load_before = datetime.datetime.now(datetime.timezone.utc), os.getloadavg()[0]
    rows = [(shape, per_node_times(shape, args.rounds)) for shape in SHAPES]
    text = report(rows, args, started, (load_before, os.getloadavg()[0]))
    notes = args.out.read_text().split("\n## Notes", 1) if args.out.exists() else []
    args.out.write_text(text + ("\n## Notes" + notes[1] if len(notes) == 2 else ""))
    print(text)


if __name__ == "__main__":
    main()
