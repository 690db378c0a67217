"""Small PyTorch blocks with normalization layers, and an ONNX export wrapper with
an on-disk cache, for the `normfold fuse` pattern passes and their tests.

    from tests.helpers.norm_models import CASES, NEGATIVE, FAMILY, make, example_inputs, export

    module = make("gn2d_g4_silu")                 # eval mode, seeded, non-trivial γ/β
    args = example_inputs("gn2d_g4_silu")         # tuple of tensors (seeded)
    model = export(module, args, exporter="dynamo", opset=18)           # onnx.ModelProto
    model = export_case("gn2d_g4_silu", exporter="torchscript", opset=13, constant_folding=False)

`CASES[name] = (factory, shape)`: `factory()` builds the module (eval mode, seeded);
`shape` is the input shape, or a tuple of shapes for several inputs.
`FAMILY[name]` is the norm family ("groupnorm", "layernorm", "layernorm_cf",
"rmsnorm", "frn", "weightnorm", "weightstd") and `NEGATIVE` holds the look-alikes
that a fuse pass must NOT rewrite (`NEGATIVE_REASON[name]` says why).

Every export is cached under $NORMFOLD_EXPORT_CACHE or <repo>/.pytest_cache/normfold-exports,
keyed by (name, exporter, opset, constant_folding) and a digest of the module's class
source, state dict, input shapes and the torch/onnx/onnxscript versions. Failed exports are
cached too (as .err files) and re-raised as `ExportError`, so a suite does not retry them.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import io
import logging
import os
import tempfile
import warnings
import zlib
from pathlib import Path
from typing import Callable

import onnx
import torch
from torch import nn

MAX_IR_VERSION = 10  # onnx 1.23 writes IR 14; onnxruntime 1.31 reads <= 13. Keep a margin.


# ---------------------------------------------------------------------------------------------
# parameter initialisation
# ---------------------------------------------------------------------------------------------

def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _scale_like(t: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Values in ±[0.5, 1.5], about 20% negative: a γ that is neither ones nor all positive."""
    sign = torch.where(torch.rand(t.shape, generator=g) < 0.2, -1.0, 1.0)
    return (torch.rand(t.shape, generator=g) + 0.5) * sign


def _shift_like(t: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    return torch.randn(t.shape, generator=g) * 0.5


def randomize_norms(module: nn.Module, seed: int) -> nn.Module:
    """Give every norm layer's γ/β (and FRN τ) non-trivial values; eval mode."""
    g = _gen(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, (nn.GroupNorm, nn.LayerNorm, nn.RMSNorm, nn.InstanceNorm2d, LayerNorm2d,
                              RMSNormLlama, RMSNormDivSqrt, FRN, FRNFloatEps)):
                for pname, p in m.named_parameters(recurse=False):
                    if pname in ("weight", "gamma"):
                        p.copy_(_scale_like(p, g))
                    elif pname in ("bias", "beta", "tau"):
                        p.copy_(_shift_like(p, g))
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g))
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return module.eval()


# ---------------------------------------------------------------------------------------------
# hand-written norm layers
# ---------------------------------------------------------------------------------------------

class SiLUManual(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(x)


class LayerNorm2d(nn.Module):
    """ConvNeXt's channel-first LayerNorm (facebookresearch/ConvNeXt, data_format="channels_first")."""

    def __init__(self, c: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(c))
        self.bias = nn.Parameter(torch.zeros(c))
        self.eps = eps

    def forward(self, x):
        u = x.mean(1, keepdim=True)
        s = (x - u).pow(2).mean(1, keepdim=True)
        x = (x - u) / torch.sqrt(s + self.eps)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


class LayerNorm2dPermute(nn.Module):
    """Channel-first LayerNorm as permute -> nn.LayerNorm(C) -> permute (timm LayerNorm2d style)."""

    def __init__(self, c: int, eps: float = 1e-6):
        super().__init__()
        self.ln = nn.LayerNorm(c, eps=eps)

    def forward(self, x):
        return self.ln(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class RMSNormLlama(nn.Module):
    """HF transformers LlamaRMSNorm."""

    def __init__(self, d: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.variance_epsilon = eps

    def forward(self, hidden_states):
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)


class RMSNormDivSqrt(nn.Module):
    """RMSNorm written as x / sqrt(mean(x²) + eps) * weight."""

    def __init__(self, d: int, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.eps = eps

    def forward(self, x):
        return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class FRN(nn.Module):
    """Filter Response Normalization + optional TLU (Singh & Krishnan 2019), NCHW."""

    def __init__(self, c: int, eps: float = 1e-6, learned_eps: bool = False, tlu: bool = True):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(1, c, 1, 1))
        self.beta = nn.Parameter(torch.zeros(1, c, 1, 1))
        self.tau = nn.Parameter(torch.zeros(1, c, 1, 1)) if tlu else None
        if learned_eps:
            self.eps = nn.Parameter(torch.full((1,), eps))
        else:
            self.register_buffer("eps", torch.full((1,), eps))
        self.learned_eps = learned_eps

    def forward(self, x):
        nu2 = x.pow(2).mean(dim=[2, 3], keepdim=True)
        eps = self.eps.abs() if self.learned_eps else self.eps
        x = x * torch.rsqrt(nu2 + eps)
        y = self.gamma * x + self.beta
        return torch.max(y, self.tau) if self.tau is not None else y


class FRNFloatEps(nn.Module):
    """FRN with a Python-float eps (no buffer) and TLU: the commonest hand-written form."""

    def __init__(self, c: int, eps: float = 1e-6):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(1, c, 1, 1))
        self.beta = nn.Parameter(torch.zeros(1, c, 1, 1))
        self.tau = nn.Parameter(torch.zeros(1, c, 1, 1))
        self.eps = eps

    def forward(self, x):
        nu2 = x.pow(2).mean(dim=[2, 3], keepdim=True)
        x = x * torch.rsqrt(nu2 + self.eps)
        return torch.max(self.gamma * x + self.beta, self.tau)


class WSConv2d(nn.Conv2d):
    """Conv2d with weight standardisation (BiT / NF-Nets style)."""

    def __init__(self, *args, ws: str = "std", ws_eps: float = 1e-5, **kwargs):
        super().__init__(*args, **kwargs)
        self.ws = ws
        self.ws_eps = ws_eps

    def forward(self, x):
        w = self.weight
        mean = w.mean(dim=[1, 2, 3], keepdim=True)
        if self.ws == "std":      # (w - mean) / (std + eps), unbiased std (torch default)
            w = (w - mean) / (w.std(dim=[1, 2, 3], keepdim=True) + self.ws_eps)
        else:                     # (w - mean) / sqrt(var + eps), population variance (BiT)
            var = w.var(dim=[1, 2, 3], keepdim=True, unbiased=False)
            w = (w - mean) / torch.sqrt(var + self.ws_eps)
        return nn.functional.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


# ---------------------------------------------------------------------------------------------
# blocks using the layers in context
# ---------------------------------------------------------------------------------------------

_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


class GNBlock(nn.Module):
    """ConvNd -> GroupNorm -> (SiLU | x*sigmoid(x) | nothing) -> ConvNd."""

    def __init__(self, rank: int, cin: int, c: int, groups: int, affine: bool = True, act: str | None = "silu",
                 eps: float = 1e-5):
        super().__init__()
        conv = _CONV[rank]
        self.conv1 = conv(cin, c, 3, padding=1)
        self.norm = nn.GroupNorm(groups, c, eps=eps, affine=affine)
        self.act = {"silu": nn.SiLU(), "silu_manual": SiLUManual(), None: nn.Identity()}[act]
        self.conv2 = conv(c, 4, 1)

    def forward(self, x):
        return self.conv2(self.act(self.norm(self.conv1(x))))


class LNBlock(nn.Module):
    """Transformer pre-norm MLP: x + fc2(gelu(fc1(LN(x))))."""

    def __init__(self, d: int, normalized_shape, **ln_kwargs):
        super().__init__()
        self.norm = nn.LayerNorm(normalized_shape, **ln_kwargs)
        self.fc1 = nn.Linear(d, 2 * d)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(2 * d, d)

    def forward(self, x):
        return x + self.fc2(self.act(self.fc1(self.norm(x))))


class ConvNeXtBlock(nn.Module):
    """dwconv7x7 -> channel-first LN -> 1x1 conv -> GELU -> 1x1 conv, + residual."""

    def __init__(self, c: int, norm: nn.Module):
        super().__init__()
        self.dw = nn.Conv2d(c, c, 7, padding=3, groups=c)
        self.norm = norm
        self.pw1 = nn.Conv2d(c, 2 * c, 1)
        self.act = nn.GELU()
        self.pw2 = nn.Conv2d(2 * c, c, 1)

    def forward(self, x):
        return x + self.pw2(self.act(self.pw1(self.norm(self.dw(x)))))


class RMSBlock(nn.Module):
    """Llama-style pre-norm: x + down(silu(gate(norm(x))) * up(norm(x)))."""

    def __init__(self, d: int, norm: nn.Module):
        super().__init__()
        self.norm = norm
        self.gate = nn.Linear(d, 2 * d, bias=False)
        self.up = nn.Linear(d, 2 * d, bias=False)
        self.down = nn.Linear(2 * d, d, bias=False)

    def forward(self, x):
        h = self.norm(x)
        return x + self.down(nn.functional.silu(self.gate(h)) * self.up(h))


class FRNBlock(nn.Module):
    """Conv -> FRN(+TLU) -> Conv."""

    def __init__(self, cin: int, c: int, norm: nn.Module):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, c, 3, padding=1)
        self.norm = norm
        self.conv2 = nn.Conv2d(c, 4, 1)

    def forward(self, x):
        return self.conv2(self.norm(self.conv1(x)))


class WNConvBlock(nn.Module):
    """weight-normed Conv -> ReLU -> Conv."""

    def __init__(self, dim: int | None, legacy: bool = False, seed: int = 0):
        super().__init__()
        conv = nn.Conv2d(3, 8, 3, padding=1)
        if legacy:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                self.conv = nn.utils.weight_norm(conv, dim=dim)
        else:
            self.conv = nn.utils.parametrizations.weight_norm(conv, dim=dim)
        self.conv2 = nn.Conv2d(8, 4, 1)
        _randomize_weight_norm_g(self.conv, seed)

    def forward(self, x):
        return self.conv2(torch.relu(self.conv(x)))


class WNLinearBlock(nn.Module):
    """weight-normed Linear -> ReLU -> Linear."""

    def __init__(self, dim: int | None, seed: int = 0):
        super().__init__()
        self.fc = nn.utils.parametrizations.weight_norm(nn.Linear(16, 12), dim=dim)
        self.fc2 = nn.Linear(12, 8)
        _randomize_weight_norm_g(self.fc, seed)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc(x)))


def _randomize_weight_norm_g(layer: nn.Module, seed: int) -> None:
    """Scale the magnitude g by ±[0.5, 1.5] so that w != v-derived default."""
    g = _gen(seed)
    with torch.no_grad():
        if hasattr(layer, "parametrizations"):
            p = layer.parametrizations.weight.original0
        else:
            p = layer.weight_g
        p.mul_(_scale_like(p, g))


class WSBlock(nn.Module):
    """BiT-style: WSConv2d -> GroupNorm -> ReLU -> WSConv2d."""

    def __init__(self, ws: str):
        super().__init__()
        self.conv1 = WSConv2d(3, 8, 3, padding=1, ws=ws)
        self.norm = nn.GroupNorm(2, 8)
        self.conv2 = WSConv2d(8, 4, 1, bias=False, ws=ws)

    def forward(self, x):
        return self.conv2(torch.relu(self.norm(self.conv1(x))))


# ---- look-alikes (must NOT be fused) ---------------------------------------------------------

class LNVarAxisMismatch(nn.Module):
    """Mean over the last axis, variance over axis -2: not a LayerNorm."""

    def __init__(self, d: int = 16):
        super().__init__()
        self.weight = nn.Parameter(torch.rand(d) + 0.5)
        self.bias = nn.Parameter(torch.randn(d) * 0.5)

    def forward(self, x):
        u = x.mean(-1, keepdim=True)
        s = (x - u).pow(2).mean(-2, keepdim=True)
        return (x - u) / torch.sqrt(s + 1e-5) * self.weight + self.bias


class LN2dWrongAxis(nn.Module):
    """ConvNeXt LN written over axis 2 (H) with γ on axis 1 (C): not a channel-first LN."""

    def __init__(self, c: int = 8):
        super().__init__()
        self.weight = nn.Parameter(torch.rand(c) + 0.5)
        self.bias = nn.Parameter(torch.randn(c) * 0.5)

    def forward(self, x):
        u = x.mean(2, keepdim=True)
        s = (x - u).pow(2).mean(2, keepdim=True)
        x = (x - u) / torch.sqrt(s + 1e-6)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


class LNEpsOutsideSqrt(nn.Module):
    """(x - u) / (sqrt(var) + eps): eps outside the square root, not LayerNorm."""

    def __init__(self, d: int = 16):
        super().__init__()
        self.weight = nn.Parameter(torch.rand(d) + 0.5)
        self.bias = nn.Parameter(torch.randn(d) * 0.5)

    def forward(self, x):
        u = x.mean(-1, keepdim=True)
        s = (x - u).pow(2).mean(-1, keepdim=True)
        return (x - u) / (torch.sqrt(s) + 1e-5) * self.weight + self.bias


class LNUnbiasedVar(nn.Module):
    """x.var(unbiased=True): divides by n-1, not LayerNorm."""

    def __init__(self, d: int = 16):
        super().__init__()
        self.weight = nn.Parameter(torch.rand(d) + 0.5)

    def forward(self, x):
        u = x.mean(-1, keepdim=True)
        v = x.var(-1, keepdim=True, unbiased=True)
        return (x - u) / torch.sqrt(v + 1e-5) * self.weight


class LNRuntimeGamma(nn.Module):
    """Hand-written LayerNorm whose γ is a graph input."""

    def forward(self, x, gamma):
        u = x.mean(-1, keepdim=True)
        s = (x - u).pow(2).mean(-1, keepdim=True)
        return (x - u) / torch.sqrt(s + 1e-5) * gamma


class LN2dExtraOutput(nn.Module):
    """ConvNeXt LN whose per-pixel mean is also a graph output."""

    def __init__(self, c: int = 8):
        super().__init__()
        self.norm = LayerNorm2d(c)

    def forward(self, x):
        u = x.mean(1, keepdim=True)
        return self.norm(x), u


class LN2dSharedCentered(nn.Module):
    """ConvNeXt LN where the centred tensor x-u also feeds another branch."""

    def __init__(self, c: int = 8):
        super().__init__()
        self.weight = nn.Parameter(torch.rand(c) + 0.5)
        self.bias = nn.Parameter(torch.randn(c) * 0.5)

    def forward(self, x):
        u = x.mean(1, keepdim=True)
        d = x - u
        s = d.pow(2).mean(1, keepdim=True)
        y = self.weight[:, None, None] * (d / torch.sqrt(s + 1e-6)) + self.bias[:, None, None]
        return y + torch.relu(d)


class RMSAbsMean(nn.Module):
    """x / (mean(|x|) + eps) * w: mean of |x|, not of x²."""

    def __init__(self, d: int = 16):
        super().__init__()
        self.weight = nn.Parameter(torch.rand(d) + 0.5)

    def forward(self, x):
        return x / (x.abs().mean(-1, keepdim=True) + 1e-5) * self.weight


class RMSWrongAxis(nn.Module):
    """Llama RMSNorm reducing over axis 1 (tokens) with γ on the last axis."""

    def __init__(self, d: int = 16):
        super().__init__()
        self.weight = nn.Parameter(torch.rand(d) + 0.5)

    def forward(self, x):
        v = x.pow(2).mean(1, keepdim=True)
        return self.weight * (x * torch.rsqrt(v + 1e-6))


class RMSExtraOutput(nn.Module):
    """Llama RMSNorm whose inverse RMS is also returned."""

    def __init__(self, d: int = 16):
        super().__init__()
        self.weight = nn.Parameter(torch.rand(d) + 0.5)

    def forward(self, x):
        r = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
        return self.weight * (x * r), r


class RMSPow3(nn.Module):
    """mean(x³) instead of mean(x²)."""

    def __init__(self, d: int = 16):
        super().__init__()
        self.weight = nn.Parameter(torch.rand(d) + 0.5)

    def forward(self, x):
        return self.weight * (x * torch.rsqrt(x.pow(3).abs().mean(-1, keepdim=True) + 1e-6))


class FRNOneSpatialAxis(nn.Module):
    """FRN-like but ν² over H only (axis 2), not over all spatial axes."""

    def __init__(self, c: int = 8):
        super().__init__()
        self.gamma = nn.Parameter(torch.rand(1, c, 1, 1) + 0.5)
        self.beta = nn.Parameter(torch.randn(1, c, 1, 1) * 0.5)
        self.tau = nn.Parameter(torch.randn(1, c, 1, 1) * 0.5)

    def forward(self, x):
        nu2 = x.pow(2).mean(dim=2, keepdim=True)
        return torch.max(self.gamma * (x * torch.rsqrt(nu2 + 1e-6)) + self.beta, self.tau)


class GNInterleaved(nn.Module):
    """Group statistics over interleaved channels (view(N, C/G, G, H, W), reduce (1, 3, 4)):
    not GroupNorm, whose groups are contiguous channel blocks."""

    def __init__(self, c: int = 8, groups: int = 2):
        super().__init__()
        self.g = groups
        self.weight = nn.Parameter(torch.rand(c) + 0.5)
        self.bias = nn.Parameter(torch.randn(c) * 0.5)

    def forward(self, x):
        n, c, h, w = x.shape
        v = x.reshape(n, c // self.g, self.g, h, w)
        u = v.mean(dim=(1, 3, 4), keepdim=True)
        s = (v - u).pow(2).mean(dim=(1, 3, 4), keepdim=True)
        y = ((v - u) / torch.sqrt(s + 1e-5)).reshape(n, c, h, w)
        return y * self.weight[:, None, None] + self.bias[:, None, None]


class GNExtraOutput(nn.Module):
    """GroupNorm written by hand whose group variance is also a graph output."""

    def __init__(self, c: int = 8, groups: int = 4):
        super().__init__()
        self.g = groups
        self.weight = nn.Parameter(torch.rand(c) + 0.5)
        self.bias = nn.Parameter(torch.randn(c) * 0.5)

    def forward(self, x):
        n, c, h, w = x.shape
        v = x.reshape(n, self.g, -1)
        u = v.mean(-1, keepdim=True)
        s = (v - u).pow(2).mean(-1, keepdim=True)
        y = ((v - u) / torch.sqrt(s + 1e-5)).reshape(n, c, h, w)
        return y * self.weight[:, None, None] + self.bias[:, None, None], s


class GNByHand(nn.Module):
    """GroupNorm written by hand (reshape(N, G, -1), mean/var, reshape back, affine): positive case
    for a matcher that also accepts the decomposed form."""

    def __init__(self, c: int = 8, groups: int = 4):
        super().__init__()
        self.g = groups
        self.weight = nn.Parameter(torch.rand(c) + 0.5)
        self.bias = nn.Parameter(torch.randn(c) * 0.5)

    def forward(self, x):
        n, c, h, w = x.shape
        v = x.reshape(n, self.g, -1)
        u = v.mean(-1, keepdim=True)
        s = (v - u).pow(2).mean(-1, keepdim=True)
        y = ((v - u) / torch.sqrt(s + 1e-5)).reshape(n, c, h, w)
        return y * self.weight[:, None, None] + self.bias[:, None, None]


# ---------------------------------------------------------------------------------------------
# registry
# ---------------------------------------------------------------------------------------------

CASES: dict[str, tuple[Callable[[], nn.Module], tuple]] = {}
FAMILY: dict[str, str] = {}
NEGATIVE: set[str] = set()
NEGATIVE_REASON: dict[str, str] = {}


def _seed(name: str) -> int:
    return zlib.crc32(name.encode()) % 100_000


def _register(name: str, family: str, shape, build: Callable[[], nn.Module], negative: str | None = None):
    def factory() -> nn.Module:
        torch.manual_seed(_seed(name))
        return randomize_norms(build(), _seed(name) + 1)

    factory.__name__ = f"make_{name}"
    factory.__qualname__ = factory.__name__
    CASES[name] = (factory, tuple(shape))
    FAMILY[name] = family
    if negative:
        NEGATIVE.add(name)
        NEGATIVE_REASON[name] = negative


# GroupNorm
_register("gn1d_g4_silu", "groupnorm", (2, 4, 16), lambda: GNBlock(1, 4, 8, 4))
_register("gn2d_g4_silu", "groupnorm", (2, 3, 8, 8), lambda: GNBlock(2, 3, 8, 4))
_register("gn2d_g32_silu", "groupnorm", (1, 3, 6, 6), lambda: GNBlock(2, 3, 64, 32))
_register("gn2d_g1", "groupnorm", (2, 3, 8, 8), lambda: GNBlock(2, 3, 8, 1, act=None))
_register("gn2d_gC", "groupnorm", (2, 3, 8, 8), lambda: GNBlock(2, 3, 8, 8, act=None))
_register("gn2d_noaffine", "groupnorm", (2, 3, 8, 8), lambda: GNBlock(2, 3, 8, 4, affine=False, act=None))
_register("gn2d_noaffine_silu", "groupnorm", (2, 3, 8, 8), lambda: GNBlock(2, 3, 8, 4, affine=False))
_register("gn2d_g4_silu_manual", "groupnorm", (2, 3, 8, 8), lambda: GNBlock(2, 3, 8, 4, act="silu_manual"))
_register("gn2d_eps1e-6", "groupnorm", (2, 3, 8, 8), lambda: GNBlock(2, 3, 8, 2, act=None, eps=1e-6))
_register("gn3d_g2_silu", "groupnorm", (1, 4, 4, 6, 6), lambda: GNBlock(3, 4, 8, 2))
_register("gn2d_byhand", "groupnorm", (2, 8, 6, 6), lambda: GNByHand(8, 4))

# LayerNorm over the last axes
_register("ln_last1", "layernorm", (2, 5, 16), lambda: LNBlock(16, 16))
_register("ln_last2", "layernorm", (2, 5, 16), lambda: LNBlock(16, (5, 16)))
_register("ln_noaffine", "layernorm", (2, 5, 16), lambda: LNBlock(16, 16, elementwise_affine=False))
_register("ln_nobias", "layernorm", (2, 5, 16), lambda: LNBlock(16, 16, bias=False))
_register("ln_eps1e-6_2d", "layernorm", (6, 16), lambda: LNBlock(16, 16, eps=1e-6))

# channel-first LayerNorm
_register("ln2d_convnext", "layernorm_cf", (2, 8, 6, 6), lambda: ConvNeXtBlock(8, LayerNorm2d(8)))
_register("ln2d_permute", "layernorm_cf", (2, 8, 6, 6), lambda: ConvNeXtBlock(8, LayerNorm2dPermute(8)))

# RMSNorm
_register("rms_nn", "rmsnorm", (2, 5, 16), lambda: RMSBlock(16, nn.RMSNorm(16, eps=1e-6)))
_register("rms_nn_eps_none", "rmsnorm", (2, 5, 16), lambda: RMSBlock(16, nn.RMSNorm(16)))
_register("rms_nn_noaffine", "rmsnorm", (2, 5, 16), lambda: RMSBlock(16, nn.RMSNorm(16, eps=1e-5,
                                                                                        elementwise_affine=False)))
_register("rms_llama", "rmsnorm", (2, 5, 16), lambda: RMSBlock(16, RMSNormLlama(16)))
_register("rms_div_sqrt", "rmsnorm", (2, 5, 16), lambda: RMSBlock(16, RMSNormDivSqrt(16)))

# Filter Response Norm
_register("frn_tlu_learned_eps", "frn", (2, 3, 6, 6), lambda: FRNBlock(3, 8, FRN(8, learned_eps=True)))
_register("frn_tlu_fixed_eps", "frn", (2, 3, 6, 6), lambda: FRNBlock(3, 8, FRN(8)))
_register("frn_tlu_float_eps", "frn", (2, 3, 6, 6), lambda: FRNBlock(3, 8, FRNFloatEps(8)))
_register("frn_no_tlu", "frn", (2, 3, 6, 6), lambda: FRNBlock(3, 8, FRN(8, tlu=False)))
_register("frn_no_tlu_learned_eps", "frn", (2, 3, 6, 6), lambda: FRNBlock(3, 8, FRN(8, learned_eps=True, tlu=False)))

# weight norm / weight standardisation
_register("wn_conv_dim0", "weightnorm", (2, 3, 8, 8), lambda: WNConvBlock(0, seed=11))
_register("wn_conv_dim1", "weightnorm", (2, 3, 8, 8), lambda: WNConvBlock(1, seed=12))
_register("wn_linear_dim0", "weightnorm", (4, 16), lambda: WNLinearBlock(0, seed=13))
_register("wn_linear_dim1", "weightnorm", (4, 16), lambda: WNLinearBlock(1, seed=14))
_register("wn_conv_legacy", "weightnorm", (2, 3, 8, 8), lambda: WNConvBlock(0, legacy=True, seed=15))
_register("ws_conv_std", "weightstd", (2, 3, 8, 8), lambda: WSBlock("std"))
_register("ws_conv_var", "weightstd", (2, 3, 8, 8), lambda: WSBlock("var"))

# look-alikes
_register("neg_ln_var_axis_mismatch", "layernorm", (2, 5, 16), LNVarAxisMismatch,
          "variance reduced over axis -2, mean over -1")
_register("neg_ln2d_wrong_axis", "layernorm_cf", (2, 8, 6, 6), LN2dWrongAxis,
          "statistics over H (axis 2), γ/β on C (axis 1)")
_register("neg_ln_eps_outside_sqrt", "layernorm", (2, 5, 16), LNEpsOutsideSqrt,
          "(x-u)/(sqrt(var)+eps): eps outside the square root")
_register("neg_ln_unbiased_var", "layernorm", (2, 5, 16), LNUnbiasedVar,
          "unbiased variance (n-1)")
_register("neg_ln_runtime_gamma", "layernorm", ((2, 5, 16), (16,)), LNRuntimeGamma,
          "γ is a graph input, not a constant")
_register("neg_ln2d_extra_output", "layernorm_cf", (2, 8, 6, 6), LN2dExtraOutput,
          "the mean is also a graph output (exporters may CSE it with the LN's own mean)")
_register("neg_ln2d_shared_centered", "layernorm_cf", (2, 8, 6, 6), LN2dSharedCentered,
          "the centred tensor x-u has another consumer")
_register("neg_rms_abs_mean", "rmsnorm", (2, 5, 16), RMSAbsMean, "mean(|x|) instead of mean(x²), no sqrt")
_register("neg_rms_wrong_axis", "rmsnorm", (2, 5, 16), RMSWrongAxis, "reduces over axis 1, γ on the last axis")
_register("neg_rms_extra_output", "rmsnorm", (2, 5, 16), RMSExtraOutput, "1/rms is also a graph output")
_register("neg_rms_pow3", "rmsnorm", (2, 5, 16), RMSPow3, "mean(|x³|) instead of mean(x²)")
_register("neg_frn_one_spatial_axis", "frn", (2, 8, 6, 6), FRNOneSpatialAxis, "ν² over H only")
_register("neg_gn_interleaved", "groupnorm", (2, 8, 6, 6), GNInterleaved, "interleaved channel groups")
_register("neg_gn_extra_output", "groupnorm", (2, 8, 6, 6), GNExtraOutput, "group variance is also a graph output")


# (case names, exporter, opsets or None for all) -> reason. Checked by tests/test_norm_models.py.
KNOWN_EXPORT_FAILURES: list[tuple[frozenset, str, range | None, str]] = [
    (frozenset({"rms_nn", "rms_nn_eps_none", "rms_nn_noaffine"}), "torchscript", None,
     "TorchScript exporter has no symbolic for aten::rms_norm (torch.nn.RMSNorm), any opset"),
]


# The dynamo exporter builds opset 18 and down-converts with the onnx version converter. For graphs
# with a decomposed reduction (ReduceMean with an `axes` input: hand-written LN/RMS/FRN/GN, nn.RMSNorm,
# weight norm (ReduceL2), weight standardisation, most look-alikes) the conversion fails and torch
# silently returns the opset-18 model; export() raises ExportError("... the exporter wrote [18]") then.
# Opset 13 always falls back to 18. Exported fine at dynamo 17: nn.LayerNorm cases, nn.GroupNorm
# cases, ln2d_permute.
DYNAMO_BELOW_18 = "dynamo exporter cannot down-convert this graph below opset 18 (it writes opset 18)"


def is_downconvert_failure(exc: BaseException) -> bool:
    """True for the ExportError raised when dynamo wrote opset 18 instead of the lower one asked for."""
    return isinstance(exc, ExportError) and "the exporter wrote [18]" in str(exc)


def known_failure(name: str, exporter: str, opset: int) -> str | None:
    """Why (name, exporter, opset) cannot be exported, or None."""
    for names, ex, opsets, reason in KNOWN_EXPORT_FAILURES:
        if name in names and ex == exporter and (opsets is None or opset in opsets):
            return reason
    return None


def make(name: str) -> nn.Module:
    """The seeded eval-mode module of case `name`."""
    return CASES[name][0]()


def input_shapes(name: str) -> list[tuple[int, ...]]:
    shape = CASES[name][1]
    return [tuple(s) for s in shape] if shape and isinstance(shape[0], tuple) else [tuple(shape)]


def example_inputs(name: str, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Seeded float32 inputs for case `name` (a tuple, one tensor per forward argument)."""
    g = _gen(seed)
    return tuple(torch.randn(*s, generator=g) for s in input_shapes(name))


# ---------------------------------------------------------------------------------------------
# export with cache
# ---------------------------------------------------------------------------------------------

class ExportError(RuntimeError):
    """The exporter could not export this (module, exporter, opset, flags) combination."""


def cache_dir() -> Path:
    env = os.environ.get("NORMFOLD_EXPORT_CACHE")
    path = Path(env) if env else Path(__file__).resolve().parents[1] / ".pytest_cache" / "normfold-exports"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _versions() -> str:
    try:
        import onnxscript
        osv = onnxscript.__version__
    except Exception:  # pragma: no cover
        osv = "-"
    return f"{torch.__version__}|{onnx.__version__}|{osv}"


def _digest(module: nn.Module, args: tuple) -> str:
    h = hashlib.sha256(_versions().encode())
    for cls in type(module).__mro__:
        if cls.__module__.startswith("torch."):
            break
        with contextlib.suppress(OSError, TypeError):
            h.update(inspect.getsource(cls).encode())
    for m in module.modules():  # hand-written submodules' code
        if not type(m).__module__.startswith("torch."):
            with contextlib.suppress(OSError, TypeError):
                h.update(inspect.getsource(type(m)).encode())
    h.update(repr(module).encode())
    for k, v in module.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    for a in args:
        h.update(repr((tuple(a.shape), str(a.dtype))).encode())
    return h.hexdigest()[:16]


def input_names_for(module: nn.Module, n: int) -> list[str]:
    try:
        params = [p for p in inspect.signature(module.forward).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        names = [p.name for p in params][:n]
    except (TypeError, ValueError):
        names = []
    if len(names) != n:
        names = ["x"] + [f"x{i}" for i in range(1, n)]
    if n >= 1:
        names[0] = "x"
    return names


@contextlib.contextmanager
def _quiet():
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._dynamo", "onnxscript")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, lv in zip(loggers, levels):
            lg.setLevel(lv)


def _export_uncached(module, args, exporter, opset, constant_folding, n_out) -> onnx.ModelProto:
    names = input_names_for(module, len(args))
    out_names = ["y"] if n_out == 1 else [f"y{i}" for i in range(n_out)]
    with _quiet(), torch.no_grad():
        if exporter == "torchscript":
            buf = io.BytesIO()
            torch.onnx.export(module, args, buf, dynamo=False, opset_version=opset,
                              do_constant_folding=constant_folding, input_names=names, output_names=out_names)
            model = onnx.load_from_string(buf.getvalue())
        elif exporter == "dynamo":
            program = torch.onnx.export(module, args, dynamo=True, opset_version=opset, optimize=constant_folding,
                                        verbose=False, input_names=names, output_names=out_names)
            model = program.model_proto
        else:
            raise ValueError(f"exporter must be 'torchscript' or 'dynamo', not {exporter!r}")
    got = {op.version for op in model.opset_import if op.domain in ("", "ai.onnx")}
    if got != {opset}:
        raise ExportError(f"asked for opset {opset}, the exporter wrote {sorted(got)}")
    if model.ir_version > MAX_IR_VERSION:
        model.ir_version = MAX_IR_VERSION
    return model


def export(module: nn.Module, example_input, *, exporter: str, opset: int, constant_folding: bool = True,
           name: str | None = None, cache: bool = True) -> onnx.ModelProto:
    """Export `module` (put in eval mode) to ONNX and return a fresh ModelProto.

    example_input: a tensor or a tuple of tensors. exporter: "torchscript" (dynamo=False,
    `do_constant_folding=constant_folding`) or "dynamo" (`optimize=constant_folding`; the dynamo
    exporter's optimizer is its constant folding). Inputs are named after forward's arguments
    ("x" first), outputs "y" or "y0", "y1", .... ir_version is capped at 10.
    Cached on disk (see module docstring); `name` only makes the file name readable.
    Raises ExportError (also from the cache) when the exporter fails.
    """
    module.eval()
    args = tuple(example_input) if isinstance(example_input, (tuple, list)) else (example_input,)
    with torch.no_grad():
        out = module(*args)
    n_out = len(out) if isinstance(out, (tuple, list)) else 1
    stem = f"{name or type(module).__name__}-{exporter}-op{opset}-cf{int(constant_folding)}-{_digest(module, args)}"
    folder = cache_dir()
    path, err = folder / f"{stem}.onnx", folder / f"{stem}.err"
    if cache and path.exists():
        return onnx.load(str(path))
    if cache and err.exists():
        raise ExportError(err.read_text())
    try:
        model = _export_uncached(module, args, exporter, opset, constant_folding, n_out)
    except Exception as exc:  # the exporters raise many types
        msg = f"{exporter} opset {opset} cf={constant_folding}: {type(exc).__name__}: {str(exc).strip()[:2000]}"
        if cache:
            _atomic_write(err, msg.encode())
        raise ExportError(msg) from exc
    if cache:
        _atomic_write(path, model.SerializeToString())
    return model


def export_case(name: str, *, exporter: str, opset: int, constant_folding: bool = True,
                cache: bool = True) -> onnx.ModelProto:
    """export(make(name), example_inputs(name), ...)."""
    return export(make(name), example_inputs(name), exporter=exporter, opset=opset,
                  constant_folding=constant_folding, name=name, cache=cache)


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def torch_outputs(module: nn.Module, args: tuple) -> list:
    """The module's outputs as a list of numpy arrays."""
    with torch.no_grad():
        out = module(*args)
    out = out if isinstance(out, (tuple, list)) else (out,)
    return [o.detach().numpy() for o in out]
