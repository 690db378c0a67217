"""The model zoo before/after `normfold optimize`, each model timed in its own process.

For each zoo model (`tests/helpers/zoo_models.py`, exported as `bench_zoo.py` exports them):
`normfold optimize` writes the optimized model, with its speed check on (so a fused kind that
makes the model slower is reverted; the row says which). Then `--rounds` rounds, each timing the
input model and the optimized one in a fresh process apiece (order alternating), as deployed:
onnxruntime CPU, ORT_ENABLE_ALL, normfold's library registered, `--threads` threads, `--runs`
timed runs after `--warmup` (the process reports their median). The speed-up is the median over
rounds of before / after, the noise half the interquartile range of those per-round ratios.
"norms" is the share of the optimized model's kernel time (onnxruntime's profiler) spent in
normalization ops (com.normfold ops, onnxruntime's own LayerNorm/GroupNorm/RMSNorm kernels and
their fused Skip variants, InstanceNormalization).

    python -m benchmarks.bench_zoo_isolated [--models unet_gn,convnext_t,...] [--exporter torchscript]
        [--rounds 5] [--runs 20] [--warmup 3] [--threads 2] [--out benchmarks/RESULTS_zoo_isolated.md]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
NORM_OPS = ("LayerNormalization", "GroupNormalization", "RMSNormalization", "InstanceNormalization",
            "SkipLayerNormalization", "SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization")


def time_in_process(path: Path, inputs: Path, threads: int, warmup: int, runs: int) -> float:
    """Median ms of `runs` runs of the model at `path`, in a fresh process."""
    code = ("import sys, time, numpy as np; from normfold.runtime.session import make_session;"
            "s = make_session(sys.argv[1], optimize=True, threads=int(sys.argv[3]));"
            "f = dict(np.load(sys.argv[2])); t = []\n"
            "for i in range(int(sys.argv[4]) + int(sys.argv[5])):\n"
            "    a = time.perf_counter(); s.run(None, f); t.append(time.perf_counter() - a)\n"
            "print(np.median(t[int(sys.argv[4]):]) * 1e3)")
    done = subprocess.run([sys.executable, "-c", code, str(path), str(inputs), str(threads), str(warmup), str(runs)],
                          capture_output=True, text=True, check=True)
    return float(done.stdout.strip().splitlines()[-1])


def norm_share(path: Path, feeds: dict, threads: int) -> float:
    """Share of the kernel time in normalization ops (onnxruntime profiler, ORT_ENABLE_ALL)."""
    import onnx

    from benchmarks.bench_zoo import op_profile

    profile = op_profile(onnx.load(path), feeds, threads)
    total = sum(profile.values())
    norms = sum(ms for op, ms in profile.items() if op in NORM_OPS or op in _custom_ops())
    return norms / total if total else 0.0


def _custom_ops() -> set[str]:
    from normfold.ops.table import OPS

    return set(OPS)


def run_model(name: str, exporter: str, args, folder: Path) -> dict:
    import onnx

    from benchmarks.bench_zoo import EXPORTERS
    from normfold.pipeline.deploy_check import CheckOptions
    from normfold.pipeline.files import optimize_file
    from tests.helpers.norm_models import export
    from tests.helpers.zoo_models import build

    module, inputs = build(name)
    model = export(module, inputs, exporter=exporter, opset=EXPORTERS[exporter], constant_folding=False,
                   name=f"zoo-{name}")
    before, after, feeds_path = folder / f"{name}.onnx", folder / f"{name}.opt.onnx", folder / f"{name}.npz"
    onnx.save(model, before)
    feeds = {model.graph.input[0].name: inputs[0].numpy()}
    np.savez(feeds_path, **feeds)
    summary = optimize_file(before, after, inplace=False, passes=("fold-wn", "fold-bn", "fuse", "cleanup"),
                            check=CheckOptions(inputs=feeds), measure={"inputs": feeds, "threads": args.threads})
    ratios, times = [], {"before": [], "after": []}
    for r in range(args.rounds):
        order = ("before", "after") if r % 2 == 0 else ("after", "before")
        got = {which: time_in_process(before if which == "before" else after, feeds_path, args.threads,
                                      args.warmup, args.runs) for which in order}
        for which in got:
            times[which].append(got[which])
        ratios.append(got["before"] / got["after"])
    q1, q3 = np.percentile(ratios, [25, 75])
    fused = [c.into for rep in summary.reports if rep.name == "fuse" for c in rep.changes]
    return {"model": name, "exporter": exporter, "before_ms": float(np.median(times["before"])),
            "after_ms": float(np.median(times["after"])), "speedup": float(np.median(ratios)),
            "noise": float((q3 - q1) / 2), "norm_share": norm_share(after, feeds, args.threads),
            "fused": {op: fused.count(op) for op in sorted(set(fused))},
            "reverted": [r.family for r in summary.speed.reverted],
            "check": summary.speed.to_dict(), "verified": summary.verification.passed}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="resnet50,convnext_t,unet_gn,vit_s16,llama")
    parser.add_argument("--exporter", default="torchscript", choices=["torchscript", "dynamo"])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=HERE / "RESULTS_zoo_isolated.md")
    args = parser.parse_args()
    started, load_before = datetime.datetime.now(datetime.timezone.utc), os.getloadavg()[0]
    clock = time.time()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            rows.append(run_model(name, args.exporter, args, Path(tmp)))
            print(json.dumps({k: v for k, v in rows[-1].items() if k != "check"}), file=sys.stderr, flush=True)
    from benchmarks.bench_zoo import machine

    lines = [
        "# Model zoo before/after `normfold optimize`, each model in its own process", "",
        f"- machine: {machine()}",
        f"- command: `python -m benchmarks.bench_zoo_isolated {shlex.join(sys.argv[1:])}` "
        f"({time.time() - clock:.0f} s)",
        f"- date: {started:%Y-%m-%d %H:%M} UTC; load average before {load_before:.2f}, after "
        f"{os.getloadavg()[0]:.2f} (the machine is shared with other engineers' jobs)",
        f"- exporter {args.exporter}; onnxruntime CPU, ORT_ENABLE_ALL, {args.threads} threads; {args.rounds} rounds, "
        f"each a fresh process per model ({args.warmup} warm-up + {args.runs} timed runs, median)",
        "- speed-up: median over rounds of before / after (> 1: faster), ± half the interquartile range of the "
        "per-round ratios; norms: share of the optimized model's kernel time in normalization ops; reverted: "
        "fused kinds `optimize`'s speed check took back", "",
        "| model | before ms | after ms | speed-up | norms | fused | reverted | speed check (in-process) |",
        "|---|---:|---:|---:|---:|---|---|---:|",
    ]
    for r in rows:
        fused = ", ".join(f"{n}× {op.replace('com.normfold.', '')}" for op, n in r["fused"].items()) or "—"
        check = f"{r['check']['speedup']:.2f}x ± {r['check']['noise']:.2f}"
        lines.append(f"| {r['model']} | {r['before_ms']:.2f} | {r['after_ms']:.2f} | {r['speedup']:.2f}x ± "
                     f"{r['noise']:.2f} | {r['norm_share']:.0%} | {fused} | {', '.join(r['reverted']) or '—'} | "
                     f"{check} |")
    args.out.write_text("\n".join(lines) + "\n")
    print(args.out.read_text())


if __name__ == "__main__":
    main()
