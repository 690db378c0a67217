"""Smoke test of the model zoo (benchmarks/zoo.py): every architecture at a tiny size is
exported (TorchScript, opset 17, no exporter folding), run through normfold's passes, and
must still match PyTorch; each norm it contains must have been folded or fused."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from torch import nn

from benchmarks.bench_zoo import normfold_passes, op_counts
from tests.helpers.norm_models import FRN, LayerNorm2d, RMSNormLlama, export
from tests.helpers.zoo_models import ZOO, build

from normfold.testing import assert_equivalent

# norm family -> (the PyTorch layers of that norm, the op types one such layer must become)
FUSED = {
    "gn": ((nn.GroupNorm,), {"GroupNorm", "GroupNormalization", "BiasGroupNorm"}),  # Bias..., Skip...: an add fused in
    "ln_cf": ((LayerNorm2d, nn.LayerNorm), {"LayerNorm", "LayerNormalization", "SkipLayerNorm", "SkipLayerNormSum"}),
    "ln": ((nn.LayerNorm,), {"LayerNorm", "LayerNormalization", "SkipLayerNorm", "SkipLayerNormSum"}),
    "rms": ((RMSNormLlama,), {"RMSNorm", "RMSNormalization", "SkipRMSNorm", "SkipRMSNormSum"}),
    "frn": ((FRN,), {"FilterResponseNorm"}),
}
# BatchNorms the fold must leave, by model: BN -> ReLU -> Conv cannot be folded exactly.
BN_LEFT = {"resnet50": 0, "mobilenet_v3_small": 0,
           "preact_resnet18": 4 + 1}  # bn1 of each block, the final one (BN -> ReLU); the one on the
# input, before a padded conv, is folded by fold-affine: its scale into the conv, its shift kept as an Add


def _ops_by_type(model) -> Counter:
    return Counter({op.rsplit(".", 1)[-1]: n for op, n in op_counts(model).items()})


@pytest.mark.parametrize("name", list(ZOO))
def test_tiny_zoo_model_optimizes_and_matches_pytorch(name):
    module, args = build(name, tiny=True)
    model = export(module, args, exporter="torchscript", opset=17, constant_folding=False, name=f"zoo-tiny-{name}")
    optimized = normfold_passes(model)
    assert_equivalent(optimized, module, inputs={model.graph.input[0].name: args[0].numpy()})
    family = ZOO[name].family
    ops = _ops_by_type(optimized)
    if family == "bn":
        assert _ops_by_type(model)["BatchNormalization"] > BN_LEFT[name]
        assert ops["BatchNormalization"] == BN_LEFT[name]
    else:
        layers, op_types = FUSED[family]
        assert sum(isinstance(m, layers) for m in module.modules()) == sum(ops[t] for t in op_types) > 0
    assert len(optimized.graph.node) < len(model.graph.node) or family == "ln"


@pytest.mark.parametrize("name, params", [
    ("resnet50", 25_557_032),            # torchvision resnet50
    ("mobilenet_v3_small", 2_542_856),   # torchvision mobilenet_v3_small
    ("convnext_t", 28_589_128),          # torchvision / official convnext_tiny
    ("vit_s16", 22_050_664),             # timm vit_small_patch16_224
])
def test_full_size_models_have_the_reference_parameter_counts(name, params):
    assert sum(p.numel() for p in ZOO[name].full().parameters()) == params


def test_batchnorm_statistics_are_calibrated_and_non_trivial():
    module, args = build("resnet50", tiny=True)
    bns = [m for m in module.modules() if isinstance(m, nn.BatchNorm2d)]
    assert all(not torch.allclose(b.running_mean, torch.zeros_like(b.running_mean)) for b in bns)
    assert all(not torch.allclose(b.running_var, torch.ones_like(b.running_var)) for b in bns)
    assert any((b.weight < 0).any() for b in bns)
    with torch.no_grad():
        y = module(*args)
    assert 0.05 < float(y.std()) < 20  # activations neither vanished nor exploded


def test_unknown_zoo_model_names_the_choices():
    with pytest.raises(KeyError, match="nope"):
        build("nope")
