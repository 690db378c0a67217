"""Large-model benchmark: normfold and the popular optimizers on a multi-GB model with external data.

Generates a deep residual stack of Conv 3x3 -> BatchNormalization pairs, x + BN(conv(relu(x))),
of about `--gb` GB of fp32 weights, directly with `onnx.helper`: every weight is generated and
written to the external-data file one tensor at a time, so the generator never holds more than
one tensor. Then runs, each in its own subprocess under `/usr/bin/time -v` (getrusage where
that is missing) for wall time and peak RSS:

    normfold fold-bn MODEL -o FOLDED
    normfold fuse MODEL -o OUT               (nothing to fuse here: the load/export/save path)
    normfold fold-wn MODEL -o OUT            (likewise)
    normfold optimize MODEL -o OUT           (every pass, then verification against MODEL)
    normfold verify FOLDED --against MODEL
    onnxsim / onnxoptimizer / onnxslim       (as benchmarks/bench_fold_bn.py calls them)

and records whether each succeeded (and how it failed), BN left and the output's error vs the
original in onnxruntime. `--phases` also runs normfold's fold-bn steps in one process and
samples RSS after each (load, import_graph, pass, export, save).

Usage:
    python -m benchmarks.bench_large --gb 0.2 --results-md none     # small try
    python -m benchmarks.bench_large --gb 3                         # appends to RESULTS.md

Generated files go to --out (default benchmarks/out/large) and are deleted afterwards unless --keep.
"""

from __future__ import annotations

import argparse
import datetime
import json
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

HERE = Path(__file__).resolve().parent
from benchmarks.bench_fold_bn import (MB, TOOLS, _fmt, _pkg_version, inspect_model, machine_facts, measure,
                           ort_run, relative_error)

OPSET, IR_VERSION = 17, 10
SECTION_TITLE = "## Large models (external data)"
ANCHORS = ("onnxsim", "onnxoptimizer", "onnxslim")
RSS_TARGET = 1.3  # normfold fold-bn peak RSS / model size


# --------------------------------------------------------------------------
# generator
# --------------------------------------------------------------------------

class ExternalWriter:
    """Appends tensors to one external-data file and returns TensorProtos that point into it."""

    def __init__(self, path: Path):
        self.file = open(path, "wb")
        self.location = path.name
        self.offset = 0

    def tensor(self, name: str, array: np.ndarray) -> TensorProto:
        """Write `array` (as little-endian fp32) and return its external-data TensorProto."""
        data = np.ascontiguousarray(array, dtype="<f4").tobytes()
        self.file.write(data)
        tensor = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=array.shape,
                             data_location=TensorProto.EXTERNAL)
        for key, value in (("location", self.location), ("offset", str(self.offset)), ("length", str(len(data)))):
            tensor.external_data.add(key=key, value=value)
        self.offset += len(data)
        return tensor

    def close(self) -> None:
        """Close the data file."""
        self.file.close()


@dataclass(frozen=True)
class LargeSpec:
    """`pairs` residual Conv 3x3 + BN blocks at `channels` channels on 1 x C x spatial x spatial."""

    pairs: int
    channels: int = 160
    spatial: int = 4
    seed: int = 0

    @classmethod
    def for_gb(cls, gb: float, channels: int = 160) -> "LargeSpec":
        """The spec whose conv weights add up to about `gb` GB."""
        return cls(pairs=max(1, round(gb * 1e9 / (channels * channels * 9 * 4))), channels=channels)


def generate(spec: LargeSpec, folder: Path) -> dict:
    """Write folder/model.onnx + model.onnx.data; return facts (bytes, nodes, BN count).

    BN statistics follow the activations' expected scale (He-initialised convs keep the
    variance of relu(x) ~ var(x)/2 times 2), with small branch scales γ ~ ±U(0.02, 0.06), so
    thousands of blocks stay numerically sane."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(spec.seed)
    c = spec.channels
    writer = ExternalWriter(folder / "model.onnx.data")
    nodes, inits, var_x, x = [], [], 1.0, "input"
    start = time.perf_counter()
    for i in range(spec.pairs):
        weight = rng.standard_normal((c, c, 3, 3), dtype=np.float32) * np.float32(np.sqrt(2.0 / (c * 9)))
        inits.append(writer.tensor(f"conv{i}.weight", weight))
        sign = np.where(rng.random(c) < 0.2, -1.0, 1.0)
        params = {"scale": rng.uniform(0.02, 0.06, c) * sign, "bias": rng.normal(0, 0.01, c),
                  "mean": rng.normal(0, 0.1 * np.sqrt(var_x), c), "var": var_x * rng.uniform(0.5, 1.5, c)}
        inits += [numpy_helper.from_array(v.astype(np.float32), f"bn{i}.{k}") for k, v in params.items()]
        nodes += [
            helper.make_node("Relu", [x], [f"relu{i}"], name=f"relu{i}"),
            helper.make_node("Conv", [f"relu{i}", f"conv{i}.weight"], [f"conv{i}"], name=f"conv{i}",
                             kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
            helper.make_node("BatchNormalization", [f"conv{i}", *(f"bn{i}.{k}" for k in params)], [f"bn{i}"],
                             name=f"bn{i}", epsilon=1e-5),
            helper.make_node("Add", [x, f"bn{i}"], [f"add{i}"], name=f"add{i}"),
        ]
        var_x *= 1 + float(np.mean(params["scale"] ** 2))
        x = f"add{i}"
    writer.close()
    shape = [1, c, spec.spatial, spec.spatial]
    graph = helper.make_graph(nodes, "bench_large", [helper.make_tensor_value_info("input", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, shape)], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="normfold-bench",
                              ir_version=IR_VERSION)
    onnx.save(model, folder / "model.onnx")
    facts = inspect_model(folder / "model.onnx")
    return {"spec": asdict(spec), "nodes": facts["nodes"], "bn_total": facts["bn_left"],
            "file_bytes": facts["file_bytes"], "generate_s": round(time.perf_counter() - start, 1)}


# --------------------------------------------------------------------------
# normfold's commands, measured like the anchors
# --------------------------------------------------------------------------

@dataclass(frozen=True)
class Command:
    """A `normfold` CLI call (or, `via_script`, a call of this script) with {src}/{dst} placeholders;
    measured by bench_fold_bn.measure like the anchors."""

    name: str
    args: tuple[str, ...]
    via_script: bool = False
    dist: str = "normfold"

    def argv(self, src: Path, dst: Path) -> list[str]:
        """Command line."""
        exe = Path(sys.executable).with_name("normfold")
        if self.via_script:
            head = [sys.executable, "-m", "benchmarks.bench_large"]
        else:
            head = [str(exe)] if exe.exists() else [sys.executable, "-m", "normfold"]
        return head + [a.format(src=src, dst=dst) for a in self.args]

    @property
    def how(self) -> str:
        """The call, for the report."""
        return "`" + ("python -m benchmarks.bench_large " if self.via_script else "normfold ") + " ".join(
            self.args).format(src="MODEL", dst="OUT") + "`"


FOLD = Command("normfold fold-bn", ("fold-bn", "{src}", "-o", "{dst}", "-q"))
FUSE = Command("normfold fuse", ("fuse", "{src}", "-o", "{dst}", "-q"))
FOLD_WN = Command("normfold fold-wn", ("fold-wn", "{src}", "-o", "{dst}", "-q"))
OPTIMIZE = Command("normfold optimize", ("optimize", "{src}", "-o", "{dst}", "-q"))  # every pass, then verify
VERIFY = Command("normfold verify", ("verify", "{dst}", "--against", "{src}"))  # dst: fold-bn's output
PHASES = Command("normfold fold-bn, phases", ("_phases", "{src}", "{dst}"), via_script=True)


def run_phases(src: str, dst: str) -> None:
    """Child-process body of PHASES: normfold fold-bn's steps as `commands.rewrite_file` runs
    them, printing per phase the time, RSS after it and the peak within it (VmHWM is reset
    between phases)."""
    phases, mark = {}, time.perf_counter()

    def phase(label: str) -> None:
        nonlocal mark
        status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
        phases[label] = {"s": round(time.perf_counter() - mark, 2),
                         "rss_mb": round(int(status["VmRSS"].split()[0]) / 1e3),
                         "peak_mb": round(int(status["VmHWM"].split()[0]) / 1e3)}
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
        mark = time.perf_counter()

    from normfold.ir.convert import export_detached, import_graph
    from normfold.io.model_io import load_model, save_model
    from normfold.passes.fold_bn import fold_bn

    phase("import normfold")
    loaded = load_model(src)
    phase("load_model")
    graph = import_graph(loaded.model)
    phase("import_graph")
    fold_bn(graph, direction="both", standalone="keep")
    phase("fold_bn pass")
    result, detached = export_detached(graph, like=loaded.model)
    phase("export_detached")
    save_model(result, dst, source=loaded.path, protect=loaded.external_files,
               external_data=True if loaded.had_external_data else None, detached=detached)
    phase("save_model")
    print("PHASES " + json.dumps(phases))


@dataclass(frozen=True)
class Capped:
    """`tool` run under an address-space limit (`prlimit --as`), so that a tool needing more
    memory than the machine can spare fails with its own out-of-memory error instead of
    taking the machine (and other people's jobs) down with it."""

    tool: object
    cap_bytes: int

    def __getattr__(self, attr):
        return getattr(self.tool, attr)

    def argv(self, src: Path, dst: Path) -> list[str]:
        """The tool's command line behind prlimit."""
        return ["prlimit", f"--as={self.cap_bytes}", "--", *self.tool.argv(src, dst)]


# --------------------------------------------------------------------------
# running and checking
# --------------------------------------------------------------------------

def run_all(model_path: Path, out: Path, names: list[str], timeout_s: float, phases: bool, cap_bytes: int
            ) -> list[dict]:
    """Measure every tool on `model_path` (each capped at `cap_bytes` of address space); check
    each output, then delete it (fold-bn's is kept for verify). Returns one row per run."""
    logs = out / "logs"
    logs.mkdir(exist_ok=True)
    feed = np.random.default_rng(1).standard_normal(_input_shape(model_path), dtype=np.float32)
    original = ort_run(model_path, feed).astype(np.float64)
    folded = out / "normfold-fold-bn.onnx"
    plan = [(FOLD, model_path, folded), (VERIFY, model_path, folded), (FUSE, model_path, out / "normfold-fuse.onnx"),
            (FOLD_WN, model_path, out / "normfold-fold-wn.onnx"), (OPTIMIZE, model_path, out / "normfold-optimize.onnx")]
    plan += [(PHASES, model_path, out / "phases.onnx")] if phases else []
    plan += [(TOOLS[n], model_path, out / f"{n}.onnx") for n in names if n in ANCHORS]
    rows = []
    for tool, src, dst in plan:
        print(f"running {tool.name} ...", flush=True)
        result = measure(Capped(tool, cap_bytes), src, dst, logs, timeout_s)
        row = asdict(result) | {"version": _pkg_version(tool.dist), "how": tool.how}
        if tool is not VERIFY and row["status"] == "ok":
            if dst.exists():
                row.update(inspect_model(dst))
                row["rel_error"] = relative_error(ort_run(dst, feed), original)
            else:
                row.update(status="failed", detail="exit code 0 but no output file")
        if tool is not FOLD:
            _remove(dst)
        rows.append(row)
        print(f"  {row['status']} {row['wall_s']} s, peak RSS {_fmt(row['peak_rss_bytes'] and row['peak_rss_bytes'] / MB, '.0f')} MB"
              f", BN left {row.get('bn_left', '—')}, rel err {_fmt(row.get('rel_error'), '.1e')} {row['detail']}",
              flush=True)
    _remove(folded)
    return rows


def _available_bytes() -> int:
    """MemAvailable from /proc/meminfo."""
    line = next(ln for ln in Path("/proc/meminfo").read_text().splitlines() if ln.startswith("MemAvailable"))
    return int(line.split()[1]) * 1024


def _input_shape(model_path: Path) -> list[int]:
    model = onnx.load(model_path, load_external_data=False)
    return [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]


def _remove(model_path: Path) -> None:
    """Delete a model and its external-data files: those it names (onnxsim picks uuid names)
    and any <name>.onnx* / <name>.data."""
    named = []
    if model_path.is_file():
        model = onnx.load(model_path, load_external_data=False)
        named = [model_path.parent / e.value for t in model.graph.initializer for e in t.external_data
                 if e.key == "location"]
    for path in {*named, *model_path.parent.glob(model_path.name + "*"), model_path.with_suffix(".data")}:
        if path.is_file():
            path.unlink()


# --------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------

def render(results: dict) -> str:
    """The RESULTS.md section."""
    m, facts, size = results["machine"], results["model"], results["model"]["file_bytes"]
    spec = facts["spec"]
    lines = [
        SECTION_TITLE, "",
        f"Generated by `benchmarks/bench_large.py` on {results['date']}: `{results['command']}`.", "",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['ram_gib']} GiB RAM, shared with other jobs; "
        f"Python {m['python']}, onnx {m['onnx']}, onnxruntime {m['onnxruntime']} (CPU).", "",
        f"Model: {size / 1e9:.2f} GB ({size / MB:.0f} MB: a {results['onnx_bytes'] / 1e3:.0f} KB .onnx and one "
        f"external-data file), {spec['pairs']} residual blocks x + BN(Conv3x3(relu(x))) at {spec['channels']} "
        f"channels, input 1x{spec['channels']}x{spec['spatial']}x{spec['spatial']}, {facts['nodes']} nodes, "
        f"{facts['bn_total']} BN (all foldable); generated in {facts['generate_s']} s by streaming each weight "
        "into the data file.", "",
        "Each tool ran alone in its own process (`/usr/bin/time -v` for wall time and peak RSS), one after another "
        f"on the same files, under an address-space limit of {results['mem_cap_bytes'] / 1e9:.1f} GB "
        "(`prlimit --as`, so that no tool can exhaust the shared machine's memory); max rel error = max |out − original| / max |original| in onnxruntime (ORT_DISABLE_ALL).",
        "",
        "| tool | version | wall (s) | peak RSS (MB) | RSS / model size | BN left | nodes after | max rel error "
        "| status |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in results["runs"]:
        rss = r.get("peak_rss_bytes")
        lines.append(f"| {r['tool']} | {r['version']} | {_fmt(r.get('wall_s'), '.1f')} "
                     f"| {_fmt(rss and rss / MB, '.0f')} | {_fmt(rss and rss / size, '.2f')}x "
                     f"| {_fmt(r.get('bn_left'), 'd')} | {_fmt(r.get('nodes'), 'd')} "
                     f"| {_fmt(r.get('rel_error'), '.1e')} | {r['status']}{': ' + r['detail'] if r['detail'] else ''} |")
    lines += ["", "How each was called:", ""] + [f"- {r['tool']}: {r['how']}" for r in results["runs"]]
    phased = next((r for r in results["runs"] if r["tool"] == PHASES.name and r.get("phases")), None)
    if phased:
        lines += ["", "normfold fold-bn's steps in one process (time, RSS after, peak within the step):", ""]
        lines += [f"- {k}: {v['s']} s, RSS {v['rss_mb']} MB, peak {v['peak_mb']} MB ({v['peak_mb'] * 1e6 / size:.2f}x)"
                  for k, v in phased["phases"].items()]
    lines += ["", "Targets (issue #7):", ""] + targets(results["runs"], size)
    return "\n".join(lines)


def targets(runs: list[dict], size: int) -> list[str]:
    """The issue's targets, met or not."""
    by = {r["tool"]: r for r in runs}
    fold, sim = by.get(FOLD.name), by.get("onnxsim")
    out = []
    if fold and fold.get("peak_rss_bytes"):
        ratio = fold["peak_rss_bytes"] / size
        out.append(f"- normfold fold-bn peak RSS under {RSS_TARGET}x the model size: "
                   f"{'met' if ratio < RSS_TARGET and fold['status'] == 'ok' else 'MISSED'} ({ratio:.2f}x)")
    if sim:
        failed = [f"{r['tool']} ({r['detail']})" for r in runs if r["tool"].startswith("normfold") and r["status"] != "ok"]
        out.append(f"- never failing where onnxsim fails (onnxsim: {sim['status']}): "
                   + (f"MISSED, normfold failed where onnxsim did not: {'; '.join(failed)}" if failed and sim["status"] == "ok"
                      else "MISSED: " + "; ".join(failed) if failed else "met, every normfold command succeeded"))
    return out


def append_section(path: Path, section: str) -> None:
    """Append `section` to `path`, or replace the section of the same title written earlier."""
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    if SECTION_TITLE in text:
        head, rest = text.split(SECTION_TITLE, 1)
        nxt = rest.find("\n## ")
        text = head.rstrip("\n") + "\n\n" + section + ("\n" + rest[nxt:] if nxt >= 0 else "")
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.write_text(text.rstrip("\n") + "\n")


def parse_args(argv=None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gb", type=float, default=3.0, help="size of the model's weights in GB (default 3)")
    p.add_argument("--channels", type=int, default=160)
    p.add_argument("--tools", default=",".join(ANCHORS), help="anchors to run besides normfold")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per tool (default 1800)")
    p.add_argument("--mem-cap-gb", type=float, default=None,
                   help="address-space limit per tool (default: 75%% of the memory available at the start)")
    p.add_argument("--no-phases", action="store_true", help="skip the in-process RSS breakdown of fold-bn")
    p.add_argument("--out", type=Path, default=HERE / "out" / "large")
    p.add_argument("--keep", action="store_true", help="keep the generated model")
    p.add_argument("--results-md", default=str(HERE / "RESULTS.md"), help="file to append to, or 'none'")
    return p.parse_args(argv)


def main(argv=None) -> int:
    """Generate, measure, report, clean up."""
    args = parse_args(argv)
    out = args.out.resolve()
    spec = LargeSpec.for_gb(args.gb, args.channels)
    free = shutil.disk_usage(out.parent if out.parent.exists() else HERE).free
    need = 3 * spec.pairs * spec.channels**2 * 36  # model + fold-bn output + one other output
    if free < need:
        raise SystemExit(f"bench_large: {need / 1e9:.1f} GB of disk needed, {free / 1e9:.1f} GB free under {out.parent}")
    try:
        print(f"generating {spec} ...", flush=True)
        facts = generate(spec, out)
        model_path = out / "model.onnx"
        print(f"  {facts['file_bytes'] / 1e9:.2f} GB, {facts['nodes']} nodes in {facts['generate_s']} s", flush=True)
        cap = int(args.mem_cap_gb * 1e9) if args.mem_cap_gb else int(0.75 * _available_bytes())
        runs = run_all(model_path, out, args.tools.split(","), args.timeout, not args.no_phases, cap)
        results = {"date": datetime.date.today().isoformat(),
                   "command": "python -m benchmarks.bench_large" + "".join(f" {a}" for a in (argv or sys.argv[1:])),
                   "machine": machine_facts(), "model": facts, "mem_cap_bytes": cap, "onnx_bytes": model_path.stat().st_size, "runs": runs}
        (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
        section = render(results)
        print("\n" + section)
        if args.results_md != "none":
            append_section(Path(args.results_md), section)
    finally:
        if not args.keep:
            _remove(out / "model.onnx")
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_phases":
        run_phases(*sys.argv[2:4])
    else:
        sys.exit(main())
