"""Benchmark the normfold CUDA kernels, called directly (no onnxruntime-gpu), against the copy floor and PyTorch.

For each case, in one run on one GPU, fp32 and fp16, timed with CUDA events around each call
(warm-up first, L2 flushed before every timed call, median of --reps):
  normfold    the kernel the op runs (automatic path: on-chip single read where the slice fits)
  two-pass    the same kernel family forced to its two-pass path (for reference)
  copy        a device-to-device copy of the same bytes (dst.copy_(src): read X once, write Y once)
  torch       PyTorch's CUDA implementation of the same layer (native kernel where one exists)
GB/s counts the X-sized tensors read and written: X and Y, and for the fused adds also the residual
(and the sum output); parameters and per-channel adds are negligible. % of copy scales the copy's time
to the same bytes.

    NORMFOLD_HARNESS=1 bash custom_ops/build.sh   # once, where nvcc is; carry custom_ops/build/harness to the GPU
    python benchmarks/bench_cuda.py [--reps 50] [--out benchmarks/out/cuda_results.md]

The module also holds `Harness`, the ctypes wrapper over libnormfold_cuda_harness.so used by
tests/test_cuda_ops.py; importing it needs no GPU.
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import os
import platform
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
BUILD_SCRIPT = ROOT / "custom_ops" / "build.sh"  # NORMFOLD_HARNESS=1: the CMake target normfold_cuda_harness
DEFAULT_HARNESS = ROOT / "custom_ops" / "build" / "harness" / "libnormfold_cuda_harness.so"
SOURCES = [ROOT / "custom_ops" / "CMakeLists.txt",
           *(ROOT / "custom_ops" / "src" / f
             for f in ("cuda_kernels.cu", "cuda_kernels.h", "cuda_harness.cu", "activation.h", "fast_div.h"))]
PATHS = {"auto": 0, "on_chip": 1, "two_pass": 2}


def nvcc_path() -> str | None:
    found = os.environ.get("NVCC") or shutil.which("nvcc")
    return found or ("/usr/local/cuda/bin/nvcc" if Path("/usr/local/cuda/bin/nvcc").exists() else None)


def ensure_harness(build: bool = True) -> tuple[Path | None, str]:
    """(path to the harness library, "") or (None, why not). Builds it when missing or older than its
    sources and nvcc exists; NORMFOLD_CUDA_HARNESS names a prebuilt one (used as is)."""
    if os.environ.get("NORMFOLD_CUDA_HARNESS"):
        path = Path(os.environ["NORMFOLD_CUDA_HARNESS"])
        return (path, "") if path.exists() else (None, f"NORMFOLD_CUDA_HARNESS={path} does not exist")
    path = DEFAULT_HARNESS
    stale = not path.exists() or any(s.stat().st_mtime > path.stat().st_mtime for s in SOURCES if s.exists())
    if not stale:
        return path, ""
    if nvcc_path() is None or not build:
        if path.exists():  # sources look newer (e.g. copied to another machine) but nothing can rebuild: use it
            return path, ""
        return None, (f"nvcc not found and no prebuilt harness at {path.relative_to(ROOT)} "
                      "(build it with `NORMFOLD_HARNESS=1 bash custom_ops/build.sh` where nvcc exists "
                      "and carry that folder)")
    proc = build_harness(path.parent)
    if proc.returncode != 0:
        return None, f"building the CUDA harness failed: {(proc.stderr or proc.stdout).strip()[-2000:]}"
    return path, ""


def build_harness(out_dir: Path, archs: str = "") -> subprocess.CompletedProcess:
    """Build libnormfold_cuda_harness.so into out_dir (a CMake build folder) with custom_ops/build.sh;
    `archs` ("80", "86 90") overrides the CUDA architectures (default: those of the op library)."""
    env = {**os.environ, "NORMFOLD_HARNESS": "1", "NORMFOLD_HARNESS_DIR": str(out_dir)}
    if nvcc_path():  # build.sh looks on PATH and in /usr/local/cuda/bin
        env["PATH"] = f"{Path(nvcc_path()).parent}{os.pathsep}{env.get('PATH', '')}"
    if archs:
        env["NORMFOLD_CUDA_ARCHS"] = archs
    return subprocess.run(["bash", str(BUILD_SCRIPT)], capture_output=True, text=True, env=env, timeout=1800)


def _dtype_code(t: torch.Tensor) -> int:
    codes = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
    if t.dtype not in codes:
        raise TypeError(f"the CUDA kernels take float32, float16 or bfloat16, not {t.dtype}")
    return codes[t.dtype]


def _ptr(t: torch.Tensor | None, like: torch.Tensor, numel: int | None = None, name: str = "") -> int | None:
    """Device pointer of a contiguous tensor of like's dtype and device (None passes NULL)."""
    if t is None:
        return None
    if t.dtype != like.dtype or t.device != like.device or not t.is_contiguous():
        raise ValueError(f"{name}: expected a contiguous {like.dtype} tensor on {like.device}")
    if numel is not None and t.numel() != numel:
        raise ValueError(f"{name}: expected {numel} elements, got {t.numel()}")
    return t.data_ptr()


class Harness:
    """ctypes wrapper of libnormfold_cuda_harness.so. Every call launches on torch's current stream of
    the input's device and returns the output tensor (`out`, or a new one); errors raise RuntimeError."""

    def __init__(self, path: Path | str):
        self.lib = ctypes.CDLL(str(path))
        i64, f32, i32, vp = ctypes.c_int64, ctypes.c_float, ctypes.c_int, ctypes.c_void_p
        self.lib.nf_row_norm.argtypes = [vp] * 8 + [i64] * 4 + [f32] + [i32] * 4 + [vp]
        self.lib.nf_channel_norm.argtypes = [vp] * 4 + [i64] * 3 + [f32, i32, i32, vp]
        self.lib.nf_weight_norm.argtypes = [vp] * 3 + [i64] * 3 + [i32, vp]
        for f in (self.lib.nf_row_norm, self.lib.nf_channel_norm, self.lib.nf_weight_norm):
            f.restype = ctypes.c_char_p
        self.lib.nf_row_path.argtypes = [i64, i32]
        self.lib.nf_channel_path.argtypes = [i64, i64, i32]
        self.lib.nf_fast_div.argtypes = [ctypes.c_uint32, ctypes.c_uint32]
        self.lib.nf_fast_div.restype = ctypes.c_uint32

    @staticmethod
    def _check(message: bytes | None) -> None:
        if message is not None:
            raise RuntimeError(message.decode())

    @staticmethod
    def _stream(x: torch.Tensor) -> int:
        return torch.cuda.current_stream(x.device).cuda_stream

    # ---- the raw launchers (cuda_kernels.h)

    def row_norm(self, x, count, size, spatial, period, epsilon, centered, activation=0, gamma=None, beta=None,
                 tau=None, out=None, path="auto", param_count=None, skip=None, add=None, sum_out=None):
        """`skip` (x's shape) and `add` (count * size / spatial values) are the fused adds; `sum_out` receives
        x + skip."""
        out = torch.empty_like(x) if out is None else out
        self._check(self.lib.nf_row_norm(
            _ptr(x, x, None, "x"), _ptr(skip, x, x.numel(), "skip"), _ptr(add, x, count * size // spatial, "add"),
            _ptr(gamma, x, param_count, "gamma"), _ptr(beta, x, param_count, "beta"), _ptr(tau, x, param_count, "tau"),
            _ptr(out, x, x.numel(), "out"), _ptr(sum_out, x, x.numel(), "sum_out"), count, size, spatial, period,
            epsilon, int(centered), activation, _dtype_code(x), PATHS[path], self._stream(x)))
        return out

    def row_path(self, size: int, dtype: torch.dtype) -> str:
        """The path `auto` takes for rows of `size` elements on the current device."""
        return "on_chip" if self.lib.nf_row_path(size, _dtype_code(torch.empty(0, dtype=dtype))) == 1 else "two_pass"

    def channel_path(self, c: int, s: int, dtype: torch.dtype) -> str:
        return "on_chip" if self.lib.nf_channel_path(c, s, _dtype_code(torch.empty(0, dtype=dtype))) == 1 else "two_pass"

    # ---- the ops, mapped onto the launchers exactly as custom_ops/src/*.cc do

    def group_norm(self, x, num_groups, scale, bias, epsilon=1e-5, silu=False, out=None, path="auto", add=None):
        """GroupNorm; with `add` (N·C values) BiasGroupNorm, GroupNorm(x + add[n, c])."""
        n, c, spatial = x.shape[0], x.shape[1], _numel(x.shape[2:])
        size = c // num_groups * spatial
        return self.row_norm(x, n * num_groups, size, spatial, num_groups, epsilon, True, 1 if silu else 0,
                             scale, bias, out=out, path=path, param_count=c,
                             add=None if add is None else add.reshape(-1))

    def layer_norm(self, x, scale, bias=None, axis=-1, epsilon=1e-5, out=None, path="auto", skip=None, sum_out=None):
        """LayerNorm over [axis, rank); with `skip` SkipLayerNorm of x + skip (`sum_out` gets the sum)."""
        d = _numel(x.shape[axis % x.dim():])
        return self.row_norm(x, x.numel() // d, d, 1, 1, epsilon, True, 0, scale, bias, out=out, path=path,
                             param_count=d, skip=skip, sum_out=sum_out)

    def layer_norm_channel_first(self, x, scale, bias=None, epsilon=1e-5, out=None, path="auto"):
        out = torch.empty_like(x) if out is None else out
        c = x.shape[1]
        self._check(self.lib.nf_channel_norm(
            _ptr(x, x, None, "x"), _ptr(scale, x, c, "scale"), _ptr(bias, x, c, "bias"), _ptr(out, x, x.numel(), "out"),
            x.shape[0], c, _numel(x.shape[2:]), epsilon, _dtype_code(x), PATHS[path], self._stream(x)))
        return out

    def rms_norm(self, x, scale=None, axis=-1, epsilon=1e-6, out=None, path="auto", skip=None, sum_out=None):
        """RMSNorm over [axis, rank); with `skip` SkipRMSNorm of x + skip (`sum_out` gets the sum)."""
        d = _numel(x.shape[axis % x.dim():])
        return self.row_norm(x, x.numel() // d, d, 1, 1, epsilon, False, 0, scale, out=out, path=path, param_count=d,
                             skip=skip, sum_out=sum_out)

    def filter_response_norm(self, x, gamma, beta, tau=None, epsilon=1e-6, use_tlu=True, out=None, path="auto"):
        n, c, spatial = x.shape[0], x.shape[1], _numel(x.shape[2:])
        flat = [None if t is None else t.reshape(-1) for t in (gamma, beta, tau)]
        return self.row_norm(x, n * c, spatial, spatial, c, abs(epsilon), False, 2 if use_tlu else 0, *flat,
                             out=out, path=path, param_count=c)

    def weight_norm(self, v, g, dim=0, out=None):
        out = torch.empty_like(v) if out is None else out
        shape = v.shape
        self._check(self.lib.nf_weight_norm(
            _ptr(v, v, None, "v"), _ptr(g.reshape(-1), v, shape[dim], "g"), _ptr(out, v, v.numel(), "out"),
            _numel(shape[:dim]), shape[dim], _numel(shape[dim + 1:]), _dtype_code(v), self._stream(v)))
        return out


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


# ---------------------------------------------------------------- benchmark

def cuda_time(fn, reps: int, warmup: int, flush: torch.Tensor | None) -> float:
    """Median milliseconds of fn() on the current stream, each call timed alone with CUDA events."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if flush is not None:
            flush.zero_()  # evict the operands from L2 so every call reads DRAM
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def channel_first_ln_torch(x, w, b, eps):
    """ConvNeXt's LayerNorm2d (channels_first branch): no native kernel exists for it."""
    u = x.mean(1, keepdim=True)
    s = (x - u).pow(2).mean(1, keepdim=True)
    view = (1, -1) + (1,) * (x.dim() - 2)
    return w.view(view) * ((x - u) / torch.sqrt(s + eps)) + b.view(view)


def frn_torch(x, gamma, beta, tau, eps):
    nu2 = x.pow(2).mean(dim=tuple(range(2, x.dim())), keepdim=True)
    view = (1, -1) + (1,) * (x.dim() - 2)
    return torch.maximum(gamma.view(view) * x * torch.rsqrt(nu2 + abs(eps)) + beta.view(view), tau.view(view))


def cases(h: Harness, dtype: torch.dtype):
    """(name, x, ours(path, out), PyTorch variants {label: fn}, path `auto` takes) for each benchmarked layer."""
    F = torch.nn.functional
    dev = "cuda"

    def rand(*shape, offset=0.0):
        return torch.randn(*shape, device=dev, dtype=torch.float32).add_(offset).to(dtype)

    out = []  # (..., tensors moved) where a case moves more than X and Y
    x = rand(8, 320, 64, 64, offset=1.0)
    g, b = rand(320), rand(320)
    out.append(("GroupNorm (32 groups)", x, lambda p, o, x=x, g=g, b=b: h.group_norm(x, 32, g, b, out=o, path=p),
                {"F.group_norm": lambda x=x, g=g, b=b: F.group_norm(x, 32, g, b)}, h.row_path(10 * 64 * 64, dtype)))
    out.append(("GroupNorm+SiLU (32 groups)", x, lambda p, o, x=x, g=g, b=b: h.group_norm(x, 32, g, b, silu=True, out=o, path=p),
                {"F.silu(F.group_norm)": lambda x=x, g=g, b=b: F.silu(F.group_norm(x, 32, g, b))},
                h.row_path(10 * 64 * 64, dtype)))
    t = rand(8, 320)
    out.append(("BiasGroupNorm+SiLU (time-embedding add)", x,
                lambda p, o, x=x, g=g, b=b, t=t: h.group_norm(x, 32, g, b, silu=True, out=o, path=p, add=t),
                {"F.silu(F.group_norm(x + t))": lambda x=x, g=g, b=b, t=t: F.silu(
                    F.group_norm(x + t[:, :, None, None], 32, g, b))}, h.row_path(10 * 64 * 64, dtype)))
    x = rand(64, 1024, 1024)
    g, b = rand(1024), rand(1024)
    out.append(("LayerNorm (last axis 1024)", x, lambda p, o, x=x, g=g, b=b: h.layer_norm(x, g, b, out=o, path=p),
                {"F.layer_norm": lambda x=x, g=g, b=b: F.layer_norm(x, (1024,), g, b)}, h.row_path(1024, dtype)))
    skip, total = rand(64, 1024, 1024), torch.empty_like(x)
    out.append(("SkipLayerNormSum (residual add, sum written)", x,
                lambda p, o, x=x, g=g, b=b, s=skip, t=total: h.layer_norm(x, g, b, out=o, path=p, skip=s, sum_out=t),
                {"x + skip, F.layer_norm": lambda x=x, g=g, b=b, s=skip: F.layer_norm(x + s, (1024,), g, b)},
                h.row_path(1024, dtype), 4))
    x = rand(8, 256, 56, 56)
    g, b = rand(256), rand(256)
    out.append(("LayerNorm channel-first (C=256)", x, lambda p, o, x=x, g=g, b=b: h.layer_norm_channel_first(x, g, b, 1e-6, out=o, path=p),
                {"LayerNorm2d (torch ops)": lambda x=x, g=g, b=b: channel_first_ln_torch(x, g, b, 1e-6),
                 "permute+F.layer_norm+permute": lambda x=x, g=g, b=b: F.layer_norm(
                     x.permute(0, 2, 3, 1), (256,), g, b).permute(0, 3, 1, 2).contiguous()},
                h.channel_path(256, 56 * 56, dtype)))
    x = rand(16, 2048, 4096)
    g = rand(4096)
    out.append(("RMSNorm (last axis 4096)", x, lambda p, o, x=x, g=g: h.rms_norm(x, g, epsilon=1e-6, out=o, path=p),
                {"F.rms_norm": lambda x=x, g=g: F.rms_norm(x, (4096,), g, 1e-6)}, h.row_path(4096, dtype)))
    skip = rand(16, 2048, 4096)
    out.append(("SkipRMSNorm (residual add)", x,
                lambda p, o, x=x, g=g, s=skip: h.rms_norm(x, g, epsilon=1e-6, out=o, path=p, skip=s),
                {"F.rms_norm(x + skip)": lambda x=x, g=g, s=skip: F.rms_norm(x + s, (4096,), g, 1e-6)},
                h.row_path(4096, dtype), 3))
    x = rand(8, 256, 56, 56)
    gamma, beta, tau = rand(256), rand(256), rand(256)
    out.append(("FilterResponseNorm+TLU", x,
                lambda p, o, x=x, a=gamma, b=beta, t=tau: h.filter_response_norm(x, a, b, t, 1e-6, out=o, path=p),
                {"FRN (torch ops)": lambda x=x, a=gamma, b=beta, t=tau: frn_torch(x, a, b, t, 1e-6)},
                h.row_path(56 * 56, dtype)))
    return out


def machine_line() -> str:
    p = torch.cuda.get_device_properties(0)
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20).stdout.strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        smi = "unknown"
    return (f"{p.name} ({p.multi_processor_count} SMs, {p.total_memory / 2**30:.0f} GiB, "
            f"L2 {getattr(p, 'L2_cache_size', 0) / 2**20:.0f} MiB), driver {smi}; torch {torch.__version__} "
            f"(CUDA {torch.version.cuda}), Python {platform.python_version()}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--dtypes", default="fp32,fp16")
    ap.add_argument("--no-flush", action="store_true", help="do not flush L2 between timed calls")
    ap.add_argument("--out", type=Path, help="also write the markdown section to this file")
    ap.add_argument("--date", default=datetime.date.today().isoformat())
    args = ap.parse_args(argv)

    if not torch.cuda.is_available():
        print("bench_cuda.py: no CUDA GPU here (torch.cuda.is_available() is False): nothing to measure. "
              "Run it on a GPU machine.", file=sys.stderr)
        return 2
    path, why = ensure_harness()
    if path is None:
        print(f"bench_cuda.py: {why}", file=sys.stderr)
        return 2
    h = Harness(path)
    dtypes = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    flush = None if args.no_flush else torch.empty(
        max(2 * getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 50 << 20), 64 << 20) // 4,
        device="cuda", dtype=torch.float32)
    torch.manual_seed(0)
    rows = []
    for name in args.dtypes.split(","):
        dtype = dtypes[name]
        for label, x, ours, torch_fns, auto_path, *moved in cases(h, dtype):
            tensors = moved[0] if moved else 2
            nbytes = tensors * x.numel() * x.element_size()
            dst, out = torch.empty_like(x), torch.empty_like(x)
            copy_ms = cuda_time(lambda: dst.copy_(x), args.reps, args.warmup, flush)
            ms = cuda_time(lambda: ours("auto", out), args.reps, args.warmup, flush)
            two_ms = cuda_time(lambda: ours("two_pass", out), args.reps, args.warmup, flush)
            with torch.no_grad():
                err = (ours("auto", out).float() - next(iter(torch_fns.values()))().float()).abs().max().item()
            shape = "×".join(map(str, x.shape))
            for tname, fn in torch_fns.items():
                t_ms = cuda_time(fn, args.reps, args.warmup, flush)
                rows.append((label, shape, name, auto_path, nbytes, ms, two_ms, copy_ms * tensors / 2, tname, t_ms,
                             err))
            del dst, out
        torch.cuda.empty_cache()

    cmd = "python benchmarks/bench_cuda.py " + " ".join(argv if argv is not None else sys.argv[1:])
    lines = [f"### normfold CUDA kernels vs copy and PyTorch ({args.date})", "",
             f"Run {args.date} with `{cmd.strip()}`.", "", f"Machine: {machine_line()}.", "",
             "Kernels called directly through `libnormfold_cuda_harness.so` (same code as the op library). "
             f"Median of {args.reps} calls timed alone with CUDA events after {args.warmup} warm-up calls"
             + ("" if args.no_flush else ", L2 flushed before each") + ". GB/s = bytes of the X-sized tensors read and "
             "written (X, Y; the fused adds also the residual and the sum) / time; copy = `dst.copy_(x)` of the same "
             "tensor in the same run, scaled to those bytes. Path: the kernel the op picks "
             "(on-chip = one global read; two-pass = statistics read + normalize read).", "",
             "| layer | shape | dtype | path | normfold ms | GB/s | % of copy | two-pass ms | copy ms | PyTorch | PyTorch ms "
             "| speed-up vs PyTorch | max abs diff vs PyTorch |",
             "|---|---|---|---|---:|---:|---:|---:|---:|---|---:|---:|---:|"]
    for label, shape, dname, auto_path, nbytes, ms, two_ms, copy_ms, tname, t_ms, err in rows:
        lines.append(f"| {label} | {shape} | {dname} | {auto_path.replace('_', '-')} | {ms:.3f} | "
                     f"{nbytes / ms / 1e6:.0f} | {100 * copy_ms / ms:.0f}% | {two_ms:.3f} | {copy_ms:.3f} | {tname} | "
                     f"{t_ms:.3f} | {t_ms / ms:.2f}x | {err:.2e} |")
    lines += ["", "Targets (issue 5): ≥ 80% of copy bandwidth on large tensors; faster than PyTorch for GroupNorm "
              "and channel-first LayerNorm.", ""]
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
