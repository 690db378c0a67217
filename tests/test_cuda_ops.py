"""The CUDA build of the com.normfold ops.

Without a GPU only the build is checked (compiled wherever nvcc exists, for the
deployment architectures, and loadable: its CPU kernels run). The GPU tests run
every op on onnxruntime's CUDA provider against PyTorch and skip cleanly when
there is no GPU or no usable CUDA provider.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto
from test_custom_ops import (one_node, ref_frn, ref_group_norm, ref_layer_norm, ref_rms_norm, ref_weight_norm)

from normfold.doctor import doctor
from normfold.ops_library import cuda_ops_library_path
from normfold.runtime import make_session

NVCC = shutil.which("nvcc") or (Path("/usr/local/cuda/bin/nvcc") if Path("/usr/local/cuda/bin/nvcc").exists() else None)


@pytest.mark.skipif(NVCC is None, reason="nvcc not found: the CUDA library is not built here")
def test_cuda_library_compiled_for_deployment_architectures():
    path = cuda_ops_library_path()
    assert path is not None, "nvcc exists but libnormfold_ops_cuda.so was not built; see normfold/_ops/CUDA_BUILD_FAILED.txt"
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
