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
- op tests on onnxruntime's CUDA provider (need onnxruntime-gpu); those of the fused-add ops also
  check, from onnxruntime's profile, that the node ran on the CUDA provider.
The fused adds (SkipLayerNorm(Sum), SkipRMSNorm(Sum), BiasGroupNorm) run the row kernels with a
residual `skip` (and `sum` output) or a per-channel `add`: the sum output must equal PyTorch's
x + skip in the storage type bit for bit, Y the norm of that rounded sum.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from onnx import TensorProto
from tests.test_custom_ops import (one_node, ref_frn, ref_group_norm, ref_layer_norm, ref_rms_norm, ref_weight_norm)
from tests.test_fused_adds import bias_gn_feeds, bias_gn_model, bias_gn_reference, feeds_for, skip_model
from tests.test_fused_adds import reference as skip_reference

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


@pytest.mark.skipif(NVCC is None, reason="nvcc not found: the CUDA library is not built here")
@pytest.mark.parametrize("op", ["SkipLayerNormSum", "SkipRMSNorm", "BiasGroupNorm"])
def test_cuda_library_runs_the_fused_add_ops_on_the_cpu(op, rng):
    """Registered for both providers, the fused-add ops still run their CPU kernels on the CPU provider."""
    options = ort.SessionOptions()
    options.register_custom_ops_library(cuda_ops_library_path())
    if op == "BiasGroupNorm":
        shape = (2, 8, 5, 3)
        model, feeds = bias_gn_model(shape, 4), bias_gn_feeds(shape, np.float32, rng, offset=10.0)
        want = [bias_gn_reference(feeds, 4)]
    else:
        base, with_sum = op.removesuffix("Sum"), op.endswith("Sum")
        model, feeds = skip_model(base, (3, 40), 40, with_sum=with_sum), feeds_for(base, (3, 40), 40, np.float32, rng)
        y, total = skip_reference(base, feeds)
        want = [y, total] if with_sum else [y]
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    got = session.run(None, feeds)
    assert len(got) == len(want)
    np.testing.assert_allclose(got[0], want[0], atol=1e-5)
    if len(want) == 2:
        np.testing.assert_array_equal(got[1], want[1])


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


def cuda_session(model, tmp_path) -> ort.InferenceSession:
    """`model` on onnxruntime's CUDA provider with the CUDA library, profiled (see `providers_of`)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.enable_profiling = True
    options.profile_file_prefix = str(tmp_path / "profile")
    options.register_custom_ops_library(cuda_ops_library_path())
    return ort.InferenceSession(model.SerializeToString(), options,
                                providers=["CUDAExecutionProvider", "CPUExecutionProvider"])


def providers_of(session: ort.InferenceSession, op: str) -> set[str]:
    """The execution providers the session's profile shows running nodes of `op` (ends the profile)."""
    data = json.loads(Path(session.end_profiling()).read_text())
    events = data["traceEvents"] if isinstance(data, dict) else data
    return {e["args"]["provider"] for e in events
            if e.get("cat") == "Node" and e.get("args", {}).get("op_name") == op and "provider" in e["args"]}


SKIP_SHAPES = [(2, 7, 768), (3, 1001), (1, 2, 200003)]  # the last: rows too long for shared memory (two-pass)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype_name", ["fp32", "fp16"])
@pytest.mark.parametrize("with_sum", [False, True])
@pytest.mark.parametrize("op,bias", [("SkipLayerNorm", True), ("SkipLayerNorm", False), ("SkipRMSNorm", True)])
@pytest.mark.parametrize("shape", SKIP_SHAPES, ids=["x".join(map(str, s)) for s in SKIP_SHAPES])
def test_skip_norm_cuda(shape, op, bias, with_sum, dtype_name, rng, tmp_path):
    dtype, d = DTYPES[dtype_name][0], shape[-1]
    feeds = feeds_for(op, shape, d, dtype, rng, offset=50.0, bias=bias)
    session = cuda_session(skip_model(op, shape, d, dtype, with_sum=with_sum, bias=bias), tmp_path)
    got = session.run(None, feeds)
    assert providers_of(session, op + ("Sum" if with_sum else "")) == {"CUDAExecutionProvider"}
    want, total = skip_reference(op, feeds)
    assert len(got) == (2 if with_sum else 1) and got[0].dtype == dtype
    check(got[0], want, dtype_name)
    if with_sum:
        np.testing.assert_array_equal(got[1], total)  # the Add it replaces, rounded to T


BGN_SHAPES = [((2, 64, 9, 11), 8), ((1, 32, 128, 128), 2), ((3, 6, 5), 3), ((2, 320, 8, 8), 32), ((2, 12), 4)]


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype_name", ["fp32", "fp16"])
@pytest.mark.parametrize("activation", ["none", "silu"])
@pytest.mark.parametrize("shape,groups", BGN_SHAPES, ids=[f"{'x'.join(map(str, s))}-g{g}" for s, g in BGN_SHAPES])
def test_bias_group_norm_cuda(shape, groups, activation, dtype_name, rng, tmp_path):
    dtype = DTYPES[dtype_name][0]
    feeds = bias_gn_feeds(shape, dtype, rng, offset=100.0)
    session = cuda_session(bias_gn_model(shape, groups, dtype, activation=activation), tmp_path)
    y = session.run(None, feeds)[0]
    assert providers_of(session, "BiasGroupNorm") == {"CUDAExecutionProvider"}
    assert y.dtype == dtype
    check(y, bias_gn_reference(feeds, groups, activation), dtype_name)


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


@pytest.fixture(scope="module")
def host_harness(tmp_path_factory):
    """The harness built here (one architecture, for speed) and loaded, for what runs without a GPU."""
    if NVCC is None:
        pytest.skip("nvcc not found: the CUDA harness cannot be built here")
    out = tmp_path_factory.mktemp("harness")
    proc = bench_cuda.build_harness(out, archs="80")
    assert proc.returncode == 0, (proc.stderr + proc.stdout)[-3000:]
    return bench_cuda.Harness(out / "libnormfold_cuda_harness.so").lib


def test_cuda_harness_builds_and_loads(host_harness):
    """The harness target compiles and the library loads; its argument checks and empty launches
    answer without touching a GPU."""
    lib = host_harness
    assert lib.nf_row_norm(*[None] * 8, 2, 4, 1, 1, 1e-5, 1, 0, 7, 0, None) == b"bad dtype or path"
    assert lib.nf_row_norm(*[None] * 8, 2, 4, 1, 1, 1e-5, 1, 3, 0, 0, None) == b"bad activation"
    assert lib.nf_row_norm(*[None] * 8, 2, 4, 3, 1, 1e-5, 1, 0, 0, 0, None) == b"bad spatial or period"
    assert lib.nf_row_norm(*[None] * 8, 0, 4, 1, 1, 1e-5, 1, 0, 0, 0, None) is None  # empty: nothing launched
    assert lib.nf_channel_norm(*[None] * 4, 0, 3, 5, 1e-5, 1, 2, None) is None


def test_fast_div_is_integer_division(host_harness):
    """The kernels' element -> channel map (FastDiv, run on the host through the harness) is k // d for
    every divisor shape (1, powers of two and their neighbours, primes, the largest) and k up to 2^31 - 1."""
    r = np.random.default_rng(0)
    big = (1 << 31) - 1
    divisors = {1, 2, 3, 5, 7, 9, 49, 1000, 3136, 4096, 65537, 300007, big - 1, big,
                *(int(v) for v in r.integers(1, big, 200))}
    divisors |= {(1 << e) + o for e in range(1, 31) for o in (-1, 0, 1)}
    for d in sorted(divisors):
        ks = {0, 1, d - 1, d, d + 1, big - 1, big, big // d * d, big // d * d - 1,
              *(int(v) for v in r.integers(0, big, 50))}
        for k in ks:
            if 0 <= k <= big:
                assert host_harness.nf_fast_div(k, d) == k // d, (k, d)


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


SKIP_OPS = {"skip_layer_norm": "layer_norm", "skip_rms_norm": "rms_norm"}  # fused op -> the norm of x + skip


def reference(op: str, x, p: dict, a: dict):
    """The PyTorch layer in float64 on the GPU (channel-first LN and FRN written out by hand). For the Skip
    ops x is already the sum x + skip (rounded to the storage type)."""
    view = (1, -1) + (1,) * (x.dim() - 2)
    if op in SKIP_OPS:
        return reference(SKIP_OPS[op], x, p, a)
    if op == "bias_group_norm":
        return reference("group_norm", x + p["add"].view(x.shape[:2] + (1,) * (x.dim() - 2)), p, a)
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


def launch(h, op: str, x, p: dict, a: dict, out, path: str, sum_out=None):
    if op in ("group_norm", "bias_group_norm"):
        return h.group_norm(x, a["groups"], p["scale"], p["bias"], a["eps"], a.get("silu", False), out=out, path=path,
                            add=p.get("add"))
    if op == "skip_layer_norm":
        return h.layer_norm(x, p["scale"], p["bias"], a["axis"], a["eps"], out=out, path=path,
                            skip=p["skip"].view(x.shape), sum_out=sum_out)
    if op == "skip_rms_norm":
        return h.rms_norm(x, p["scale"], a["axis"], a["eps"], out=out, path=path, skip=p["skip"].view(x.shape),
                          sum_out=sum_out)
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
    if op == "bias_group_norm":
        return dict(add=shape[0] * c, scale=c, bias=c)
    if op in SKIP_OPS:
        return dict(skip=int(np.prod(shape)), **param_shapes(SKIP_OPS[op], shape, a))
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
    if op in ("group_norm", "bias_group_norm"):
        return h.row_path(shape[1] // a["groups"] * spatial, dtype) == "on_chip"
    if op in ("layer_norm", "rms_norm", *SKIP_OPS):
        return h.row_path(int(np.prod(shape[a["axis"] % len(shape):])), dtype) == "on_chip"
    if op == "channel_ln":
        return h.channel_path(shape[1], spatial, dtype) == "on_chip"
    if op == "frn":
        return h.row_path(spatial, dtype) == "on_chip"
    return True


def check_case(h, op: str, shape, dtype_name: str, path: str = "auto", *, offset: float = 0.0, spread: float = 1.0,
               x_off: int = 0, y_off: int = 0, p_off: int = 0, seed: int = 0, **a) -> None:
    """Runs `op` on random data (spread * N(0, 1) + offset) through the harness and compares with PyTorch.
    The fused adds: `skip` and `add` are drawn like the parameters (p_off applies to them); `with_sum`
    (Skip ops) also writes the sum, at y_off like Y, which must be PyTorch's x + skip in the storage type."""
    dtype = TORCH_DTYPES[dtype_name]
    gen = torch.Generator().manual_seed(seed)
    x64 = torch.randn(shape, generator=gen, dtype=torch.float64) * spread + offset
    x = on_gpu(x64, dtype, x_off)
    params = {k: None if n is None else on_gpu(torch.randn(n, generator=gen, dtype=torch.float64), dtype, p_off)
              for k, n in param_shapes(op, shape, a).items()}

    def nan_output():
        return torch.full(shape, float("nan"), dtype=dtype, device=DEVICE) if y_off == 0 else on_gpu(
            torch.full(shape, float("nan"), dtype=torch.float64), dtype, y_off)

    out, sum_out = nan_output(), nan_output() if a.get("with_sum") else None
    if path == "on_chip" and op != "weight_norm" and not fits_on_chip(h, op, shape, a, dtype):
        with pytest.raises(RuntimeError, match="fit in shared memory"):
            launch(h, op, x, params, a, out, path, sum_out)
        return
    y = launch(h, op, x, params, a, out, path, sum_out)
    assert y.data_ptr() == out.data_ptr()
    normalized = (x.float() + params["skip"].view(shape).float()).to(dtype) if op in SKIP_OPS else x  # the Add, in T
    ref = reference(op, normalized.double(), {k: None if v is None else v.double() for k, v in params.items()}, a)
    torch.cuda.synchronize()
    assert_close_gpu(y, ref, dtype_name)
    if sum_out is not None:
        assert torch.equal(sum_out, normalized), f"sum output differs in {int((sum_out != normalized).sum())} elements"


GN_CASES = [((1, 8, 7, 13), 4), ((2, 64, 33, 31), 32), ((1, 32, 64, 64), 2), ((1, 8, 4, 8, 9), 1), ((3, 12, 4000), 3),
            ((2, 6), 3), ((3, 10, 1), 5), ((2, 320, 9, 9), 32), ((2, 5, 3), 5), ((1, 4, 1000, 1000), 1)]


@pytest.mark.gpu
@pytest.mark.parametrize("path", KERNEL_PATHS)
@pytest.mark.parametrize("activation", ["none", "silu"])
@pytest.mark.parametrize("dtype_name", list(TORCH_DTYPES))
@pytest.mark.parametrize("shape,groups", GN_CASES, ids=[f"{'x'.join(map(str, s))}-g{g}" for s, g in GN_CASES])
@pytest.mark.parametrize("op", ["group_norm", "bias_group_norm"])
def test_group_norm_kernel(harness, op, shape, groups, dtype_name, activation, path):
    """GroupNorm and BiasGroupNorm, GroupNorm(x + add[n, c]): one channel per group, no spatial axes, groups
    too large for shared memory."""
    check_case(harness, op, shape, dtype_name, path, offset=1000.0, spread=3.0, groups=groups, eps=1e-5,
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


SKIP_CASES = [((4, 128, 768), -1), ((3, 5, 7), -1), ((2, 1), -1), ((7, 4, 33), -2), ((64, 1024), -1),
              ((2, 3, 300007), -1), ((1, 4, 128, 512), 1)]  # the last two: rows too long for shared memory
SKIP_VARIANTS = [("skip_layer_norm", True), ("skip_layer_norm", False), ("skip_rms_norm", True)]  # (op, bias)


@pytest.mark.gpu
@pytest.mark.parametrize("path", KERNEL_PATHS)
@pytest.mark.parametrize("with_sum", [False, True])
@pytest.mark.parametrize("op,bias", SKIP_VARIANTS, ids=[f"{o}-{'bias' if b else 'nobias'}" for o, b in SKIP_VARIANTS])
@pytest.mark.parametrize("dtype_name", list(TORCH_DTYPES))
@pytest.mark.parametrize("shape,axis", SKIP_CASES, ids=[f"{'x'.join(map(str, s))}-axis{a}" for s, a in SKIP_CASES])
def test_skip_norm_kernel(harness, shape, axis, dtype_name, op, bias, with_sum, path):
    """SkipLayerNorm / SkipRMSNorm (with or without the sum output): x = 2 N(0, 1) - 300 (RMSNorm: + 3)
    plus a unit skip."""
    check_case(harness, op, shape, dtype_name, path, offset=-300.0 if op == "skip_layer_norm" else 3.0, spread=2.0,
               axis=axis, eps=1e-5, bias=bias, with_sum=with_sum)


@pytest.mark.gpu
@pytest.mark.parametrize("path", KERNEL_PATHS)
@pytest.mark.parametrize("dtype_name", list(TORCH_DTYPES))
def test_bias_group_norm_kernel_with_adds_far_from_zero(harness, dtype_name, path):
    """Adds of 500 ± 1 on data of 1000 ± 1: the deviations (x - x0) + (add_c - add_0) keep full accuracy."""
    shape, dtype = (2, 16, 9, 7), TORCH_DTYPES[dtype_name]
    gen = torch.Generator().manual_seed(3)
    x = on_gpu(torch.randn(shape, generator=gen, dtype=torch.float64) + 1000, dtype)
    add = on_gpu(torch.randn(shape[:2], generator=gen, dtype=torch.float64) + 500, dtype)
    scale, bias = (on_gpu(torch.randn(16, generator=gen, dtype=torch.float64), dtype) for _ in range(2))
    y = harness.group_norm(x, 4, scale, bias, add=add, path=path)
    ref = torch.group_norm(x.double() + add.double()[:, :, None, None], 4, scale.double(), bias.double(), 1e-5)
    torch.cuda.synchronize()
    assert_close_gpu(y, ref, dtype_name)


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
              ("weight_norm", (6, 1001), dict(dim=0)),
              ("skip_layer_norm", (3, 1001), dict(axis=-1, eps=1e-5, with_sum=True)),
              ("skip_rms_norm", (5, 517), dict(axis=-1, eps=1e-6, with_sum=True)),
              ("bias_group_norm", (2, 6, 5, 7), dict(groups=3, eps=1e-5, silu=True))]


@pytest.mark.gpu
@pytest.mark.parametrize("x_off,y_off,p_off", [(1, 0, 0), (0, 1, 0), (1, 1, 1), (3, 5, 2), (0, 0, 1)])
@pytest.mark.parametrize("path", ["on_chip", "two_pass"])
@pytest.mark.parametrize("dtype_name", list(TORCH_DTYPES))
@pytest.mark.parametrize("op,shape,attrs", MISALIGNED, ids=[f"{o}-{'x'.join(map(str, s))}" for o, s, _ in MISALIGNED])
def test_misaligned_views(harness, op, shape, attrs, dtype_name, path, x_off, y_off, p_off):
    """X, Y and the parameters as views starting 1-5 elements into their buffers (not 16-byte aligned);
    skip and add like the parameters, the sum output like Y."""
    check_case(harness, op, shape, dtype_name, path, offset=1000.0 if op != "weight_norm" else 0.0,
               x_off=x_off, y_off=y_off, p_off=p_off, **attrs)


def random_case(seed: int):
    """Shapes and attributes drawn like the CPU tests' hypothesis strategies (tests/test_custom_ops.py)."""
    r = np.random.default_rng(seed)
    op = ["group_norm", "layer_norm", "channel_ln", "rms_norm", "frn", "weight_norm", "skip_layer_norm",
          "skip_rms_norm", "bias_group_norm"][seed % 9]
    spatial = [int(v) for v in r.integers(1, 10, r.integers(0, 4))]
    common = dict(dtype_name=str(r.choice(list(TORCH_DTYPES))), path=str(r.choice(KERNEL_PATHS)),
                  offset=float(r.choice([0.0, 1000.0])), x_off=int(r.integers(0, 3)), y_off=int(r.integers(0, 3)),
                  p_off=int(r.integers(0, 2)), seed=seed)
    if op in ("group_norm", "bias_group_norm"):
        groups = int(r.integers(1, 5))
        shape = (int(r.integers(1, 4)), groups * int(r.integers(1, 6)), *spatial)
        a = dict(groups=groups, eps=float(r.choice([1e-8, 1e-5, 0.1, 10.0])), silu=bool(r.integers(0, 2)))
    elif op in ("layer_norm", "rms_norm", *SKIP_OPS):
        shape = tuple(int(v) for v in r.integers(1, 10, r.integers(1, 5)))
        a = dict(axis=int(r.integers(-len(shape), len(shape))), eps=float(r.choice([1e-8, 1e-5, 1.0])),
                 bias=bool(r.integers(0, 2)), scale=bool(r.integers(0, 2)))
        if op in SKIP_OPS:
            a["with_sum"] = bool(r.integers(0, 2))
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
@pytest.mark.parametrize("seed", range(180))
def test_random_shapes(harness, seed):
    op, shape, common, a = random_case(seed)
    check_case(harness, op, shape, **common, **a)


@pytest.mark.gpu
@pytest.mark.parametrize("path", ["on_chip", "two_pass"])
def test_fused_silu_error_bound(harness, path):
    """The fused SiLU, y / (1 + __expf(-y)), isolated: GroupNorm over one group of C channels with scale 0 gives
    y = beta_c exactly, then SiLU. __expf is within 2 + floor(|1.173 y|) ulp (CUDA Programming Guide, intrinsic
    functions), so SiLU is within (3 + 1.173 |y|) 2^-23 relative; asserted with (4 + 1.25 |y|) 2^-23."""
    v = torch.cat([torch.linspace(-80, 80, 8001, dtype=torch.float64),
                   torch.linspace(-10, 10, 10001, dtype=torch.float64)])
    v = v.float().double()  # the float32 values the kernel sees; 72 KB, on chip on every GPU of sm_80 and later
    c = v.numel()
    x = torch.randn(1, c, 1, device=DEVICE)
    y = harness.group_norm(x, 1, torch.zeros(c, device=DEVICE), v.float().to(DEVICE), silu=True, path=path)
    torch.cuda.synchronize()
    want = v / (1 + torch.exp(-v))
    rel = ((y.double().cpu().flatten() - want).abs() / want.abs().clamp_min(1e-300))
    bound = (4 + 1.25 * v.abs()) * 2.0 ** -23
    worst = int((rel - bound).argmax())
    assert bool((rel <= bound).all()), (f"SiLU({v[worst].item()}): relative error {rel[worst].item():.3g} > "
                                        f"{bound[worst].item():.3g}")


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
