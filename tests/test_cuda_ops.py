"""The CUDA build of the com.normfold ops.

Without a GPU only the builds are checked (the op library and the direct-call harness
compile wherever nvcc exists, for the deployment architectures, and load). Two kinds
of GPU tests, each skipping cleanly (with the reason) where it cannot run:
- kernel tests through the direct-call harness (the CMake target `normfold_cuda_harness`,
  built by `NORMFOLD_HARNESS=1 bash custom_ops/build.sh`; `bench_cuda.Harness`: ctypes +
  torch CUDA tensors, no onnxruntime-gpu needed):
  every op, fp32/fp16/bf16, both kernel paths (on-chip single read and two-pass),
  the shape families of the CPU tests, odd sizes, misaligned views, large mean
  offsets, against PyTorch on the GPU in float64; launches on the caller's stream
  without synchronising;
- op tests on onnxruntime's CUDA provider (need onnxruntime-gpu).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from onnx import TensorProto
from tests.test_custom_ops import (one_node, ref_frn, ref_group_norm, ref_layer_norm, ref_rms_norm, ref_weight_norm)

from normfold.tools.doctor import doctor
from normfold.ops.library import cuda_ops_library_path
from normfold.runtime.session import make_session

import benchmarks.bench_cuda as bench_cuda

NVCC = shutil.which("nvcc") or (Path("/usr/local/cuda/bin/nvcc") if Path("/usr/local/cuda/bin/nvcc").exists() else None)


@pytest.mark.skipif(NVCC is None, reason="nvcc not found: the CUDA library is not built here")
def test_cuda_library_compiled_for_deployment_architectures():
    path = cuda_ops_library_path()
    assert path is not None, "nvcc exists but libnormfold_ops_cuda.so was not built; see normfold doctor"
    data = Path(path).read_bytes()
    for arch in (b"sm_80", b"sm_86", b"sm_89", b"sm_90"):
        assert arch in data, f"no {arch.decode()} code in {path}"


@pytest.mark.skipif(NVCC is None, reason="nvcc not found: the CUDA library is not built here")
def test_cuda_library_loads_and_runs_its_cpu_kernels(rng):
    """The CUDA library links the CUDA runtime statically: it loads without CUDA libraries."""
    x = rng.standard_normal((2, 8, 5)).astype(np.float32)
    scale, bias = rng.standard_normal(8).astype(np.float32), rng.standard_normal(8).astype(np.float32)
    options = ort.SessionOptions()
    options.register_custom_ops_library(cuda_ops_library_path())
    model = one_node("GroupNorm", dict(X=x, scale=scale, bias=bias), dict(num_groups=4))
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    y = session.run(None, dict(X=x, scale=scale, bias=bias))[0]
    np.testing.assert_allclose(y, ref_group_norm(x, scale, bias, 4), atol=1e-5)


def _gpu_ready() -> bool:
    return torch.cuda.is_available() and cuda_ops_library_path() is not None and doctor()["cuda_provider"]["usable"]


gpu = pytest.mark.skipif(not _gpu_ready(), reason="needs a CUDA GPU, the CUDA library and a usable CUDA provider")

DTYPES = {"fp32": (np.float32, None, 1e-4), "fp16": (np.float16, None, 2e-3), "bf16": (np.float32, TensorProto.BFLOAT16, 2e-2)}


def run_cuda(op, inputs, attrs, dtype_name):
    dtype, compute_type, _ = DTYPES[dtype_name]
    inputs = {k: None if v is None else v.astype(dtype) for k, v in inputs.items()}
    model = one_node(op, inputs, attrs, dtype=dtype, compute_type=compute_type)
    session = make_session(model, provider="cuda")
    return session.run(None, {k: v for k, v in inputs.items() if v is not None})[0], inputs


def check(y, ref, dtype_name):
    tol = DTYPES[dtype_name][2]
    scale = max(1.0, float(np.abs(ref).max(initial=0.0)))
    np.testing.assert_allclose(y.astype(np.float64), ref, atol=tol * scale, rtol=tol)


SHAPES = [(1, 8, 7, 13), (4, 32, 64, 64), (2, 12, 33), (3, 6, 5, 4, 3), (2, 320, 9, 9)]


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("activation", ["none", "silu"])
def test_group_norm_cuda(shape, dtype_name, activation, rng):
    groups = 2 if shape[1] % 4 else 4
    x = rng.standard_normal(shape) * 2 + 100
    y, given = run_cuda("GroupNorm", dict(X=x, scale=rng.standard_normal(shape[1]), bias=rng.standard_normal(shape[1])),
                        dict(num_groups=groups, activation=activation), dtype_name)
    check(y, ref_group_norm(given["X"], given["scale"], given["bias"], groups, activation=activation), dtype_name)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("channel_first", [0, 1])
def test_layer_norm_cuda(shape, dtype_name, channel_first, rng):
    n = shape[1] if channel_first else shape[-1]
    x = rng.standard_normal(shape) + 50
    y, given = run_cuda("LayerNorm", dict(X=x, scale=rng.standard_normal(n), bias=rng.standard_normal(n)),
                        dict(channel_first=channel_first), dtype_name)
    check(y, ref_layer_norm(given["X"], given["scale"], given["bias"], channel_first=channel_first), dtype_name)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("shape", SHAPES)
def test_rms_norm_and_frn_cuda(shape, dtype_name, rng):
    x = rng.standard_normal(shape)
    y, given = run_cuda("RMSNorm", dict(X=x, scale=rng.standard_normal(shape[-1])), dict(epsilon=1e-6), dtype_name)
    check(y, ref_rms_norm(given["X"], given["scale"], -1, 1e-6), dtype_name)
    params = {k: rng.standard_normal(shape[1]) for k in ("gamma", "beta", "tau")}
    y, given = run_cuda("FilterResponseNorm", dict(X=x, **params), {}, dtype_name)
    check(y, ref_frn(given["X"], given["gamma"], given["beta"], given["tau"]), dtype_name)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("dim", [0, 1, 3])
def test_weight_norm_cuda(dtype_name, dim, rng):
    v = rng.standard_normal((16, 8, 3, 5))
    y, given = run_cuda("WeightNorm", dict(V=v, g=rng.standard_normal(v.shape[dim])), dict(dim=dim), dtype_name)
    check(y, ref_weight_norm(given["V"], given["g"], dim), dtype_name)


@gpu
@pytest.mark.gpu
def test_group_norm_cuda_matches_torch_cuda_layer(rng):
    """Against torch.nn.GroupNorm run on the GPU in fp16."""
    layer = torch.nn.GroupNorm(8, 64).cuda().half().eval()
    torch.nn.init.normal_(layer.weight)
    torch.nn.init.normal_(layer.bias)
    x = torch.randn(2, 64, 31, 17, device="cuda", dtype=torch.float16)
    with torch.no_grad():
        expected = layer(x).float().cpu().numpy()
    inputs = dict(X=x.cpu().numpy(), scale=layer.weight.detach().cpu().numpy(), bias=layer.bias.detach().cpu().numpy())
    session = make_session(one_node("GroupNorm", inputs, dict(num_groups=8), dtype=np.float16), provider="cuda")
    np.testing.assert_allclose(session.run(None, inputs)[0].astype(np.float32), expected, atol=1e-2, rtol=1e-2)


# ---------------------------------------------------------------- the kernels through the direct-call harness

KERNELS = Path(__file__).resolve().parents[1] / "custom_ops" / "src" / "cuda_kernels.cu"


def test_cuda_kernels_never_allocate_synchronise_or_use_the_default_stream():
    """A source guard for what the GPU tests cannot observe: no allocation or synchronisation in the
    launchers, and every launch names a stream (the one onnxruntime hands the op)."""
    import re

    source = KERNELS.read_text()
    for banned in ("cudaMalloc", "cudaFree", "cudaDeviceSynchronize", "cudaStreamSynchronize", "cudaMemcpy("):
        assert banned not in source, f"{banned} in {KERNELS.name}"
    launches = re.findall(r"<<<(.*?)>>>", source, re.S)
    assert launches
    for config in launches:
        parts = [p.strip() for p in re.split(r",(?![^()]*\))", config)]  # commas outside parentheses
        assert len(parts) == 4 and parts[3] not in ("0", "nullptr", "cudaStreamLegacy"), f"launch <<<{config}>>>"


@pytest.mark.skipif(NVCC is None, reason="nvcc not found: the CUDA harness cannot be built here")
def test_cuda_harness_builds_and_loads(tmp_path):
    """The harness target compiles (one architecture here, for speed) and the library loads;
    its argument checks and empty launches answer without touching a GPU."""
    proc = bench_cuda.build_harness(tmp_path, archs="80")
    assert proc.returncode == 0, (proc.stderr + proc.stdout)[-3000:]
    lib = bench_cuda.Harness(tmp_path / "libnormfold_cuda_harness.so").lib
    assert lib.nf_row_norm(*[None] * 5, 2, 4, 1, 1, 1e-5, 1, 0, 7, 0, None) == b"bad dtype or path"
    assert lib.nf_row_norm(*[None] * 5, 2, 4, 1, 1, 1e-5, 1, 3, 0, 0, None) == b"bad activation"
    assert lib.nf_row_norm(*[None] * 5, 0, 4, 1, 1, 1e-5, 1, 0, 0, 0, None) is None  # empty: nothing launched
    assert lib.nf_channel_norm(*[None] * 4, 0, 3, 5, 1e-5, 1, 2, None) is None


@pytest.fixture(scope="session")
def harness():
    """The harness library loaded with ctypes; built first when missing or stale (needs nvcc)."""
    if not torch.cuda.is_available():
        pytest.skip(f"no CUDA GPU: torch.cuda.is_available() is False (torch {torch.__version__})")
    path, why = bench_cuda.ensure_harness()
    if path is None:
        pytest.skip(why)
    return bench_cuda.Harness(path)


DEVICE = "cuda"
TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
MANTISSA_BITS = {"fp16": 10, "bf16": 7}
KERNEL_PATHS = ["auto", "on_chip", "two_pass"]


def on_gpu(t: torch.Tensor | None, dtype: torch.dtype, offset: int = 0) -> torch.Tensor | None:
    """t rounded to dtype, on the GPU, starting `offset` elements into its buffer (offset 1: the view's
    data pointer is not 16-byte aligned)."""
    if t is None:
        return None
    buf = torch.zeros(t.numel() + offset, dtype=dtype, device=DEVICE)
    view = buf[offset:].view(t.shape)
    view.copy_(t)
    return view


def assert_close_gpu(y: torch.Tensor, ref: torch.Tensor, dtype_name: str) -> None:
    """fp32: within 1e-5 of the output scale; fp16/bf16: within one rounding step of the type at |ref|
    (+1e-5 of the scale for the float arithmetic). ref is float64, from the same rounded inputs."""
    assert y.shape == ref.shape and y.dtype == TORCH_DTYPES[dtype_name]
    y, ref = y.double(), ref.double()
    scale = max(1.0, ref.abs().max().item()) if ref.numel() else 1.0
    if dtype_name == "fp32":
        allowed = torch.full_like(ref, 1e-5 * scale)
    else:
        mag = ref.abs().clamp_min(torch.finfo(TORCH_DTYPES[dtype_name]).tiny)
        allowed = torch.exp2(torch.floor(torch.log2(mag)) - MANTISSA_BITS[dtype_name]) + 1e-5 * scale
    excess = (y - ref).abs() - allowed
    if excess.numel() and excess.max().item() > 0:
        i = int(excess.argmax())
        at = tuple(int(v) for v in np.unravel_index(i, tuple(ref.shape)))
        raise AssertionError(f"{int((excess > 0).sum())} of {ref.numel()} elements off; worst at {at}: got "
                             f"{y.flatten()[i].item()!r}, expected {ref.flatten()[i].item()!r} "
                             f"(allowed {allowed.flatten()[i].item():.3g}); nan in y: {bool(y.isnan().any())}")


def reference(op: str, x, p: dict, a: dict):
    """The PyTorch layer in float64 on the GPU (channel-first LN and FRN written out by hand)."""
    view = (1, -1) + (1,) * (x.dim() - 2)
    if op == "group_norm":
        y = torch.group_norm(x, a["groups"], p["scale"], p["bias"], a["eps"])  # F.group_norm refuses 1 value per group
        return F.silu(y) if a.get("silu") else y
    if op == "layer_norm":
        shape = x.shape[a["axis"] % x.dim():]
        bias = None if p["bias"] is None else p["bias"].reshape(shape)
        return F.layer_norm(x, shape, p["scale"].reshape(shape), bias, a["eps"])
    if op == "channel_ln":
        u = x.mean(1, keepdim=True)
        var = (x - u).pow(2).mean(1, keepdim=True)
        y = (x - u) / torch.sqrt(var + a["eps"]) * p["scale"].view(view)
        return y if p["bias"] is None else y + p["bias"].view(view)
    if op == "rms_norm":
        shape = x.shape[a["axis"] % x.dim():]
        return F.rms_norm(x, shape, None if p["scale"] is None else p["scale"].reshape(shape), a["eps"])
    if op == "frn":
        nu2 = x.pow(2).mean(dim=tuple(range(2, x.dim())), keepdim=True) if x.dim() > 2 else x.pow(2)
        y = p["gamma"].view(view) * x * torch.rsqrt(nu2 + abs(a["eps"])) + p["beta"].view(view)
        return torch.maximum(y, p["tau"].view(view)) if a.get("use_tlu", True) else y
    if op == "weight_norm":
        dim = a["dim"]
        return torch._weight_norm(x, p["g"].reshape([-1 if i == dim else 1 for i in range(x.dim())]), dim)
    raise ValueError(op)


def launch(h, op: str, x, p: dict, a: dict, out, path: str):
    if op == "group_norm":
        return h.group_norm(x, a["groups"], p["scale"], p["bias"], a["eps"], a.get("silu", False), out=out, path=path)
    if op == "layer_norm":
        return h.layer_norm(x, p["scale"], p["bias"], a["axis"], a["eps"], out=out, path=path)
    if op == "channel_ln":
        return h.layer_norm_channel_first(x, p["scale"], p["bias"], a["eps"], out=out, path=path)
    if op == "rms_norm":
        return h.rms_norm(x, p["scale"], a["axis"], a["eps"], out=out, path=path)
    if op == "frn":
        return h.filter_response_norm(x, p["gamma"], p["beta"], p["tau"], a["eps"], a.get("use_tlu", True), out=out,
                                      path=path)
    if op == "weight_norm":
        return h.weight_norm(x, p["g"], a["dim"], out=out)
    raise ValueError(op)


def param_shapes(op: str, shape, a: dict) -> dict:
    """name -> number of elements (None: input left out)."""
    c = shape[1] if len(shape) > 1 else None
    if op == "group_norm":
        return dict(scale=c, bias=c)
    if op in ("layer_norm", "rms_norm"):
        d = int(np.prod(shape[a["axis"] % len(shape):]))
        return dict(scale=d, bias=d if a.get("bias", True) else None) if op == "layer_norm" else dict(
            scale=d if a.get("scale", True) else None)
    if op == "channel_ln":
        return dict(scale=c, bias=c if a.get("bias", True) else None)
    if op == "frn":
        return dict(gamma=c, beta=c, tau=c)
    return dict(g=shape[a["dim"]])


def fits_on_chip(h, op: str, shape, a: dict, dtype) -> bool:
    spatial = int(np.prod(shape[2:]))
    if op == "group_norm":
        return h.row_path(shape[1] // a["groups"] * spatial, dtype) == "on_chip"
    if op in ("layer_norm", "rms_norm"):
        return h.row_path(int(np.prod(shape[a["axis"] % len(shape):])), dtype) == "on_chip"
    if op == "channel_ln":
        return h.channel_path(shape[1], spatial, dtype) == "on_chip"
    if op == "frn":
        return h.row_path(spatial, dtype) == "on_chip"
    return True


def check_case(h, op: str, shape, dtype_name: str, path: str = "auto", *, offset: float = 0.0, spread: float = 1.0,
               x_off: int = 0, y_off: int = 0, p_off: int = 0, seed: int = 0, **a) -> None:
    """Runs `op` on random data (spread * N(0, 1) + offset) through the harness and compares with PyTorch."""
    dtype = TORCH_DTYPES[dtype_name]
    gen = torch.Generator().manual_seed(seed)
    x64 = torch.randn(shape, generator=gen, dtype=torch.float64) * spread + offset
    x = on_gpu(x64, dtype, x_off)
    params = {k: None if n is None else on_gpu(torch.randn(n, generator=gen, dtype=torch.float64), dtype, p_off)
              for k, n in param_shapes(op, shape, a).items()}
    out = torch.full(shape, float("nan"), dtype=dtype, device=DEVICE) if y_off == 0 else on_gpu(
        torch.full(shape, float("nan"), dtype=torch.float64), dtype, y_off)
    if path == "on_chip" and op != "weight_norm" and not fits_on_chip(h, op, shape, a, dtype):
        with pytest.raises(RuntimeError, match="fit in shared memory"):
            launch(h, op, x, params, a, out, path)
        return
    y = launch(h, op, x, params, a, out, path)
    assert y.data_ptr() == out.data_ptr()
    ref = reference(op, x.double(), {k: None if v is None else v.double() for k, v in params.items()}, a)
    torch.cuda.synchronize()
    assert_close_gpu(y, ref, dtype_name)


GN_CASES = [((1, 8, 7, 13), 4), ((2, 64, 33, 31), 32), ((1, 32, 64, 64), 2), ((1, 8, 4, 8, 9), 1), ((3, 12, 4000), 3),
            ((2, 6), 3), ((3, 10, 1), 5), ((2, 320, 9, 9), 32), ((2, 5, 3), 5), ((1, 4, 1000, 1000), 1)]


@pytest.mark.gpu
@pytest.mark.parametrize("path", KERNEL_PATHS)
@pytest.mark.parametrize("activation", ["none", "silu"])
@pytest.mark.parametrize("dtype_name", list(TORCH_DTYPES))
@pytest.mark.parametrize("shape,groups", GN_CASES, ids=[f"{'x'.join(map(str, s))}-g{g}" for s, g in GN_CASES])
def test_group_norm_kernel(harness, shape, groups, dtype_name, activation, path):
    check_case(harness, "group_norm", shape, dtype_name, path, offset=1000.0, spread=3.0, groups=groups, eps=1e-5,
               silu=activation == "silu")


LN_CASES = [((4, 128, 3072), -1), ((1, 4, 128, 512), 1), ((64, 1024), -1), ((3, 5, 7), -1), ((2, 1), -1), ((5, 9), 0),
            ((2, 3, 300007), -1), ((7, 4, 33), -2)]


@pytest.mark.gpu
@pytest.mark.parametrize("path", KERNEL_PATHS)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype_name", list(TORCH_DTYPES))
@pytest.mark.parametrize("shape,axis", LN_CASES, ids=[f"{'x'.join(map(str, s))}-axis{a}" for s, a in LN_CASES])
def test_layer_norm_last_axes_kernel(harness, shape, axis, dtype_name, bias, path):
    check_case(harness, "layer_norm", shape, dtype_name, path, offset=-500.0, spread=2.0, axis=axis, eps=1e-5, bias=bias)


CF_SHAPES = [(2, 96, 56, 56), (1, 1000, 3, 7), (8, 256, 56, 56), (3, 70, 5, 7, 2), (2, 7), (1, 3000, 2, 2), (2, 5, 49),
             (1, 1, 9, 9), (2, 33, 17), (2, 16, 64)]


@pytest.mark.gpu
@pytest.mark.parametrize("path", KERNEL_PATHS)
@pytest.mark.parametrize("dtype_name", list(TORCH_DTYPES))
@pytest.mark.parametrize("shape", CF_SHAPES, ids=["x".join(map(str, s)) for s in CF_SHAPES])
def test_layer_norm_channel_first_kernel(harness, shape, dtype_name, path):
    check_case(harness, "channel_ln", shape, dtype_name, path, offset=1000.0, eps=1e-6, bias=shape[1] != 33)


RMS_CASES = [((4, 128, 3072), -1), ((1, 4, 128, 512), 1), ((3, 5, 7), -1), ((2, 1), -1), ((2, 3, 300007), -1),
             ((9,), 0), ((16, 4096), -1)]


@pytest.mark.gpu
@pytest.mark.parametrize("path", KERNEL_PATHS)
@pytest.mark.parametrize("scale", [True, False])
@pytest.mark.parametrize("dtype_name", list(TORCH_DTYPES))
@pytest.mark.parametrize("shape,axis", RMS_CASES, ids=[f"{'x'.join(map(str, s))}-axis{a}" for s, a in RMS_CASES])
def test_rms_norm_kernel(harness, shape, axis, dtype_name, scale, path):
    check_case(harness, "rms_norm", shape, dtype_name, path, offset=3.0, axis=axis, eps=1e-6, scale=scale)


FRN_SHAPES = [(1, 8, 7, 13), (2, 64, 33, 31), (2, 12), (3, 6, 5, 4, 3), (2, 4, 300, 300), (8, 32, 56, 56)]


@pytest.mark.gpu
@pytest.mark.parametrize("path", KERNEL_PATHS)
@pytest.mark.parametrize("use_tlu", [True, False])
@pytest.mark.parametrize("dtype_name", list(TORCH_DTYPES))
@pytest.mark.parametrize("shape", FRN_SHAPES, ids=["x".join(map(str, s)) for s in FRN_SHAPES])
def test_filter_response_norm_kernel(harness, shape, dtype_name, use_tlu, path):
    check_case(harness, "frn", shape, dtype_name, path, offset=1000.0, eps=-1e-3, use_tlu=use_tlu)


WN_CASES = [((16, 8, 3, 5), d) for d in range(4)] + [((7,), 0), ((5, 1), 0), ((1000, 3), 1), ((3, 70001), 0),
                                                     ((64, 3, 3, 3), 0), ((2, 100000), 1)]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype_name", list(TORCH_DTYPES))
@pytest.mark.parametrize("shape,dim", WN_CASES, ids=[f"{'x'.join(map(str, s))}-dim{d}" for s, d in WN_CASES])
def test_weight_norm_kernel(harness, shape, dim, dtype_name):
    check_case(harness, "weight_norm", shape, dtype_name, dim=dim)


# (op, shape, attributes): odd sizes, so rows start at every offset within a 16-byte pack
MISALIGNED = [("group_norm", (2, 6, 5, 7), dict(groups=3, eps=1e-5, silu=True)),
              ("group_norm", (1, 4, 33, 65), dict(groups=2, eps=1e-5)),
              ("layer_norm", (3, 1001), dict(axis=-1, eps=1e-5)),
              ("layer_norm", (4, 1024), dict(axis=-1, eps=1e-5)),
              ("channel_ln", (2, 24, 37), dict(eps=1e-6)),
              ("channel_ln", (2, 16, 64), dict(eps=1e-6)),
              ("rms_norm", (3, 1001), dict(axis=-1, eps=1e-6)),
              ("frn", (2, 3, 17, 19), dict(eps=1e-6)),
              ("weight_norm", (6, 1001), dict(dim=0))]


@pytest.mark.gpu
@pytest.mark.parametrize("x_off,y_off,p_off", [(1, 0, 0), (0, 1, 0), (1, 1, 1), (3, 5, 2), (0, 0, 1)])
@pytest.mark.parametrize("path", ["on_chip", "two_pass"])
@pytest.mark.parametrize("dtype_name", list(TORCH_DTYPES))
@pytest.mark.parametrize("op,shape,attrs", MISALIGNED, ids=[f"{o}-{'x'.join(map(str, s))}" for o, s, _ in MISALIGNED])
def test_misaligned_views(harness, op, shape, attrs, dtype_name, path, x_off, y_off, p_off):
    """X, Y and the parameters as views starting 1-5 elements into their buffers (not 16-byte aligned)."""
    check_case(harness, op, shape, dtype_name, path, offset=1000.0 if op != "weight_norm" else 0.0,
               x_off=x_off, y_off=y_off, p_off=p_off, **attrs)


def random_case(seed: int):
    """Shapes and attributes drawn like the CPU tests' hypothesis strategies (tests/test_custom_ops.py)."""
    r = np.random.default_rng(seed)
    op = ["group_norm", "layer_norm", "channel_ln", "rms_norm", "frn", "weight_norm"][seed % 6]
    spatial = [int(v) for v in r.integers(1, 10, r.integers(0, 4))]
    common = dict(dtype_name=str(r.choice(list(TORCH_DTYPES))), path=str(r.choice(KERNEL_PATHS)),
                  offset=float(r.choice([0.0, 1000.0])), x_off=int(r.integers(0, 3)), y_off=int(r.integers(0, 3)),
                  p_off=int(r.integers(0, 2)), seed=seed)
    if op == "group_norm":
        groups = int(r.integers(1, 5))
        shape = (int(r.integers(1, 4)), groups * int(r.integers(1, 6)), *spatial)
        a = dict(groups=groups, eps=float(r.choice([1e-8, 1e-5, 0.1, 10.0])), silu=bool(r.integers(0, 2)))
    elif op in ("layer_norm", "rms_norm"):
        shape = tuple(int(v) for v in r.integers(1, 10, r.integers(1, 5)))
        a = dict(axis=int(r.integers(-len(shape), len(shape))), eps=float(r.choice([1e-8, 1e-5, 1.0])),
                 bias=bool(r.integers(0, 2)), scale=bool(r.integers(0, 2)))
    elif op == "channel_ln":
        shape = (int(r.integers(1, 4)), int(r.integers(1, 71)), *[int(v) for v in r.integers(1, 41, r.integers(0, 4))])
        a = dict(eps=float(r.choice([1e-6, 1e-5, 1.0])), bias=bool(r.integers(0, 2)))
    elif op == "frn":
        shape = (int(r.integers(1, 4)), int(r.integers(1, 9)), *spatial)
        a = dict(eps=float(r.choice([1e-6, -1e-3, 1.0])), use_tlu=bool(r.integers(0, 2)))
        common["offset"] = 0.0
    else:
        shape = tuple(int(v) for v in r.integers(1, 8, r.integers(1, 5)))
        a = dict(dim=int(r.integers(0, len(shape))))
        common["offset"] = 0.0
    return op, shape, common, a


@pytest.mark.gpu
@pytest.mark.parametrize("seed", range(120))
def test_random_shapes(harness, seed):
    op, shape, common, a = random_case(seed)
    check_case(harness, op, shape, **common, **a)


@pytest.mark.gpu
def test_launch_is_asynchronous_on_the_callers_stream(harness):
    """The launcher returns while the stream is still busy (no implicit synchronisation, even on the
    > 48 KB shared-memory path) and its kernel runs on that stream, after the work queued before it."""
    gen = torch.Generator().manual_seed(0)
    x_src = on_gpu(torch.randn((2, 64, 64, 64), generator=gen, dtype=torch.float64) + 5, torch.float16)
    g, b = on_gpu(torch.randn(64, generator=gen, dtype=torch.float64), torch.float16), on_gpu(
        torch.randn(64, generator=gen, dtype=torch.float64), torch.float16)
    x = torch.zeros_like(x_src)
    ref = torch.group_norm(x_src.double(), 8, g.double(), b.double(), 1e-5)
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        torch.cuda._sleep(int(3e8))  # ~0.2 s of GPU time on the side stream
        x.copy_(x_src)  # the kernel must see this, i.e. run on `side` after it
        y = harness.group_norm(x, 8, g, b)
        assert not side.query(), "the launcher waited for the stream to drain (implicit synchronisation)"
    side.synchronize()
    assert_close_gpu(y, ref, "fp16")


@pytest.mark.gpu
def test_forcing_on_chip_for_a_slice_too_large_is_an_error(harness):
    x = torch.zeros((1, 1, 4096, 4096), device=DEVICE)
    scale, bias = torch.ones(1, device=DEVICE), torch.zeros(1, device=DEVICE)
    with pytest.raises(RuntimeError, match="does not fit in shared memory"):
        harness.group_norm(x, 1, scale, bias, path="on_chip")
    y = harness.group_norm(x + 1, 1, scale, bias)  # automatic: two-pass
    torch.cuda.synchronize()
    assert torch.count_nonzero(y).item() == 0


@pytest.mark.gpu
@pytest.mark.parametrize("dtype_name", ["fp16", "bf16"])
def test_agrees_with_torch_native_half_kernels(harness, dtype_name):
    """Against PyTorch's own fp16/bf16 CUDA kernels (which also compute in fp32): a few output roundings apart."""
    dtype = TORCH_DTYPES[dtype_name]
    x = torch.randn(2, 64, 31, 17, device=DEVICE).to(dtype)
    g, b = torch.randn(64, device=DEVICE).to(dtype), torch.randn(64, device=DEVICE).to(dtype)
    tol = dict(atol=2e-2, rtol=2e-2) if dtype_name == "fp16" else dict(atol=1e-1, rtol=5e-2)
    torch.testing.assert_close(harness.group_norm(x, 8, g, b), F.group_norm(x, 8, g, b), **tol)
    x2 = x.reshape(-1, 527)
    g2, b2 = torch.randn(527, device=DEVICE).to(dtype), torch.randn(527, device=DEVICE).to(dtype)
    torch.testing.assert_close(harness.layer_norm(x2, g2, b2), F.layer_norm(x2, (527,), g2, b2), **tol)
