"""The real-model zoo before/after `normfold optimize`: latency with each model in its own process.

For every zoo case (`tests/helpers/zoo`: architecture × export configuration; those the exporter
cannot export, or writes a model onnxruntime cannot run, are skipped and listed):

1. `normfold optimize` (`optimize_file`, every default pass, the output check, the default speed
   check, which reverts fused kinds that make the model slower beyond noise) writes the optimized
   model.
2. onnxruntime's profiler (ORT_ENABLE_ALL, 1 thread) gives, for the input and the optimized model,
   the share of kernel time in norms and in the NCHWc layout reorders (ReorderInput/ReorderOutput)
   and the reorder count. Norm time is that of the norm ops (normfold's, onnxruntime's own
   LayerNorm/GroupNorm/RMSNorm kernels and their Skip variants, InstanceNormalization,
   BatchNormalization) and of the input model's nodes that normfold's passes replaced (found by
   name: what is left of a decomposed norm after onnxruntime's own fusions). The Amdahl bound is
   1 / (1 - the input's norm share): the speed-up if the norms cost nothing.
3. `--rounds` rounds over the whole zoo (so a burst of load hits one round of many models, not
   every round of one); in each, every case's input and optimized model run in a fresh process
   apiece, in alternating order. A process times 1 thread by the calling thread's CPU time
   (`time.thread_time`, intra- and inter-op threads 1: what other jobs on the machine do not
   inflate) and then `--threads` threads by wall time (as deployed), each for `--budget` seconds
   of runs (at least 5, at most 500: small models get more runs), and reports the medians.
   Speed-up: median over rounds of before / after; noise: half the interquartile range of the
   per-round ratios.

    python -m benchmarks.bench_zoo_isolated [--only bert,vae] [--configs dy18,ts17] [--rounds 5]
        [--budget 0.2] [--threads 2] [--out benchmarks/RESULTS_zoo_isolated.md] [--json FILE]
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
from collections import Counter
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
NORM_OPS = {"LayerNormalization", "GroupNormalization", "RMSNormalization", "InstanceNormalization",
            "BatchNormalization", "GroupNorm", "SkipLayerNormalization", "SimplifiedLayerNormalization",
            "SkipSimplifiedLayerNormalization"}
REORDERS = {"ReorderInput", "ReorderOutput"}
MIN_RUNS, MAX_RUNS = 5, 500
PROFILE_RUNS = 30


# ------------------------------------------------------------------------ one timing process

def time_one(model_path: str, feeds_path: str, threads: int, budget_s: float) -> dict:
    """In this (fresh) process: median ms of the model's runs with 1 thread by the calling
    thread's CPU time (`cpu1`), then with `threads` threads by wall time (`wall`)."""
    from normfold.runtime.session import make_session

    feeds = dict(np.load(feeds_path))
    found = {}
    for key, n in (("cpu1", 1), ("wall", threads)):
        session = make_session(model_path, optimize=True, threads=n)  # sequential execution: no inter-op threads
        for _ in range(2):  # first-run allocations
            session.run(None, feeds)
        clock = time.thread_time if key == "cpu1" else time.perf_counter
        times, started = [], time.perf_counter()
        while len(times) < MAX_RUNS and (len(times) < MIN_RUNS or time.perf_counter() - started < budget_s):
            start = clock()
            session.run(None, feeds)
            times.append(clock() - start)
        found[key], found[f"{key}_runs"] = float(np.median(times)) * 1e3, len(times)
    return found


def _time_in_process(model_path: Path, feeds_path: Path, threads: int, budget_s: float) -> dict:
    done = subprocess.run([sys.executable, "-m", "benchmarks.bench_zoo_isolated", "--time-one", str(model_path),
                           str(feeds_path), "--threads", str(threads), "--budget", str(budget_s)],
                          capture_output=True, text=True, check=True, cwd=HERE.parent)
    return json.loads(done.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------ preparing a case

def profile_shares(model, feeds: dict, replaced: set[str]) -> dict:
    """Shares of kernel time (1 thread, ORT_ENABLE_ALL) in norms and in NCHWc reorders (medians
    over PROFILE_RUNS runs of the per-run shares: one slow kernel call does not decide), the
    reorder nodes per run and the median norm milliseconds per run. `replaced`: names of nodes
    that count as norm time whatever onnxruntime runs them as."""
    from benchmarks.bench_zoo import kernel_events
    from normfold.ops.table import OPS

    events = kernel_events(model, feeds, threads=1, runs=PROFILE_RUNS)
    per_run = len(events) // PROFILE_RUNS
    norm_ops = NORM_OPS | set(OPS)
    runs = [events[i * per_run:(i + 1) * per_run] for i in range(PROFILE_RUNS)]
    total = np.array([sum(e["dur"] for e in run) for run in runs], dtype=float)
    norms = np.array([sum(e["dur"] for e in run if e["args"]["op_name"] in norm_ops
                          or e["name"].removesuffix("_kernel_time") in replaced) for run in runs], dtype=float)
    reorders = np.array([sum(e["dur"] for e in run if e["args"]["op_name"] in REORDERS) for run in runs], dtype=float)
    return {"norm_share": float(np.median(norms / total)), "norm_ms": float(np.median(norms)) / 1e3,
            "reorder_share": float(np.median(reorders / total)),
            "reorders": sum(e["args"]["op_name"] in REORDERS for e in runs[0]), "kernel_ms": float(np.median(total)) / 1e3}


def prepare_case(arch_name: str, config_name: str, folder: Path) -> dict:
    """Export, `normfold optimize` (speed check on) and profile one case; write the input
    model, the optimized model and the inputs into `folder`."""
    import onnx

    from normfold.pipeline.deploy_check import CheckOptions
    from normfold.passes.registry import parse_passes
    from normfold.pipeline.files import optimize_file
    from normfold.pipeline.speed_check import threads_label
    from tests.helpers.norm_models import export
    from tests.helpers.zoo import ARCHITECTURES, CONFIGS
    from tests.helpers.zoo.checks import _feeds, run_onnx

    arch, config = ARCHITECTURES[arch_name], CONFIGS[config_name]
    row = {"arch": arch_name, "config": config_name}
    module, args = arch.build()
    try:
        model = export(module, args, exporter=config.exporter, opset=config.opset,
                       constant_folding=config.constant_folding, name=f"zoo-{arch.name}")
        feeds = _feeds(model, args)
        run_onnx(model, feeds, library=False, optimize=False)
    except Exception as why:  # noqa: BLE001 - ExportError, or onnxruntime cannot run the export: not normfold's
        return {**row, "skipped": f"{type(why).__name__}: {(str(why).strip().splitlines() or [''])[0][:160]}"}
    stem = f"{arch_name}-{config_name}"
    before, after, feeds_path = folder / f"{stem}.onnx", folder / f"{stem}.opt.onnx", folder / f"{stem}.npz"
    onnx.save(model, before)
    np.savez(feeds_path, **feeds)
    summary = optimize_file(before, after, inplace=False, passes=parse_passes(None),  # `normfold optimize`'s passes
                            check=CheckOptions(inputs=feeds), measure={"inputs": feeds})
    optimized = onnx.load(after)
    replaced = {n.name for n in model.graph.node} - {n.name for n in optimized.graph.node}
    speed = summary.speed
    return {**row, "before": str(before), "after": str(after), "feeds": str(feeds_path),
            "fused": dict(Counter(c.into.replace("com.normfold.", "") for rep in summary.reports if rep.name == "fuse"
                                  for c in rep.changes)),
            "reverted": [f"{r.family} ({threads_label(r.threads)})" for r in speed.reverted],
            "kept_speedup": speed.result.ratio,
            "kept_noise": speed.result.noise, "all_fused_speedup": speed.first.ratio,
            "all_fused_noise": speed.first.noise, "verified": summary.verification.passed,
            "profile_before": profile_shares(model, feeds, replaced),
            "profile_after": profile_shares(optimized, feeds, set())}


def _prepare_in_process(arch: str, configs: list[str], folder: Path) -> list[dict]:
    code = ("import json, sys; from pathlib import Path; from benchmarks.bench_zoo_isolated import prepare_case; "
            f"print('@@' + json.dumps([prepare_case({arch!r}, c, Path({str(folder)!r})) for c in {configs!r}]))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=HERE.parent)
    for line in proc.stdout.splitlines():
        if line.startswith("@@"):
            return json.loads(line[2:])
    tail = (proc.stderr.strip().splitlines() or ["no output"])[-1][:200]
    return [{"arch": arch, "config": c, "failed": f"process died (rc {proc.returncode}): {tail}"} for c in configs]


# ------------------------------------------------------------------------ the zoo

def ratio_stats(before: list[float], after: list[float]) -> tuple[float, float]:
    """Median over rounds of before / after and half the interquartile range of those ratios."""
    ratios = np.asarray(before) / np.asarray(after)
    q1, q3 = np.percentile(ratios, [25, 75])
    return float(np.median(ratios)), float((q3 - q1) / 2)


def run_zoo(args, folder: Path) -> list[dict]:
    """Prepare every case, then time them in `args.rounds` interleaved rounds."""
    from tests.helpers.zoo import ARCHITECTURES

    names = args.only.split(",") if args.only else list(ARCHITECTURES)
    rows = []
    for name in names:
        rows += _prepare_in_process(name, args.configs.split(","), folder)
        print(f"prepared {name}: " + ", ".join(f"{r['config']} " + ("skipped" if "skipped" in r else "failed"
                                                                    if "failed" in r else f"{r['kept_speedup']:.2f}x")
                                               for r in rows[-len(args.configs.split(',')):]),
              file=sys.stderr, flush=True)
    timed = [r for r in rows if "before" in r]
    for r in timed:
        r["times"] = {"before": [], "after": []}
    for k in range(args.rounds):
        for i, r in enumerate(timed):
            order = ("before", "after") if (k + i) % 2 == 0 else ("after", "before")
            for which in order:
                r["times"][which].append(_time_in_process(Path(r[which]), Path(r["feeds"]), args.threads,
                                                          args.budget))
        print(f"round {k + 1}/{args.rounds} done", file=sys.stderr, flush=True)
    for r in timed:
        for key in ("cpu1", "wall"):
            b, a = ([t[key] for t in r["times"][w]] for w in ("before", "after"))
            r[key] = {"before_ms": float(np.median(b)), "after_ms": float(np.median(a)), "runs": int(np.median(
                [t[f"{key}_runs"] for t in r["times"]["before"]])), **dict(zip(("speedup", "noise"),
                                                                                 ratio_stats(b, a)))}
    return rows


# ------------------------------------------------------------------------ the results file

def _pct(x: float) -> str:
    return f"{x:.0%}" if x >= 0.005 or x == 0 else "<1%"


def table(rows: list[dict]) -> list[str]:
    """The markdown table of the timed cases."""
    lines = ["| case | 1-thread CPU ms before → after | speed-up (1 thr CPU) | 2-thr wall ms before → after "
             "| speed-up (2 thr wall) | norms before → after | Amdahl bound | reorders before → after (count) "
             "| fused | reverted | speed check |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---|---|---:|"]
    for r in rows:
        if "before" not in r:
            continue
        pb, pa, c, w = r["profile_before"], r["profile_after"], r["cpu1"], r["wall"]
        bound = 1 / (1 - pb["norm_share"]) if pb["norm_share"] < 1 else float("inf")
        fused = ", ".join(f"{n}× {op}" for op, n in sorted(r["fused"].items())) or "—"
        lines.append(
            f"| {r['arch']} {r['config']} | {c['before_ms']:.3g} → {c['after_ms']:.3g} | **{c['speedup']:.2f}x** ± "
            f"{c['noise']:.2f} | {w['before_ms']:.3g} → {w['after_ms']:.3g} | {w['speedup']:.2f}x ± {w['noise']:.2f} "
            f"| {_pct(pb['norm_share'])} → {_pct(pa['norm_share'])} | {bound:.2f}x | {_pct(pb['reorder_share'])} "
            f"({pb['reorders']}) → {_pct(pa['reorder_share'])} ({pa['reorders']}) | {fused} | "
            f"{', '.join(r['reverted']) or '—'} | {r['kept_speedup']:.2f}x ± {r['kept_noise']:.2f} |")
    return lines


def write_results(rows: list[dict], args, started, load_before: float, seconds: float) -> None:
    """The results file: how it ran, the table, the skipped cases; the existing file's `## Notes` on are kept."""
    from benchmarks.bench_zoo import machine

    lines = [
        "# Real-model zoo before/after `normfold optimize`: latency, each model in its own process", "",
        f"- machine: {machine()}, shared with other engineers' jobs",
        f"- command: `python -m benchmarks.bench_zoo_isolated {shlex.join(sys.argv[1:])}` ({seconds:.0f} s)",
        f"- date: {started:%Y-%m-%d %H:%M} UTC; load average before {load_before:.2f}, after "
        f"{os.getloadavg()[0]:.2f}",
        f"- configs {args.configs}; onnxruntime CPU, ORT_ENABLE_ALL, normfold's library registered; {args.rounds} "
        f"interleaved rounds over the zoo, each a fresh process per model; per process {args.budget} s of runs "
        f"(5–{MAX_RUNS}) per thread setting, median",
        "- speed-up: median over rounds of before / after (> 1: faster) ± half the interquartile range of the "
        "per-round ratios. 1 thr CPU: intra/inter-op threads 1, calling thread's CPU time (the load-robust "
        f"column); 2 thr wall: {args.threads} intra-op threads, wall time (as deployed, noisy under load)",
        "- norms: share of kernel time (profiler, 1 thread) in norm ops and in the input's nodes normfold "
        "replaced; Amdahl bound: 1 / (1 − norms before); reorders: share of kernel time in onnxruntime's NCHWc "
        "ReorderInput/ReorderOutput, with their count per run; speed check: what `optimize` measured in-process "
        "for what it wrote (wall, its own noise interval; the default check times 1 thread and onnxruntime's "
        "default, this is the one where the model does worst; `reverted` names the thread count that reverted "
        "the kind)", "",
        *table(rows), "",
    ]
    skipped = [r for r in rows if "before" not in r]
    if skipped:
        lines += ["Not timed:", ""] + [f"- `{r['arch']}` × `{r['config']}`: {r.get('skipped') or r.get('failed')}"
                                        for r in skipped] + [""]
    old = args.out.read_text() if args.out.exists() else ""
    notes = old[old.index("\n## Notes") + 1:] if "\n## Notes" in old else ""
    args.out.write_text("\n".join(lines) + ("\n" + notes if notes else ""))


def main() -> None:
    """Run the zoo (or `--only` a part) and write the results file; `--time-one` is the timing process."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help="comma-separated architectures (default: all)")
    parser.add_argument("--configs", default="dy18,ts17")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--budget", type=float, default=0.2, help="seconds of timed runs per process and setting")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=HERE / "RESULTS_zoo_isolated.md")
    parser.add_argument("--json", type=Path, help="also write every row as JSON here")
    parser.add_argument("--time-one", nargs=2, metavar=("MODEL", "FEEDS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.time_one:
        print(json.dumps(time_one(*args.time_one, args.threads, args.budget)))
        return
    started, load_before, clock = datetime.datetime.now(datetime.timezone.utc), os.getloadavg()[0], time.time()
    with tempfile.TemporaryDirectory() as tmp:
        rows = run_zoo(args, Path(tmp))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    write_results(rows, args, started, load_before, time.time() - clock)
    print(args.out.read_text())


if __name__ == "__main__":
    main()
