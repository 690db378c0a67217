"""The coverage table of README.md, one test per row: a model using each
normalization method of ../shared/NORMS.md is exported with both exporters,
run through `normfold.optimize`, checked for what normfold claims to do with
the method (fold / custom op / standard op / kept as is), and verified against
the PyTorch model (`normfold.verify.run`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import normfold
import tests.helpers.norm_models as zoo
from normfold import nn as nfnn
from normfold.verify.run import verify
from tests.test_fold_affine_exports import LayerScaleMLP, Standardized
from tests.test_recalibrate import torch_adabn


class GeneralizedBN(nn.Module):
    """Generalized BN at inference: γ (x - S) / D + β with stored location S and
    deviation D, written with F.batch_norm (var = D², ε = 0)."""

    def __init__(self, channels):
        super().__init__()
        self.register_buffer("location", torch.randn(channels))
        self.register_buffer("deviation", torch.rand(channels) + 0.5)
        self.weight = nn.Parameter(torch.randn(channels))
        self.bias = nn.Parameter(torch.randn(channels))

    def forward(self, x):
        return F.batch_norm(x, self.location, self.deviation ** 2, self.weight, self.bias, False, 0.0, 0.0)


def conv_then(norm: nn.Module, channels: int = 8) -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, channels, 3, padding=1), norm, nn.ReLU())


def tokens_then(norm: nn.Module) -> nn.Module:
    return nn.Sequential(nn.Linear(16, 32), norm, nn.GELU())


@dataclass
class Row:
    method: str
    layer: str
    does: str  # what normfold does with it at inference
    build: Callable[[], nn.Module]
    shape: tuple[int, ...]
    gone: tuple[str, ...] = ()  # ops that must not be left
    present: tuple[str, ...] = ()  # ops that must be there


ROWS = {
    "bn": Row("Batch Normalization", "nn.BatchNorm1d/2d/3d", "fold (fold-bn)",
              lambda: conv_then(nn.BatchNorm2d(8)), (2, 3, 8, 8), gone=("BatchNormalization",)),
    "batch_renorm": Row("Batch Renormalization", "normfold.nn.BatchRenorm2d", "fold (fold-bn)",
                        lambda: conv_then(nfnn.BatchRenorm2d(8)), (2, 3, 8, 8), gone=("BatchNormalization",)),
    "l1_bn": Row("L1-norm BN", "normfold.nn.L1BatchNorm2d", "fold (fold-bn)",
                 lambda: conv_then(nfnn.L1BatchNorm2d(8)), (2, 3, 8, 8), gone=("BatchNormalization",)),
    "generalized_bn": Row("Generalized BN", "`F.batch_norm` with stored S, D² (ε = 0)", "fold (fold-bn)",
                          lambda: conv_then(GeneralizedBN(8)), (2, 3, 8, 8), gone=("BatchNormalization",)),
    "adabn": Row("AdaBN", "any BN model + target-domain data", "recalibrate, then fold (`recalibrate`, "
                 "`optimize --data`)", lambda: conv_then(nn.BatchNorm2d(8)), (2, 3, 8, 8),
                 gone=("BatchNormalization",)),
    "layer_norm": Row("Layer Norm (last axes)", "nn.LayerNorm", "standard LayerNormalization (opset ≥ 17), "
                      "else custom LayerNorm", lambda: tokens_then(nn.LayerNorm(32)), (2, 5, 16),
                      gone=("ReduceMean", "Sqrt")),
    "layer_norm_cf": Row("Layer Norm, channel-first", "normfold.nn.LayerNorm2d (ConvNeXt)",
                         "custom LayerNorm (channel_first)", lambda: conv_then(nfnn.LayerNorm2d(8)), (2, 3, 8, 8),
                         gone=("ReduceMean", "Sqrt"), present=("LayerNorm",)),
    "instance_norm": Row("Instance Norm", "nn.InstanceNorm2d", "kept as is (ONNX InstanceNormalization)",
                         lambda: conv_then(nn.InstanceNorm2d(8, affine=True)), (2, 3, 8, 8),
                         present=("InstanceNormalization",)),
    "group_norm": Row("Group Norm", "nn.GroupNorm (+ SiLU)", "custom GroupNorm, SiLU fused",
                      lambda: nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.GroupNorm(4, 8), nn.SiLU()),
                      (2, 3, 8, 8), gone=("InstanceNormalization", "GroupNormalization", "Sigmoid"),
                      present=("GroupNorm",)),
    "rms_norm": Row("RMS Norm", "normfold.nn.RMSNorm", "standard RMSNormalization (opset ≥ 23), "
                    "else custom RMSNorm", lambda: tokens_then(nfnn.RMSNorm(32)), (2, 5, 16),
                    gone=("ReduceMean", "Sqrt"), present=("RMSNorm",)),
    "frn": Row("Filter Response Norm (+TLU)", "normfold.nn.FilterResponseNorm2d", "custom FilterResponseNorm",
               lambda: conv_then(nfnn.FilterResponseNorm2d(8, learnable_eps=True)), (2, 3, 8, 8),
               gone=("ReduceMean", "Sqrt", "Max"), present=("FilterResponseNorm",)),
    "switchable_norm": Row("Switchable Norm", "normfold.nn.SwitchableNorm2d", "kept as is (verified)",
                           lambda: conv_then(nfnn.SwitchableNorm2d(8)), (2, 3, 8, 8)),
    "lrn": Row("Local Response Norm", "nn.LocalResponseNorm", "kept as is (PyTorch exports it as "
               "Pad + AveragePool over channels; an ONNX LRN node is left too)",
               lambda: conv_then(nn.LocalResponseNorm(3)), (2, 3, 8, 8), present=("AveragePool",)),
    "weight_norm": Row("Weight Norm", "nn.utils.parametrizations.weight_norm",
                       "weight computed offline (fold-wn); runtime v or g: custom WeightNorm",
                       lambda: nn.Sequential(nn.utils.parametrizations.weight_norm(nn.Conv2d(3, 8, 3)), nn.ReLU()),
                       (2, 3, 8, 8), gone=("ReduceL2", "Div")),
    "cosine_norm": Row("Cosine Normalization", "normfold.nn.CosineLinear", "weight side computed offline "
                       "(fold-wn); ‖x‖ kept", lambda: nn.Sequential(nn.Flatten(), nfnn.CosineLinear(48, 5, 10.0)),
                       (2, 3, 4, 4), present=("ReduceL2",)),
    "weight_std": Row("Weight standardisation", "StdConv (BiT / NF-Nets), see tests/norm_models.py WSConv2d",
                      "weight computed offline (fold-wn)",
                      lambda: nn.Sequential(zoo.WSConv2d(3, 8, 3, ws="var"), nn.ReLU()), (2, 3, 8, 8),
                      gone=("ReduceMean", "Sqrt")),
    "input_standardisation": Row("Input standardisation", "`(x - mean) / std` inside the model, before the first "
                                 "conv (see tests/test_fold_affine_exports.py Standardized)",
                                 "folded into the conv (fold-affine); a padded conv takes the scale, the shift "
                                 "stays as one Add", lambda: Standardized(padding=1, scaling="zscore"), (2, 3, 8, 8),
                                 gone=("Sub", "Div"), present=("Add",)),
    "layer_scale": Row("Layer scale", "`gamma * x` after a block's last Linear (CaiT, DINOv2, ConvNeXt), see "
                       "tests/test_fold_affine_exports.py LayerScaleMLP", "folded into the Linear's weight and bias "
                       "(fold-affine)", lambda: LayerScaleMLP(act=F.relu), (2, 5, 16), gone=("Mul",)),
}

EXPORTS = [("torchscript", 17, False), ("dynamo", 18, False)]


def _module(key: str) -> nn.Module:
    torch.manual_seed(0)
    return zoo.randomize_norms(ROWS[key].build(), 1).eval()


@pytest.mark.parametrize("exporter, opset, folding", EXPORTS, ids=[f"{e}{o}" for e, o, _ in EXPORTS])
@pytest.mark.parametrize("key", list(ROWS))
def test_method(key, exporter, opset, folding):
    row = ROWS[key]
    module = _module(key)
    x = torch.randn(*row.shape, generator=torch.Generator().manual_seed(1))
    model = zoo.export(module, (x,), exporter=exporter, opset=opset, constant_folding=folding)
    name = model.graph.input[0].name
    if key == "adabn":  # target domain: shifted and scaled inputs, in two batches
        rng = np.random.default_rng(2)
        batches = [{name: (rng.standard_normal(row.shape) * 2 + 1).astype(np.float32)} for _ in range(2)]
        model, report = normfold.recalibrate(model, batches)
        assert len(report.changes) == 1
        torch_adabn(module, batches)
    optimized, reports = normfold.optimize(model, target="custom" if key != "layer_norm" else "auto")
    ops = [n.op_type for n in optimized.graph.node]
    assert not set(row.gone) & set(ops), (ops, [s.reason for r in reports for s in r.skipped])
    assert set(row.present) <= set(ops), ops
    result = verify(optimized, module, inputs={name: x.numpy()}, atol=1e-5, rtol=1e-4)
    assert result.passed, result.verdict()


def coverage_table() -> str:
    """The README table, from ROWS (run this module to print it)."""
    lines = ["| method | PyTorch / normfold.nn layer | what normfold does at inference | test |",
             "|---|---|---|---|"]
    for key, row in ROWS.items():
        lines.append(f"| {row.method} | {row.layer} | {row.does} | `tests/test_coverage.py::test_method[*-{key}]` |")
    return "\n".join(lines)


def test_readme_table_is_current():
    readme = (__import__("pathlib").Path(__file__).parent.parent / "README.md").read_text()
    assert coverage_table() in readme, "README's coverage table is out of date: python tests/test_coverage.py"


if __name__ == "__main__":
    print(coverage_table())
