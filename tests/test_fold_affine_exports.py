"""PyTorch models with in-model preprocessing and layer scale, exported with
both exporters (TorchScript opset 17, dynamo opset 18, the exporters'
constant folding off): `normfold.fold_affine` (and `optimize`) removes the
affine ops, and the result matches PyTorch in onnxruntime with graph
optimizations off and on."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from onnx import numpy_helper
from torch import nn

import normfold
from normfold.passes.registry import GRAPH_PASSES
from tests.helpers.graphs import all_nodes, count_op
from tests.helpers.norm_models import export
from tests.helpers.zoo_models import ConvNeXtBlock

EXPORTS = [("torchscript", 17), ("dynamo", 18)]
STEP_OPS = ("Mul", "Div", "Add", "Sub")


class Standardized(nn.Module):
    """Detection-style preprocessing inside the model: z-score `(x - mean) / std`
    or min-max scaling to [-1, 1], then the first conv."""

    def __init__(self, padding: int, scaling: str):
        super().__init__()
        self.scaling = scaling
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1))
        self.register_buffer("lo", torch.tensor([0.0, 0.1, -0.2]).view(1, 3, 1, 1))
        self.register_buffer("hi", torch.tensor([1.0, 0.9, 1.2]).view(1, 3, 1, 1))
        self.conv = nn.Conv2d(3, 8, 3, padding=padding)

    def forward(self, x):
        if self.scaling == "zscore":
            x = (x - self.mean) / self.std
        else:
            x = (x - self.lo) / (self.hi - self.lo) * 2 - 1
        return F.relu(self.conv(x))


class LayerScaleMLP(nn.Module):
    """CaiT / DINOv2 LayerScale on tokens: x + gamma * fc2(act(fc1(x)))."""

    def __init__(self, d: int = 16, act=F.gelu):
        super().__init__()
        self.act = act
        self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)
        self.gamma = nn.Parameter(torch.empty(d).uniform_(0.1, 1.0))

    def forward(self, x):
        return x + self.gamma * self.fc2(self.act(self.fc1(x)))


def exported(module: nn.Module, shape, exporter: str, opset: int, name: str):
    """(model, feeds, PyTorch output); `name` tells the export cache apart modules
    whose weights are equal but whose forward differs."""
    torch.manual_seed(0)
    module = module.eval()
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    model = export(module, (x,), exporter=exporter, opset=opset, constant_folding=False, name=name)
    with torch.no_grad():
        want = module(x).numpy()
    return model, {model.graph.input[0].name: x.numpy()}, want


def assert_matches_pytorch(model: onnx.ModelProto, feeds, want, atol=1e-5):
    for level in (ort.GraphOptimizationLevel.ORT_DISABLE_ALL, ort.GraphOptimizationLevel.ORT_ENABLE_ALL):
        options = ort.SessionOptions()
        options.graph_optimization_level = level
        session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        got = session.run(None, feeds)[0]
        assert np.abs(got - want).max() <= atol * max(1.0, np.abs(want).max()), level


def ort_optimized_ops(model: onnx.ModelProto) -> list[str]:
    """The op types of `model` after onnxruntime's extended graph optimizations
    (those that fuse GELU), with normfold's library registered."""
    import tempfile

    from normfold.ops.library import ops_library_path

    with tempfile.TemporaryDirectory() as folder:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        options.optimized_model_filepath = f"{folder}/optimized.onnx"
        options.register_custom_ops_library(ops_library_path())
        ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        return [n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node]


def constants_read(model: onnx.ModelProto) -> list[np.ndarray]:
    """Every constant tensor a node of `model` reads (initializers and Constant nodes)."""
    values = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    for node in all_nodes(model.graph):
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            values[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    return [values[name] for node in all_nodes(model.graph) for name in node.input if name in values]


def reads_gamma(model: onnx.ModelProto, gamma: torch.Tensor) -> bool:
    g = gamma.detach().numpy().reshape(-1)
    return any(c.size == g.size and np.allclose(c.reshape(-1), g) for c in constants_read(model))


@pytest.mark.parametrize("exporter, opset", EXPORTS, ids=[e for e, _ in EXPORTS])
@pytest.mark.parametrize("scaling", ["zscore", "minmax"])
@pytest.mark.parametrize("padding", [0, 1])
def test_input_standardisation_folds_into_the_first_conv(exporter, opset, scaling, padding):
    model, feeds, want = exported(Standardized(padding, scaling), (2, 3, 8, 8), exporter, opset,
                                   f"standardized-{scaling}-pad{padding}")
    assert count_op(model, "Div") >= 1 and count_op(model, "Sub") >= 1
    folded, report = normfold.fold_affine(model)
    ops = [n.op_type for n in folded.graph.node]
    assert ops == (["Conv", "Relu"] if padding == 0 else ["Add", "Conv", "Relu"]), (ops, report.skipped)
    assert {c.how for c in report.changes} == {"forward" if padding == 0 else "partial"}
    assert_matches_pytorch(folded, feeds, want)


@pytest.mark.parametrize("exporter, opset", EXPORTS, ids=[e for e, _ in EXPORTS])
@pytest.mark.parametrize("conv_mlp", [False, True], ids=["linear", "conv_mlp"])
def test_convnext_layer_scale_folds_into_the_last_layer(exporter, opset, conv_mlp):
    block = ConvNeXtBlock(8, conv_mlp=conv_mlp)
    model, feeds, want = exported(block, (2, 8, 6, 6), exporter, opset, f"convnext-block-{conv_mlp}")
    assert reads_gamma(model, block.gamma)
    folded, report = normfold.fold_affine(model)
    assert not reads_gamma(folded, block.gamma), report.skipped
    assert count_op(folded, "Mul") < count_op(model, "Mul")
    assert "backward" in {c.how for c in report.changes}
    assert_matches_pytorch(folded, feeds, want)
    optimized, _ = normfold.optimize(model)
    assert not reads_gamma(optimized, block.gamma)
    without = normfold.optimize(model, passes=tuple(p for p in GRAPH_PASSES if p != "fold-affine"))[0]
    assert ort_optimized_ops(optimized).count("Erf") == ort_optimized_ops(without).count("Erf"), \
        "onnxruntime fuses fewer GELUs after fold-affine"
    from normfold.verify.run import verify

    result = verify(optimized, block, inputs=feeds, atol=1e-5, rtol=1e-4)
    assert result.passed, result.verdict()


@pytest.mark.parametrize("exporter, opset", EXPORTS, ids=[e for e, _ in EXPORTS])
def test_token_layer_scale_folds_into_the_linear(exporter, opset):
    mlp = LayerScaleMLP()
    model, feeds, want = exported(mlp, (2, 5, 16), exporter, opset, "layer-scale-mlp")
    folded, report = normfold.fold_affine(model)
    assert not reads_gamma(folded, mlp.gamma), report.skipped
    assert_matches_pytorch(folded, feeds, want)
    left = sum(count_op(folded, op) for op in STEP_OPS)
    assert left < sum(count_op(model, op) for op in STEP_OPS)


@pytest.mark.parametrize("name", ["convnext_t", "convnext_t_convmlp"])
def test_zoo_convnext_layer_scales_are_folded(name):
    """The model zoo's ConvNeXt-T (tiny widths): after `optimize`, no block's
    layer scale is read by any node, and the model still matches PyTorch."""
    from normfold.testing import assert_equivalent
    from tests.helpers.zoo_models import build

    module, args = build(name, tiny=True)
    model = export(module, args, exporter="torchscript", opset=17, constant_folding=False, name=f"zoo-tiny-{name}")
    blocks = [m for m in module.modules() if isinstance(m, ConvNeXtBlock)]
    assert blocks and all(reads_gamma(model, b.gamma) for b in blocks)
    optimized, reports = normfold.optimize(model)
    assert not any(reads_gamma(optimized, b.gamma) for b in blocks)
    [affine] = [r for r in reports if r.name == "fold-affine"]
    assert affine.counts().get("MatMul (backward)" if name == "convnext_t" else "Conv (backward)", 0) >= len(blocks)
    assert_equivalent(optimized, module, inputs={model.graph.input[0].name: args[0].numpy()})


def onnxruntime_op_counts(model: onnx.ModelProto, tmp_path) -> dict[str, int]:
    """Op counts of the graph onnxruntime runs at ORT_ENABLE_ALL (its saved optimized graph), without normfold's library."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.optimized_model_filepath = str(tmp_path / "ort.onnx")
    options.log_severity_level = 3
    ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    counts: dict[str, int] = {}
    for node in onnx.load(tmp_path / "ort.onnx").graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


@pytest.mark.parametrize("arch, config, kind, fused_by_onnxruntime", [
    ("llama", "ts17", "rms", "SimplifiedLayerNormalization"),  # transformers' LlamaRMSNorm: γ · (x · rsqrt(mean(x²) + ε))
    ("bert", "ts13", "ln", "LayerNormalization"),  # opset 13 has no LayerNormalization: decomposed
])
def test_a_norm_kind_left_out_keeps_its_gamma_so_onnxruntime_still_fuses_it(arch, config, kind, fused_by_onnxruntime,
                                                                           tmp_path):
    """Every pass but the fusion of `kind` (what the speed check builds to revert it): fold-affine leaves the γ/β of
    the decomposed norms where they are, so onnxruntime fuses as many of them as in the input model (folding γ into
    the next MatMul stopped its fusion: the reverted model was slower than the input), and the result still matches."""
    from normfold.passes.registry import FUSE_FAMILIES, steps
    from normfold.pipeline.runner import run_passes
    from tests.helpers.zoo import ARCHITECTURES, CONFIGS
    from tests.helpers.zoo.checks import _feeds

    config = CONFIGS[config]
    module, args = ARCHITECTURES[arch].build()
    model = export(module, args, exporter=config.exporter, opset=config.opset,
                   constant_folding=config.constant_folding, name=f"zoo-{arch}")
    left_out = tuple(k for k in FUSE_FAMILIES if k != kind)
    run = run_passes(model, steps(GRAPH_PASSES, ops=left_out))
    [affine] = [r for r in run.reports if r.name == "fold-affine"]
    assert any("normalization left decomposed" in s.reason for s in affine.skipped)

    def fused(m):
        counts = onnxruntime_op_counts(m, tmp_path)
        return sum(n for op, n in counts.items() if op.endswith(fused_by_onnxruntime))

    assert fused(model) > 0
    assert fused(run.model) == fused(model)
    feeds = _feeds(model, args)
    want = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)
    got = ort.InferenceSession(run.model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5, atol=1e-5)
