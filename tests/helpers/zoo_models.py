"""Model zoo: real architectures built from code with seeded random weights (no downloads).

    from tests.helpers.zoo_models import ZOO, build
    module, args = build("resnet50")            # eval mode, inference input 1x3x224x224
    module, args = build("resnet50", tiny=True)  # same structure, small widths and input

Every network is written here, faithful in structure and sizes to its reference:
ResNet-50 (torchvision), MobileNetV3-Small (torchvision: hardswish, squeeze-excitation
with hardsigmoid), ConvNeXt-T (facebookresearch/ConvNeXt: channel-first LayerNorm in the
stem and downsampling layers, channels-last LayerNorm in the blocks) and its conv-MLP
variant (timm `conv_mlp=True`: channel-first LayerNorm in every block), a pre-activation
ResNet-18 (He et al. 2016, BN -> ReLU -> Conv, MXNet-style BN on the input), a diffusion
U-Net down/mid block (GroupNorm(32) + SiLU ResBlocks, self-attention), a ViT-S/16
transformer encoder (LayerNorm), a Llama-style decoder (RMSNorm written as
x * rsqrt(mean(x²) + eps) * w, RoPE, SwiGLU) and a Filter-Response-Norm ResNet-50
(FRN + TLU after every conv, as in Singh & Krishnan 2019).

BatchNorm running statistics are calibrated on a random batch and then perturbed, and
every norm's γ/β (FRN's τ) is random, so that folds and fusions change real numbers
while activations keep a sane scale through 50 layers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from torch.nn import functional as F

from tests.helpers.norm_models import FRN, LayerNorm2d, RMSNormLlama, randomize_norms

SEED = 0


# ---------------------------------------------------------------------------------------------
# ResNet-50 and the FRN ResNet-50 (torchvision's Bottleneck, v1.5: stride on the 3x3 conv)
# ---------------------------------------------------------------------------------------------

class BNAct(nn.Sequential):
    """BatchNorm, then ReLU unless `act` is False."""

    def __init__(self, c: int, act: bool = True):
        super().__init__(nn.BatchNorm2d(c), *([nn.ReLU()] if act else []))


class FRNAct(FRN):
    """Filter Response Norm with TLU (`act`) or without."""

    def __init__(self, c: int, act: bool = True):
        super().__init__(c, tlu=act)


class Bottleneck(nn.Module):
    """1x1 -> 3x3 (stride) -> 1x1 (x4), each followed by `norm`; projection shortcut on change."""

    def __init__(self, cin: int, width: int, stride: int, norm: Callable[..., nn.Module]):
        super().__init__()
        cout = 4 * width
        self.conv1, self.n1 = nn.Conv2d(cin, width, 1, bias=False), norm(width)
        self.conv2, self.n2 = nn.Conv2d(width, width, 3, stride, 1, bias=False), norm(width)
        self.conv3, self.n3 = nn.Conv2d(width, cout, 1, bias=False), norm(cout, act=False)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), norm(cout, act=False))

    def forward(self, x):
        y = self.n3(self.conv3(self.n2(self.conv2(self.n1(self.conv1(x))))))
        return F.relu(y + (x if self.down is None else self.down(x)))


class ResNet(nn.Module):
    """ResNet with Bottleneck blocks: stem 7x7/2 + maxpool, four stages, pool, fc."""

    def __init__(self, layers=(3, 4, 6, 3), width: int = 64, classes: int = 1000,
                 norm: Callable[..., nn.Module] = BNAct):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 7, 2, 3, bias=False), norm(width), nn.MaxPool2d(3, 2, 1))
        blocks, cin = [], width
        for i, n in enumerate(layers):
            w = width * 2**i
            for j in range(n):
                blocks.append(Bottleneck(cin, w, 2 if (i > 0 and j == 0) else 1, norm))
                cin = 4 * w
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(cin, classes)

    def forward(self, x):
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.blocks(self.stem(x)), 1), 1))


# ---------------------------------------------------------------------------------------------
# pre-activation ResNet-18 (He et al., "Identity Mappings in Deep Residual Networks")
# ---------------------------------------------------------------------------------------------

class PreActBlock(nn.Module):
    """BN -> ReLU -> conv3x3 (stride) -> BN -> ReLU -> conv3x3, + shortcut (1x1 conv of the
    pre-activated input when the shape changes)."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(cin), nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2, self.conv2 = nn.BatchNorm2d(cout), nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.short = nn.Conv2d(cin, cout, 1, stride, bias=False) if stride != 1 or cin != cout else None

    def forward(self, x):
        a = F.relu(self.bn1(x))
        y = self.conv2(F.relu(self.bn2(self.conv1(a))))
        return y + (x if self.short is None else self.short(a))


class PreActResNet(nn.Module):
    """Pre-activation ResNet-18: BN on the input (MXNet resnetv2's `bn_data`), stem conv 7x7/2,
    BN-ReLU, maxpool, four stages of PreActBlocks, final BN-ReLU, pool, fc."""

    def __init__(self, layers=(2, 2, 2, 2), width: int = 64, classes: int = 1000):
        super().__init__()
        self.bn_data = nn.BatchNorm2d(3)
        self.stem = nn.Sequential(nn.Conv2d(3, width, 7, 2, 3, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
                                  nn.MaxPool2d(3, 2, 1))
        blocks, cin = [], width
        for i, n in enumerate(layers):
            cout = width * 2**i
            for j in range(n):
                blocks.append(PreActBlock(cin, cout, 2 if (i > 0 and j == 0) else 1))
                cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.bn_final = nn.BatchNorm2d(cin)
        self.fc = nn.Linear(cin, classes)

    def forward(self, x):
        y = F.relu(self.bn_final(self.blocks(self.stem(self.bn_data(x)))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(y, 1), 1))


# ---------------------------------------------------------------------------------------------
# MobileNetV3-Small (torchvision's configuration)
# ---------------------------------------------------------------------------------------------

def _divisible(v: float, d: int = 8) -> int:
    """torchvision's _make_divisible: round to a multiple of d, never below 90% of v."""
    new = max(d, int(v + d / 2) // d * d)
    return new + d if new < 0.9 * v else new


def _conv_bn(cin: int, cout: int, k: int, stride: int = 1, groups: int = 1, act: type | None = None) -> nn.Sequential:
    layers = [nn.Conv2d(cin, cout, k, stride, (k - 1) // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
    return nn.Sequential(*layers, *([act()] if act else []))


class SqueezeExcite(nn.Module):
    """pool -> 1x1 conv -> ReLU -> 1x1 conv -> hardsigmoid -> scale."""

    def __init__(self, c: int):
        super().__init__()
        squeeze = _divisible(c // 4)
        self.fc1, self.fc2 = nn.Conv2d(c, squeeze, 1), nn.Conv2d(squeeze, c, 1)

    def forward(self, x):
        return x * F.hardsigmoid(self.fc2(F.relu(self.fc1(F.adaptive_avg_pool2d(x, 1)))))


class InvertedResidual(nn.Module):
    """expand 1x1 -> depthwise kxk (stride) -> SE -> project 1x1, residual when shapes match."""

    def __init__(self, cin: int, k: int, exp: int, cout: int, se: bool, act: type, stride: int):
        super().__init__()
        layers = [] if exp == cin else [_conv_bn(cin, exp, 1, act=act)]
        layers.append(_conv_bn(exp, exp, k, stride, groups=exp, act=act))
        if se:
            layers.append(SqueezeExcite(exp))
        layers.append(_conv_bn(exp, cout, 1))
        self.block = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        y = self.block(x)
        return x + y if self.residual else y


# kernel, expanded channels, out channels, SE, activation, stride (torchvision mobilenet_v3_small)
_MNV3_SMALL = [
    (3, 16, 16, True, nn.ReLU, 2), (3, 72, 24, False, nn.ReLU, 2), (3, 88, 24, False, nn.ReLU, 1),
    (5, 96, 40, True, nn.Hardswish, 2), (5, 240, 40, True, nn.Hardswish, 1), (5, 240, 40, True, nn.Hardswish, 1),
    (5, 120, 48, True, nn.Hardswish, 1), (5, 144, 48, True, nn.Hardswish, 1), (5, 288, 96, True, nn.Hardswish, 2),
    (5, 576, 96, True, nn.Hardswish, 1), (5, 576, 96, True, nn.Hardswish, 1),
]


class MobileNetV3Small(nn.Module):
    """stem 3x3/2 (16, hardswish), 11 inverted residuals, 1x1 to 576, pool, 1024 hardswish, classes."""

    def __init__(self, classes: int = 1000):
        super().__init__()
        layers, cin = [_conv_bn(3, 16, 3, 2, act=nn.Hardswish)], 16
        for k, exp, cout, se, act, stride in _MNV3_SMALL:
            layers.append(InvertedResidual(cin, k, exp, cout, se, act, stride))
            cin = cout
        layers.append(_conv_bn(cin, 6 * cin, 1, act=nn.Hardswish))
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.Linear(6 * cin, 1024), nn.Hardswish(), nn.Linear(1024, classes))

    def forward(self, x):
        return self.head(torch.flatten(F.adaptive_avg_pool2d(self.features(x), 1), 1))


# ---------------------------------------------------------------------------------------------
# ConvNeXt-T (facebookresearch/ConvNeXt models/convnext.py) and its conv-MLP variant
# ---------------------------------------------------------------------------------------------

class ConvNeXtBlock(nn.Module):
    """dwconv 7x7 -> LayerNorm -> pointwise 4x -> GELU -> pointwise -> layer scale, + x.
    Official: permute to channels-last, nn.LayerNorm, Linear layers. conv_mlp: channel-first
    LayerNorm2d and 1x1 convs (timm)."""

    def __init__(self, c: int, conv_mlp: bool):
        super().__init__()
        self.conv_mlp = conv_mlp
        self.dw = nn.Conv2d(c, c, 7, padding=3, groups=c)
        if conv_mlp:
            self.norm, self.pw1, self.pw2 = LayerNorm2d(c), nn.Conv2d(c, 4 * c, 1), nn.Conv2d(4 * c, c, 1)
        else:
            self.norm, self.pw1, self.pw2 = nn.LayerNorm(c, eps=1e-6), nn.Linear(c, 4 * c), nn.Linear(4 * c, c)
        self.gamma = nn.Parameter(torch.empty(c).uniform_(0.1, 1.0))  # layer scale, trained-like magnitude

    def forward(self, x):
        y = self.dw(x)
        if self.conv_mlp:
            return x + self.pw2(F.gelu(self.pw1(self.norm(y)))) * self.gamma[:, None, None]
        y = self.pw2(F.gelu(self.pw1(self.norm(y.permute(0, 2, 3, 1))))) * self.gamma
        return x + y.permute(0, 3, 1, 2)


class ConvNeXt(nn.Module):
    """stem 4x4/4 conv + LayerNorm2d; per stage (downsample: LayerNorm2d + 2x2/2 conv) blocks;
    global pool, LayerNorm, head."""

    def __init__(self, depths=(3, 3, 9, 3), dims=(96, 192, 384, 768), classes: int = 1000, conv_mlp: bool = False):
        super().__init__()
        stages = [nn.Sequential(nn.Conv2d(3, dims[0], 4, 4), LayerNorm2d(dims[0]))]
        for i, (depth, c) in enumerate(zip(depths, dims)):
            down = [] if i == 0 else [LayerNorm2d(dims[i - 1]), nn.Conv2d(dims[i - 1], c, 2, 2)]
            stages.append(nn.Sequential(*down, *(ConvNeXtBlock(c, conv_mlp) for _ in range(depth))))
        self.stages = nn.Sequential(*stages)
        self.norm = nn.LayerNorm(dims[-1], eps=1e-6)
        self.head = nn.Linear(dims[-1], classes)

    def forward(self, x):
        return self.head(self.norm(self.stages(x).mean([-2, -1])))


# ---------------------------------------------------------------------------------------------
# diffusion U-Net down + mid block (GroupNorm(32) + SiLU), Stable-Diffusion-like
# ---------------------------------------------------------------------------------------------

class ResBlock(nn.Module):
    """GN -> SiLU -> conv3x3 -> GN -> SiLU -> conv3x3, + (1x1 conv) shortcut."""

    def __init__(self, cin: int, cout: int, groups: int):
        super().__init__()
        self.n1, self.conv1 = nn.GroupNorm(groups, cin, eps=1e-5), nn.Conv2d(cin, cout, 3, padding=1)
        self.n2, self.conv2 = nn.GroupNorm(groups, cout, eps=1e-5), nn.Conv2d(cout, cout, 3, padding=1)
        self.short = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x):
        y = self.conv1(F.silu(self.n1(x)))
        return self.short(x) + self.conv2(F.silu(self.n2(y)))


class AttnBlock(nn.Module):
    """GN -> q, k, v 1x1 convs -> single-head softmax attention over positions -> 1x1 proj, + x."""

    def __init__(self, c: int, groups: int):
        super().__init__()
        self.norm = nn.GroupNorm(groups, c, eps=1e-5)
        self.q, self.k, self.v, self.proj = (nn.Conv2d(c, c, 1) for _ in range(4))

    def forward(self, x):
        n, c, h, w = x.shape
        y = self.norm(x)
        q = self.q(y).reshape(n, c, h * w).transpose(1, 2)
        k = self.k(y).reshape(n, c, h * w)
        v = self.v(y).reshape(n, c, h * w).transpose(1, 2)
        a = torch.softmax(q @ k / math.sqrt(c), dim=-1)
        return x + self.proj((a @ v).transpose(1, 2).reshape(n, c, h, w))


class UNetBlock(nn.Module):
    """conv_in, two ResBlocks, downsample (3x3/2), two ResBlocks with attention after each,
    mid (ResBlock, attention, ResBlock), GN -> SiLU -> conv_out."""

    def __init__(self, cin: int = 4, ch: int = 128, groups: int = 32):
        super().__init__()
        c2 = 2 * ch
        self.conv_in = nn.Conv2d(cin, ch, 3, padding=1)
        self.body = nn.Sequential(
            ResBlock(ch, ch, groups), ResBlock(ch, ch, groups), nn.Conv2d(ch, ch, 3, 2, 1),
            ResBlock(ch, c2, groups), AttnBlock(c2, groups), ResBlock(c2, c2, groups), AttnBlock(c2, groups),
            ResBlock(c2, c2, groups), AttnBlock(c2, groups), ResBlock(c2, c2, groups),
        )
        self.norm_out, self.conv_out = nn.GroupNorm(groups, c2), nn.Conv2d(c2, cin, 3, padding=1)

    def forward(self, x):
        return self.conv_out(F.silu(self.norm_out(self.body(self.conv_in(x)))))


# ---------------------------------------------------------------------------------------------
# transformers: ViT-S/16 encoder (LayerNorm) and a Llama-style decoder (RMSNorm)
# ---------------------------------------------------------------------------------------------

def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(n, t, d) -> (n, heads, t, d / heads)."""
    n, t, d = x.shape
    return x.reshape(n, t, heads, d // heads).transpose(1, 2)


def _attend(q, k, v, mask=None) -> torch.Tensor:
    """softmax(q kᵀ / √d (+ mask)) v over (n, heads, t, dh) tensors, back to (n, t, d)."""
    s = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    out = torch.softmax(s if mask is None else s + mask, dim=-1) @ v
    n, h, t, dh = out.shape
    return out.transpose(1, 2).reshape(n, t, h * dh)


class EncoderLayer(nn.Module):
    """Pre-norm transformer encoder layer: x + attn(LN(x)), x + MLP(LN(x)) with GELU."""

    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln1, self.qkv, self.proj = nn.LayerNorm(d, eps=1e-6), nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.ln2, self.fc1, self.fc2 = nn.LayerNorm(d, eps=1e-6), nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x):
        q, k, v = (_heads(t, self.heads) for t in self.qkv(self.ln1(x)).chunk(3, dim=-1))
        x = x + self.proj(_attend(q, k, v))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class ViT(nn.Module):
    """ViT-S/16: patch embedding conv, class token, learned positions, 12 layers, final LN, head."""

    def __init__(self, image: int = 224, patch: int = 16, d: int = 384, depth: int = 12, heads: int = 6,
                 classes: int = 1000):
        super().__init__()
        self.embed = nn.Conv2d(3, d, patch, patch)
        self.cls = nn.Parameter(torch.randn(1, 1, d) * 0.02)
        self.pos = nn.Parameter(torch.randn(1, (image // patch) ** 2 + 1, d) * 0.02)
        self.layers = nn.Sequential(*(EncoderLayer(d, heads) for _ in range(depth)))
        self.norm, self.head = nn.LayerNorm(d, eps=1e-6), nn.Linear(d, classes)

    def forward(self, x):
        tokens = self.embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(tokens.shape[0], -1, -1), tokens], dim=1) + self.pos
        return self.head(self.norm(self.layers(x))[:, 0])


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=-1)
    return torch.cat([-b, a], dim=-1)


class LlamaLayer(nn.Module):
    """x + o(attn(RoPE(q), RoPE(k), v, causal)) over RMSNorm(x); x + down(silu(gate) * up) over RMSNorm(x)."""

    def __init__(self, d: int, heads: int, ffn: int):
        super().__init__()
        self.heads = heads
        self.attn_norm, self.mlp_norm = RMSNormLlama(d), RMSNormLlama(d)
        self.q, self.k, self.v, self.o = (nn.Linear(d, d, bias=False) for _ in range(4))
        self.gate, self.up = nn.Linear(d, ffn, bias=False), nn.Linear(d, ffn, bias=False)
        self.down = nn.Linear(ffn, d, bias=False)

    def forward(self, x, cos, sin, mask):
        h = self.attn_norm(x)
        q, k, v = (_heads(p(h), self.heads) for p in (self.q, self.k, self.v))
        q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
        x = x + self.o(_attend(q, k, v, mask))
        h = self.mlp_norm(x)
        return x + self.down(F.silu(self.gate(h)) * self.up(h))


class Llama(nn.Module):
    """Token embedding, decoder layers, final RMSNorm, LM head; RoPE tables and the causal
    mask are buffers for a fixed sequence length."""

    def __init__(self, vocab: int = 8192, d: int = 512, depth: int = 8, heads: int = 8, ffn: int = 1408,
                 seq: int = 128, theta: float = 10000.0):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.layers = nn.ModuleList(LlamaLayer(d, heads, ffn) for _ in range(depth))
        self.norm, self.head = RMSNormLlama(d), nn.Linear(d, vocab, bias=False)
        dh = d // heads
        freqs = torch.outer(torch.arange(seq, dtype=torch.float32), theta ** (-torch.arange(0, dh, 2) / dh))
        angles = torch.cat([freqs, freqs], dim=-1)
        self.register_buffer("cos", angles.cos())
        self.register_buffer("sin", angles.sin())
        self.register_buffer("mask", torch.full((seq, seq), float("-inf")).triu(1))

    def forward(self, tokens):
        x = self.embed(tokens)
        for layer in self.layers:
            x = layer(x, self.cos, self.sin, self.mask)
        return self.head(self.norm(x))


# ---------------------------------------------------------------------------------------------
# registry
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ZooModel:
    """A zoo entry: `family` is the norm that matters ("bn", "gn", "ln_cf", "ln", "rms", "frn");
    `full`/`tiny` build the module and give its input shape; `tokens` = vocabulary size of an
    int64 token input (None: float input)."""

    name: str
    family: str
    full: Callable[[], nn.Module]
    full_shape: tuple[int, ...]
    tiny: Callable[[], nn.Module]
    tiny_shape: tuple[int, ...]
    tokens: int | None = None
    about: str = ""


ZOO: dict[str, ZooModel] = {m.name: m for m in (
    ZooModel("resnet50", "bn", ResNet, (1, 3, 224, 224),
             lambda: ResNet((1, 1, 1, 1), width=8, classes=10), (1, 3, 32, 32),
             about="ResNet-50 (torchvision v1.5)"),
    ZooModel("mobilenet_v3_small", "bn", MobileNetV3Small, (1, 3, 224, 224),
             lambda: MobileNetV3Small(classes=10), (1, 3, 32, 32),
             about="MobileNetV3-Small (hardswish, SE)"),
    ZooModel("preact_resnet18", "bn", PreActResNet, (1, 3, 224, 224),
             lambda: PreActResNet((1, 1, 1, 1), width=8, classes=10), (1, 3, 32, 32),
             about="pre-activation ResNet-18 (BN -> ReLU -> Conv, BN on the input)"),
    ZooModel("convnext_t", "ln_cf", ConvNeXt, (1, 3, 224, 224),
             lambda: ConvNeXt((1, 1, 1, 1), (8, 16, 32, 64), classes=10), (1, 3, 32, 32),
             about="ConvNeXt-T (official: channel-first LN in stem/downsampling, channels-last LN in blocks)"),
    ZooModel("convnext_t_convmlp", "ln_cf", lambda: ConvNeXt(conv_mlp=True), (1, 3, 224, 224),
             lambda: ConvNeXt((1, 1, 1, 1), (8, 16, 32, 64), classes=10, conv_mlp=True), (1, 3, 32, 32),
             about="ConvNeXt-T, conv-MLP variant (channel-first LN in every block)"),
    ZooModel("unet_gn", "gn", UNetBlock, (1, 4, 64, 64),
             lambda: UNetBlock(4, 32, 8), (1, 4, 8, 8),
             about="diffusion U-Net down+mid block (GroupNorm(32)+SiLU, attention), 128/256 channels"),
    ZooModel("vit_s16", "ln", ViT, (1, 3, 224, 224),
             lambda: ViT(image=32, patch=8, d=32, depth=2, heads=2, classes=10), (1, 3, 32, 32),
             about="ViT-S/16 encoder (pre-norm LayerNorm)"),
    ZooModel("llama", "rms", Llama, (1, 128),
             lambda: Llama(vocab=64, d=32, depth=2, heads=2, ffn=64, seq=8), (1, 8), tokens=64,
             about="Llama-style decoder (RMSNorm x*rsqrt(mean(x²)+eps)*w, RoPE, SwiGLU), d 512, 8 layers"),
    ZooModel("frn_resnet50", "frn", lambda: ResNet(norm=FRNAct), (1, 3, 224, 224),
             lambda: ResNet((1, 1, 1, 1), width=8, classes=10, norm=FRNAct), (1, 3, 32, 32),
             about="ResNet-50 with FRN+TLU in place of BN+ReLU"),
)}


def example_inputs(entry: ZooModel, tiny: bool = False, seed: int = SEED) -> tuple[torch.Tensor, ...]:
    """A seeded input tuple for `entry` (token ids in [0, vocab) for token models)."""
    g = torch.Generator().manual_seed(seed)
    shape = entry.tiny_shape if tiny else entry.full_shape
    if entry.tokens:
        return (torch.randint(0, entry.tokens, shape, generator=g),)
    return (torch.randn(*shape, generator=g),)


def build(name: str, tiny: bool = False) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """The seeded eval-mode module `name` (random norm parameters, calibrated BN statistics)
    and an example input tuple."""
    entry = ZOO[name]
    torch.manual_seed(SEED)
    module = (entry.tiny if tiny else entry.full)()
    args = example_inputs(entry, tiny)
    calibrate_batchnorm(module, args, seed=SEED + 1)
    randomize_norms(module, SEED + 2)  # γ/β of GN/LN/RMS/FRN; BN statistics are set below
    perturb_batchnorm(module, seed=SEED + 3)
    return module.eval(), args


def _batchnorms(module: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def calibrate_batchnorm(module: nn.Module, args: tuple[torch.Tensor, ...], seed: int, batch: int = 4) -> None:
    """Set every BN's running mean/var to the statistics it sees on a random batch like `args`."""
    bns = _batchnorms(module)
    if not bns:
        return
    g = torch.Generator().manual_seed(seed)
    x = args[0]
    sample = (torch.randn((batch, *x.shape[1:]), generator=g),) if x.is_floating_point() else args
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average
    module.train()
    with torch.no_grad():
        module(*sample)
    module.eval()


def perturb_batchnorm(module: nn.Module, seed: int) -> None:
    """Shift each BN mean by ±0.1 std, scale its variance by U(0.7, 1.4), random γ in ±[0.5, 1.5]
    (20% negative) and β ~ N(0, 0.2): non-trivial folds, activations of a sane scale."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for bn in _batchnorms(module):
            c = bn.num_features
            std = bn.running_var.sqrt()
            bn.running_mean.add_(0.1 * std * torch.randn(c, generator=g))
            bn.running_var.mul_(0.7 + 0.7 * torch.rand(c, generator=g))
            sign = torch.where(torch.rand(c, generator=g) < 0.2, -1.0, 1.0)
            bn.weight.copy_((0.5 + torch.rand(c, generator=g)) * sign)
            bn.bias.copy_(0.2 * torch.randn(c, generator=g))
