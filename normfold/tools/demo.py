"""`normfold demo`: fold BatchNorm and fuse normalization subgraphs in small
built-in PyTorch networks, end to end."""

from __future__ import annotations

import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from normfold.errors import NormfoldError
from normfold.ops.table import DOMAIN, FAMILIES
from normfold.pipeline.files import fold_bn_file, fuse_file
from normfold.runtime.session import make_session


def _networks():
    """(name, module, example input) for each BN placement normfold handles."""
    import torch
    from torch import nn

    class ConvBN(nn.Sequential):
        def __init__(self):
            super().__init__(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                             nn.Conv2d(16, 16, 3, stride=2, padding=2, dilation=2, bias=False), nn.BatchNorm2d(16))

    class GroupedDepthwise(nn.Sequential):
        def __init__(self):
            super().__init__(nn.Conv2d(8, 16, 3, padding=1, groups=4), nn.BatchNorm2d(16), nn.ReLU(),
                             nn.Conv2d(16, 16, 3, padding=1, groups=16, bias=False), nn.BatchNorm2d(16))

    class ConvTransposeBN(nn.Sequential):
        def __init__(self):
            super().__init__(nn.ConvTranspose2d(8, 12, 3, stride=2, output_padding=1, groups=2), nn.BatchNorm2d(12))

    class LinearBN1d(nn.Sequential):
        def __init__(self):
            super().__init__(nn.Linear(32, 64), nn.BatchNorm1d(64), nn.ReLU(), nn.Linear(64, 10))

    class PreActivation(nn.Module):
        """BN on the network input and before convs: folds forward into the
        unpadded 1x1 conv; the padded 3x3 conv would see shifted borders."""

        def __init__(self):
            super().__init__()
            self.bn_in = nn.BatchNorm2d(3)
            self.conv_in = nn.Conv2d(3, 16, 3, padding=0)
            self.bn1 = nn.BatchNorm2d(16)
            self.conv1 = nn.Conv2d(16, 16, 1)
            self.bn2 = nn.BatchNorm2d(16)
            self.conv2 = nn.Conv2d(16, 16, 3, padding=1)

        def forward(self, x):
            y = torch.relu(self.conv_in(self.bn_in(x)))
            return self.conv2(self.bn2(torch.relu(self.conv1(self.bn1(y)))))

    class ConcatBN(nn.Module):
        """BN after a concat: no linear neighbour, left in place (or Mul+Add)."""

        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 8, 3, padding=1)
            self.b = nn.Conv2d(3, 8, 1)
            self.bn = nn.BatchNorm2d(16)

        def forward(self, x):
            return torch.relu(self.bn(torch.cat([self.a(x), self.b(x)], 1)))

    return [
        ("conv->BN", ConvBN(), torch.randn(2, 3, 32, 32)),
        ("grouped/depthwise conv->BN", GroupedDepthwise(), torch.randn(2, 8, 32, 32)),
        ("convT->BN", ConvTransposeBN(), torch.randn(2, 8, 16, 16)),
        ("Linear->BN1d", LinearBN1d(), torch.randn(4, 32)),
        ("BN->conv (pre-activation)", PreActivation(), torch.randn(2, 3, 32, 32)),
        ("concat->BN", ConcatBN(), torch.randn(2, 3, 32, 32)),
    ]


def _norm_networks():
    """(name, module, example input) for blocks whose norm layers `fuse` replaces."""
    import torch
    from torch import nn

    class ResBlockGN(nn.Module):
        """Diffusion U-Net style: GroupNorm -> SiLU -> conv, twice."""

        def __init__(self, c=32):
            super().__init__()
            self.n1, self.c1 = nn.GroupNorm(8, c), nn.Conv2d(c, c, 3, padding=1)
            self.n2, self.c2 = nn.GroupNorm(8, c), nn.Conv2d(c, c, 3, padding=1)

        def forward(self, x):
            return x + self.c2(nn.functional.silu(self.n2(self.c1(nn.functional.silu(self.n1(x))))))

    class ConvNeXtBlock(nn.Module):
        """Depthwise conv -> channel-first LayerNorm (written by hand, as in ConvNeXt) -> 1x1 convs."""

        def __init__(self, c=32):
            super().__init__()
            self.dw, self.w, self.b = nn.Conv2d(c, c, 7, padding=3, groups=c), nn.Parameter(torch.rand(c) + .5), \
                nn.Parameter(torch.randn(c))
            self.pw1, self.pw2 = nn.Conv2d(c, 4 * c, 1), nn.Conv2d(4 * c, c, 1)

        def forward(self, x):
            y = self.dw(x)
            u = y.mean(1, keepdim=True)
            y = (y - u) / torch.sqrt((y - u).pow(2).mean(1, keepdim=True) + 1e-6)
            y = self.w[:, None, None] * y + self.b[:, None, None]
            return x + self.pw2(nn.functional.gelu(self.pw1(y)))

    class RMSNormMLP(nn.Module):
        """Llama style: x * rsqrt(mean(x²) + ε) * γ, then an MLP."""

        def __init__(self, d=64):
            super().__init__()
            self.g, self.up, self.down = nn.Parameter(torch.rand(d) + .5), nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

        def forward(self, x):
            y = self.g * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))
            return x + self.down(nn.functional.silu(self.up(y)))

    class FRNBlock(nn.Module):
        """Filter Response Normalization with TLU after a conv."""

        def __init__(self, c=16):
            super().__init__()
            self.conv = nn.Conv2d(3, c, 3, padding=1)
            self.gamma, self.beta, self.tau = (nn.Parameter(torch.randn(1, c, 1, 1)) for _ in range(3))

        def forward(self, x):
            y = self.conv(x)
            y = y * torch.rsqrt(y.pow(2).mean(dim=(2, 3), keepdim=True) + 1e-6)
            return torch.max(self.gamma * y + self.beta, self.tau)

    return [
        ("GroupNorm+SiLU (U-Net block)", ResBlockGN(), torch.randn(2, 32, 16, 16)),
        ("channel-first LayerNorm (ConvNeXt)", ConvNeXtBlock(), torch.randn(2, 32, 14, 14)),
        ("RMSNorm (Llama MLP)", RMSNormMLP(), torch.randn(2, 8, 64)),
        ("FRN+TLU", FRNBlock(), torch.randn(2, 3, 16, 16)),
    ]


def _randomize_bn(module, generator) -> None:
    """Give every BN non-trivial statistics: the default init would hide fold mistakes."""
    import torch

    for m in module.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            c = m.num_features
            m.running_mean.copy_(torch.randn(c, generator=generator))
            m.running_var.copy_(torch.rand(c, generator=generator) * 2 + 0.25)
            m.weight.data.copy_(torch.rand(c, generator=generator) + 0.5)
            m.bias.data.copy_(torch.randn(c, generator=generator) * 0.5)


@dataclass
class DemoResult:
    """What the demo did: one row per network for fold-bn and for fuse, the BNs
    left and why, where the models are, and the worst relative difference."""

    folder: Path
    kept: bool
    fold_rows: list[tuple[str, ...]] = field(default_factory=list)
    left: list[str] = field(default_factory=list)
    fuse_rows: list[tuple[str, ...]] = field(default_factory=list)
    worst: float = 0.0

    @property
    def passed(self) -> bool:
        """Every rewritten model matches its original within 1e-5 relative."""
        return self.worst <= 1e-5


FOLD_COLUMNS = ("network", "BN before", "BN after", "nodes before", "nodes after", "max |diff|")
FUSE_COLUMNS = ("network", "nodes before", "nodes after", "became", "max |diff|")


def run_demo(keep: Path | None = None) -> DemoResult:
    """Export, fold and fuse the built-in networks and check them against the originals."""
    try:
        import torch
    except ImportError as exc:
        raise NormfoldError("the demo needs PyTorch: pip install 'normfold[torch]' (or run ./setup.sh)") from exc

    folder = Path(keep) if keep else Path(tempfile.mkdtemp(prefix="normfold-demo-"))
    folder.mkdir(parents=True, exist_ok=True)
    result = DemoResult(folder, kept=keep is not None)
    generator = torch.Generator().manual_seed(0)
    for index, (name, module, example) in enumerate(_networks()):
        module.eval()
        with torch.no_grad():
            _randomize_bn(module, generator)
        source = folder / f"{index}_{name.split()[0].replace('->', '_').replace('/', '_')}.onnx"
        _export(module, example, source, constant_folding=False)  # else the exporter itself folds conv->BN
        target = source.with_name(source.stem + ".folded.onnx")
        summary = fold_bn_file(source, target, inplace=False, direction="both", standalone="keep")
        diff, relative = _max_relative_diff(source, target, example)
        result.worst = max(result.worst, relative)
        result.left += [f"{name}: {skip.node}: {skip.reason}" for skip in summary.reports[0].skipped]
        result.fold_rows.append((name, str(summary.ops_before["BatchNormalization"]),
                                 str(summary.ops_after["BatchNormalization"]), str(sum(summary.ops_before.values())),
                                 str(sum(summary.ops_after.values())), f"{diff:.1e}"))
    _fuse_demo(folder, result)
    return result


def _export(module, example, path: Path, constant_folding: bool) -> None:
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (example,), str(path), dynamo=False, do_constant_folding=constant_folding,
                          opset_version=17, input_names=["x"], output_names=["y"])


def _max_relative_diff(source: Path, target: Path, example) -> tuple[float, float]:
    """(max |diff|, the same relative to the output scale) of two models run on `example`."""
    feed = {"x": example.numpy()}
    before = make_session(str(source)).run(None, feed)[0]
    after = make_session(str(target)).run(None, feed)[0]
    diff = float(np.max(np.abs(before - after)))
    return diff, diff / max(1.0, float(np.max(np.abs(before))))


def _fuse_demo(folder: Path, result: DemoResult) -> None:
    """Fuse the norm blocks; add their rows and differences to `result`."""
    import torch

    for index, (name, module, example) in enumerate(_norm_networks()):
        torch.manual_seed(index)
        module.eval()
        source = folder / f"norm{index}_{name.split()[0].replace('+', '_')}.onnx"
        _export(module, example, source, constant_folding=True)
        target = source.with_name(source.stem + ".fused.onnx")
        summary = fuse_file(source, target, inplace=False, ops=FAMILIES, target="auto")
        diff, relative = _max_relative_diff(source, target, example)
        result.worst = max(result.worst, relative)
        kinds = summary.reports[0].counts().items()
        became = ", ".join(f"{n} x {kind.removeprefix(DOMAIN + '.')}" for kind, n in kinds)
        result.fuse_rows.append((name, str(sum(summary.ops_before.values())), str(sum(summary.ops_after.values())),
                                 became, f"{diff:.1e}"))
