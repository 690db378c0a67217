"""Real PyTorch models exported to ONNX, folded, and compared with PyTorch and
with onnxruntime on the unfolded model (optimizations disabled).

Exports keep their BatchNorm nodes (FACTS.md): TorchScript with
`do_constant_folding=False`, dynamo with `optimize=False`. Running statistics
and affine parameters are randomized (the identity init hides mistakes).
"""

from __future__ import annotations

import io
import warnings
import zlib

import numpy as np
import onnx
import pytest

from tests.helpers.graphs import count_op, fold, max_err, ort_run

torch = pytest.importorskip("torch")
nn = torch.nn


def randomize_bn(model: nn.Module, seed: int) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                c = m.num_features
                m.running_mean.copy_(torch.randn(c, generator=gen) * 2)
                m.running_var.copy_(torch.rand(c, generator=gen) * 3.9 + 0.1)
                if m.affine:
                    sign = torch.where(torch.rand(c, generator=gen) < 0.3, -1.0, 1.0)
                    m.weight.copy_((torch.rand(c, generator=gen) + 0.5) * sign)
                    m.bias.copy_(torch.randn(c, generator=gen))
    return model.eval()


class ConvBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1, stride=2)
        self.bn = nn.BatchNorm2d(8, eps=1e-3)
        self.conv2 = nn.Conv2d(8, 4, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn2(self.conv2(torch.relu(self.bn(self.conv(x)))))


class ConvTBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1, output_padding=1, groups=2)
        self.bn = nn.BatchNorm2d(6)

    def forward(self, x):
        return torch.relu(self.bn(self.up(x)))


class LinearBN1d(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(12, 10)
        self.bn = nn.BatchNorm1d(10)
        self.fc2 = nn.Linear(10, 5, bias=False)
        self.bn2 = nn.BatchNorm1d(5)

    def forward(self, x):
        return self.bn2(self.fc2(torch.relu(self.bn(self.fc(x)))))


class PreActBN(nn.Module):
    """BN first (on the network input) feeding unpadded convs: forward fold."""

    def __init__(self):
        super().__init__()
        self.bn_in = nn.BatchNorm2d(3)
        self.conv = nn.Conv2d(3, 6, 1)
        self.bn = nn.BatchNorm2d(6)
        self.conv2 = nn.Conv2d(6, 4, 2, stride=2, bias=False)

    def forward(self, x):
        return self.conv2(self.bn(torch.relu(self.conv(self.bn_in(x)))))


class PreActPaddedBN(nn.Module):
    """BN on the input feeding a padded conv: not exact, must stay (with a reason)."""

    def __init__(self):
        super().__init__()
        self.bn_in = nn.BatchNorm2d(3)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        return self.conv(self.bn_in(x))


class CatBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.b = nn.Conv2d(3, 2, 1)
        self.bn = nn.BatchNorm2d(6)
        self.head = nn.Conv2d(6, 5, 1)

    def forward(self, x):
        return self.head(self.bn(torch.cat([self.a(x), self.b(x)], dim=1)))


class GroupedBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.g = nn.Conv2d(4, 8, 3, padding=1, groups=2)
        self.bn1 = nn.BatchNorm2d(8)
        self.dw = nn.Conv2d(8, 8, 3, padding=2, dilation=2, groups=8, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.dw3d = nn.Conv3d(8, 16, (1, 3, 3), padding=(0, 1, 1), groups=8)
        self.bn3 = nn.BatchNorm3d(16)

    def forward(self, x):
        y = self.bn2(self.dw(torch.relu(self.bn1(self.g(x)))))
        return self.bn3(self.dw3d(y.unsqueeze(2)))


class ResBlock(nn.Module):
    def __init__(self, cin=4, cout=8):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.short = nn.Conv2d(cin, cout, 1, stride=2, bias=False)
        self.bn_s = nn.BatchNorm2d(cout)

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return torch.relu(y + self.bn_s(self.short(x)))


# (model, input shape, BN left after a correct fold)
MODELS = {
    "conv_bn": (ConvBN, (2, 3, 9, 9), 0),
    "convT_bn": (ConvTBN, (2, 4, 5, 5), 0),
    "linear_bn1d": (LinearBN1d, (6, 12), 0),
    "preact_bn_conv": (PreActBN, (2, 3, 6, 6), 0),
    "preact_padded": (PreActPaddedBN, (2, 3, 6, 6), 1),
    "cat_bn": (CatBN, (2, 3, 7, 7), 0),
    "grouped_depthwise": (GroupedBN, (2, 4, 8, 8), 0),
    "resblock": (ResBlock, (2, 4, 8, 8), 0),
}
EXPORTERS = [
    pytest.param(("torchscript", 11), id="ts-opset11"),
    pytest.param(("torchscript", 13), id="ts-opset13"),
    pytest.param(("torchscript", 17), id="ts-opset17"),
    pytest.param(("dynamo", 18), id="dynamo-opset18", marks=pytest.mark.slow),
]


def export(module: nn.Module, x: torch.Tensor, exporter: str, opset: int) -> onnx.ModelProto:
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if exporter == "torchscript":
            torch.onnx.export(module, (x,), buf, dynamo=False, do_constant_folding=False, opset_version=opset,
                              input_names=["x"], output_names=["y"])
            model = onnx.load_from_string(buf.getvalue())
        else:
            program = torch.onnx.export(module, (x,), dynamo=True, optimize=False, opset_version=opset,
                                        verbose=False, input_names=["x"], output_names=["y"])
            model = program.model_proto
    if model.ir_version > 10:
        model.ir_version = 10  # onnxruntime here accepts IR <= 13; onnx 1.23 writes 14
    return model


@pytest.mark.parametrize("exporter", EXPORTERS)
@pytest.mark.parametrize("name", list(MODELS))
def test_exported_model_folds(name, exporter):
    kind, opset = exporter
    cls, shape, bn_left = MODELS[name]
    torch.manual_seed(0)
    module = randomize_bn(cls(), seed=zlib.crc32(name.encode()) % 1000)
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = module(x).numpy()
    model = export(module, x, kind, opset)
    bn_before = count_op(model, "BatchNormalization")
    n_bn_modules = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules())
    assert bn_before == n_bn_modules, f"the export itself folded BN ({bn_before} of {n_bn_modules} left)"

    serialized = model.SerializeToString()
    folded, report = fold(model, check_input=False)  # checked last, so numerics are reported first

    assert count_op(folded, "BatchNormalization") == bn_left, (report.changes, report.skipped)
    assert len(report.changes) == bn_before - bn_left
    assert len(report.skipped) == bn_left
    if bn_left:
        assert all("pad" in s.reason.lower() for s in report.skipped), report.skipped
    assert len(folded.graph.node) < len(model.graph.node) or bn_left == bn_before

    feeds = {model.graph.input[0].name: x.numpy()}
    [ref] = ort_run(model, feeds)
    [got] = ort_run(folded, feeds)
    scale = max(1.0, float(np.abs(ref).max()))
    assert max_err(got, ref) <= 1e-5 * scale, f"folded vs ORT on the original: {max_err(got, ref):.3g}"
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * scale)
    assert model.SerializeToString() == serialized, "fold_bn modified its input ModelProto"
