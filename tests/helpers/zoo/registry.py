"""The zoo's vocabulary: architectures, export configurations and their product, the cases.

An `Architecture` builds a real model from a model library's own code (random, seeded
weights from a small config; nothing is downloaded) and its example inputs. An
`ExportConfig` is one of the four ways people export. A case is the pair.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

SEED = 0


@dataclass(frozen=True)
class Architecture:
    """One zoo model: `build()` returns (module in eval mode, example input tuple).

    library: the PyPI package whose code defines it; norms: the norm kinds it contains
    (bn, ln, ln_cf, gn, rms, frn, ws); fp16: built in half precision (compared with the
    same architecture in float32)."""

    name: str
    library: str
    norms: tuple[str, ...]
    build: Callable[[], tuple[nn.Module, tuple[torch.Tensor, ...]]]
    fp16: bool = False


@dataclass(frozen=True)
class ExportConfig:
    """One export: exporter ("torchscript"/"dynamo"), opset, and the exporter's constant
    folding (TorchScript `do_constant_folding`, dynamo `optimize`)."""

    name: str
    exporter: str
    opset: int
    constant_folding: bool


CONFIGS = {
    c.name: c
    for c in (
        ExportConfig("ts13", "torchscript", 13, False),
        ExportConfig("ts17", "torchscript", 17, True),
        ExportConfig("dy18", "dynamo", 18, False),
        ExportConfig("dy21", "dynamo", 21, True),
    )
}


class FirstOutput(nn.Module):
    """`model(*args, **kwargs)`'s main tensor: the first element of a tuple or
    ModelOutput (last_hidden_state, logits, sample, ...), so that every export
    has one plain output."""

    def __init__(self, model: nn.Module, **kwargs):
        super().__init__()
        self.model = model
        self.kwargs = kwargs

    def forward(self, x, *rest):
        out = self.model(x, *rest, **self.kwargs)
        if isinstance(out, torch.Tensor):
            return out
        first = out[0] if isinstance(out, (tuple, list)) else out.to_tuple()[0]
        return tuple(first) if isinstance(first, (tuple, list)) else first


def randomize(module: nn.Module, seed: int = SEED) -> nn.Module:
    """Non-trivial norm parameters and BatchNorm statistics (library inits are 1/0),
    so that every fold and fusion changes real numbers; eval mode."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
            if "norm" not in type(m).__name__.lower() and not isinstance(m, nn.modules.batchnorm._BatchNorm):
                continue
            for p in m.parameters(recurse=False):
                if p.ndim == 1 or type(m).__name__.startswith("FilterResponse"):
                    p.copy_(p + 0.2 * torch.randn(p.shape, generator=g))
    return module.eval()


def half_precision(build):
    """`build` with the module and its floating-point inputs in float16."""
    def half():
        module, args = build()
        return module.half(), tuple(a.half() if a.is_floating_point() else a for a in args)
    half.__name__ = f"{build.__name__}_fp16"
    return half


def seeded(seed: int = SEED) -> torch.Generator:
    """A fresh generator for example inputs."""
    return torch.Generator().manual_seed(seed)


def image(c: int = 3, size: int = 32, n: int = 1) -> torch.Tensor:
    """A seeded N×C×size×size image batch."""
    return torch.randn(n, c, size, size, generator=seeded())


def tokens(vocab: int, length: int = 12, n: int = 1) -> torch.Tensor:
    """Seeded token ids, N×length int64."""
    return torch.randint(0, vocab, (n, length), generator=seeded())
