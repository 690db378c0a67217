"""Regression tests for the failure classes of issue 14, each on a small PyTorch module
that reproduces it, exported the four ways (tests.helpers.zoo.CONFIGS) and checked as the
zoo checks a case: nothing foldable or decomposed left, ≤ 1e-5 from PyTorch, runs at
ORT_ENABLE_ALL with and without normfold's library.

    1 shape knowledge           norms after Reshapes whose targets are computed at run time
    2 library spellings         casts around the math, rsqrt, x.square(), (1 + w), T5's
                                variance without mean, Expand(x.shape), timm's FRN + TLU
    3 weight standardisation    timm's StdConv2d / ScaledStdConv2d: F.batch_norm over the weight
"""

from __future__ import annotations

import onnx
import pytest
import torch
from torch import nn
from torch.nn import functional as F

import normfold
from tests.helpers.norm_models import export
from tests.helpers.zoo import CONFIGS, Architecture, run_case
from tests.helpers.zoo.checks import FP16_FACTOR, FP16_SLACK, relative_error, run_onnx
from tests.helpers.zoo.registry import image, randomize, seeded

HIDDEN = 16


def _sequence() -> tuple[torch.Tensor]:
    return (torch.randn(2, 6, HIDDEN, generator=seeded()),)


class LlamaRMSNorm(nn.Module):
    """transformers' LlamaRMSNorm: the math in float32, the result cast back."""

    def __init__(self, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.rand(HIDDEN) + 0.5)
        self.eps = eps

    def forward(self, x):
        dtype = x.dtype
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)


class T5LayerNorm(nn.Module):
    """transformers' T5LayerNorm: variance of x.float() without the mean, applied to x."""

    def __init__(self, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.rand(HIDDEN) + 0.5)
        self.eps = eps

    def forward(self, x):
        variance = x.to(torch.float32).pow(2).mean(-1, keepdim=True)
        return self.weight * (x * torch.rsqrt(variance + self.eps))


class GemmaRMSNorm(nn.Module):
    """transformers' GemmaRMSNorm: x.square(), a (1 + w) scale."""

    def __init__(self, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(0.3 * torch.randn(HIDDEN))
        self.eps = eps

    def forward(self, x):
        h = x.float()
        h = h * torch.rsqrt(h.square().mean(-1, keepdim=True) + self.eps)
        return (h * (1.0 + self.weight.float())).type_as(x)


class ExpandedLayerNorm(nn.Module):
    """A LayerNorm whose γ is broadcast with expand(x.shape) first."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.rand(HIDDEN) + 0.5)

    def forward(self, x):
        d = x - x.mean(-1, keepdim=True)
        h = d / torch.sqrt(d.pow(2).mean(-1, keepdim=True) + 1e-5)
        return h * self.weight.expand(x.shape)


class FilterResponseNormTlu2d(nn.Module):
    """timm's FilterResponseNormTlu2d (timm/layers/filter_response_norm.py)."""

    def __init__(self, c=8, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.rand(c) + 0.5)
        self.bias = nn.Parameter(0.5 * torch.randn(c))
        self.tau = nn.Parameter(0.5 * torch.randn(c))
        self.eps = eps

    def forward(self, x):
        x_dtype = x.dtype
        v_shape = (1, -1, 1, 1)
        x = x * torch.rsqrt(x.float().pow(2).mean(dim=(2, 3), keepdim=True) + self.eps).to(x_dtype)
        x = x * self.weight.reshape(v_shape).to(dtype=x_dtype) + self.bias.reshape(v_shape).to(dtype=x_dtype)
        return torch.maximum(x, self.tau.reshape(v_shape).to(dtype=x_dtype))


class StdConv2d(nn.Conv2d):
    """timm's StdConv2d: the weight standardised with F.batch_norm(training=True)."""

    def __init__(self, cin, cout, eps=1e-6):
        super().__init__(cin, cout, 3, padding=1, bias=False)
        self.eps = eps

    def forward(self, x):
        w = F.batch_norm(self.weight.reshape(1, self.out_channels, -1), None, None, training=True, momentum=0.0,
                         eps=self.eps).reshape_as(self.weight)
        return F.conv2d(x, w, self.bias, self.stride, self.padding)


class ScaledStdConv2d(nn.Conv2d):
    """timm's ScaledStdConv2d (NFNets): standardised, then a per-channel gain and fan-in scale."""

    def __init__(self, cin, cout, eps=1e-6):
        super().__init__(cin, cout, 3, padding=1)
        self.gain = nn.Parameter(torch.rand(cout, 1, 1, 1) + 0.5)
        self.scale = (cin * 9) ** -0.5
        self.eps = eps

    def forward(self, x):
        w = F.batch_norm(self.weight.reshape(1, self.out_channels, -1), None, None,
                         weight=(self.gain * self.scale).view(-1), training=True, momentum=0.0,
                         eps=self.eps).reshape_as(self.weight)
        return F.conv2d(x, w, self.bias, self.stride, self.padding)


class HeadsThenNorm(nn.Module):
    """Attention-style head reshapes with targets computed from x.shape, then a norm:
    TorchScript opset-13 exports compute the Reshape targets with Shape/Gather/Concat."""

    def __init__(self, norm: nn.Module, heads=4):
        super().__init__()
        self.proj, self.norm, self.heads = nn.Linear(HIDDEN, HIDDEN), norm, heads

    def forward(self, x):
        b, s, _ = x.shape
        h = self.proj(x).view(b, s, self.heads, -1).transpose(1, 2)
        h = h.transpose(1, 2).reshape(b, s, -1)
        return self.norm(h)


class ConvThenGroupNorm(nn.Module):
    """GroupNorm of a tensor whose shape comes through a computed Reshape."""

    def __init__(self):
        super().__init__()
        self.conv, self.norm = nn.Conv2d(3, 8, 3, padding=1), nn.GroupNorm(4, 8)

    def forward(self, x):
        h = self.conv(x)
        return self.norm(h.reshape(h.shape[0], h.shape[1], -1).reshape(h.shape))


class ChannelLastLayerNorm(nn.Module):
    """ConvNeXt's block norm: a conv, then nn.LayerNorm over channels between permutes."""

    def __init__(self):
        super().__init__()
        self.conv, self.norm = nn.Conv2d(3, 8, 3, padding=1), nn.LayerNorm(8)

    def forward(self, x):
        return self.norm(self.conv(x).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def _arch(name, norms, module, args, fp16=False) -> Architecture:
    def build():
        torch.manual_seed(0)
        return randomize(module()), args()
    return Architecture(name, "tests", norms, build, fp16=fp16)


SHAPES = [
    _arch("heads_then_layernorm", ("ln",), lambda: HeadsThenNorm(nn.LayerNorm(HIDDEN)), _sequence),
    _arch("heads_then_rmsnorm", ("rms",), lambda: HeadsThenNorm(LlamaRMSNorm()), _sequence),
    _arch("computed_reshape_groupnorm", ("gn",), ConvThenGroupNorm, lambda: (image(),)),
]
SPELLINGS = [
    _arch("llama_rmsnorm", ("rms",), LlamaRMSNorm, _sequence),
    _arch("t5_layernorm", ("rms",), T5LayerNorm, _sequence),
    _arch("gemma_rmsnorm", ("rms",), GemmaRMSNorm, _sequence),
    _arch("expanded_layernorm", ("ln",), ExpandedLayerNorm, _sequence),
    _arch("timm_frn_tlu", ("frn",), FilterResponseNormTlu2d, lambda: (image(c=8),)),
]
STANDARDISED = [
    _arch("timm_stdconv2d", ("ws",), lambda: nn.Sequential(StdConv2d(3, 8), nn.ReLU(), StdConv2d(8, 8)), lambda: (image(),)),
    _arch("timm_scaledstdconv2d", ("ws",), lambda: nn.Sequential(ScaledStdConv2d(3, 8), nn.SiLU()), lambda: (image(),)),
]


def _cases(archs):
    return [pytest.param(a, c, id=f"{a.name}-{c}") for a in archs for c in CONFIGS]


def _check(arch, config) -> None:
    result = run_case(arch, CONFIGS[config])
    assert result.stage == "checked", result.problems
    assert result.problems == [], f"{result.problems}; fuse skipped: {result.skip_reasons}"
    if "ws" not in arch.norms:
        assert sum(result.fused.values()) >= 1, result.fused


@pytest.mark.parametrize("arch, config", _cases(SHAPES))
def test_norm_after_computed_reshape_is_fused(arch, config):
    _check(arch, config)


def test_opset13_export_hides_the_rank_from_onnx_shape_inference():
    """The premise of the shape-knowledge class: plain onnx inference does not know it."""
    module, args = SHAPES[1].build()
    model = export(module, args, exporter="torchscript", opset=13, constant_folding=False, name="heads_then_rmsnorm")
    inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
    shapes = {vi.name: vi.type.tensor_type.HasField("shape") for vi in inferred.graph.value_info}
    pow_input = next(n.input[0] for n in model.graph.node if n.op_type == "Pow")
    assert not shapes.get(pow_input, False)


@pytest.mark.parametrize("arch, config", _cases(SPELLINGS))
def test_library_spelling_of_a_norm_is_fused(arch, config):
    _check(arch, config)


@pytest.mark.parametrize("arch, config", _cases(STANDARDISED))
def test_weight_standardisation_through_batch_norm_is_computed_offline(arch, config):
    _check(arch, config)


def test_fp16_rmsnorm_with_casts_is_fused_within_the_exports_own_error():
    arch = _arch("llama_rmsnorm_fp16", ("rms",), lambda: LlamaRMSNorm().half(),
                 lambda: (_sequence()[0].half(),), fp16=True)
    _check(arch, "dy18")


FP16_LAYER_NORMS = [
    _arch("layernorm_fp16", ("ln",), lambda: nn.Sequential(nn.Linear(HIDDEN, HIDDEN), nn.LayerNorm(HIDDEN)).half(),
          lambda: (_sequence()[0].half(),), fp16=True),
    _arch("channel_last_layernorm_fp16", ("ln_cf",), lambda: ChannelLastLayerNorm().half(),
          lambda: (image().half(),), fp16=True),
]


@pytest.mark.parametrize("arch", FP16_LAYER_NORMS, ids=lambda a: a.name)
def test_fp16_layernorm_centred_in_fp16_and_normalized_in_double_is_one_layernorm(arch):
    """TorchScript opset 13 spells an fp16 LayerNorm as x - mean in fp16, Cast to double,
    the variance and division there, Cast back: one LayerNorm of the fp16 x."""
    module, args = arch.build()
    model = export(module, args, exporter="torchscript", opset=13, constant_folding=False, name=arch.name)
    made_by = {out: n for n in model.graph.node for out in n.output}
    up_casts = [n for n in model.graph.node if n.op_type == "Cast" and made_by[n.input[0]].op_type == "Sub"]
    assert up_casts and all(onnx.helper.get_attribute_value(n.attribute[0]) == onnx.TensorProto.DOUBLE
                            for n in up_casts), "the premise: the export centres in fp16, then casts to double"

    optimized, _ = normfold.optimize(model)
    ops = [n.op_type for n in optimized.graph.node]
    assert "ReduceMean" not in ops and ops.count("LayerNorm") == 1, ops
    fused = next(n for n in optimized.graph.node if n.op_type == "LayerNorm")
    assert {a.name: onnx.helper.get_attribute_value(a) for a in fused.attribute}.get("channel_first", 0) == \
        int("ln_cf" in arch.norms)
    assert optimized.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16

    feeds = {model.graph.input[0].name: args[0].numpy()}
    with torch.no_grad():
        reference = [module.float()(args[0].float()).numpy()]
    limit = FP16_FACTOR * relative_error(run_onnx(model, feeds, library=False, optimize=False), reference) + \
        FP16_SLACK
    for library in (True, False):
        for optimize in (True, False):
            got = run_onnx(optimized, feeds, library, optimize)
            assert relative_error(got, reference) <= limit, (library, optimize)
    _check(arch, "ts13")
