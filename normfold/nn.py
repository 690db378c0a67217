"""Reference PyTorch layers for normalization methods PyTorch does not ship.

Each layer is written so that its ONNX export (eval mode, either exporter) has
the form a normfold pass recognises:

    BatchRenorm2d, L1BatchNorm2d   BatchNormalization       -> fold-bn folds it
    FilterResponseNorm2d           mean-square + Max(τ)     -> FilterResponseNorm
    LayerNorm2d                    decomposed over axis 1   -> LayerNorm (channel-first)
    RMSNorm                        x·rsqrt(mean(x²)+ε)·γ    -> RMSNorm / RMSNormalization
    CosineLinear                   s·w/‖w‖ from constants   -> weight computed offline
    SwitchableNorm2d               runtime IN/LN statistics -> kept as is

Formulas: ../shared/NORMS.md. Importing this module needs PyTorch; `import
normfold` does not.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["BatchRenorm2d", "CosineLinear", "FilterResponseNorm2d", "L1BatchNorm2d", "LayerNorm2d", "RMSNorm",
           "SwitchableNorm2d"]

_SPATIAL = (2, 3)
_BATCH_AXES = (0, 2, 3)


def _positive_int(value: int, what: str) -> int:
    if not isinstance(value, int) or value < 1:
        raise ValueError(f"{what} must be a positive integer, got {value!r}")
    return value


def _at_least(value: float, lowest: float, what: str, strict: bool = False) -> float:
    if not (value > lowest if strict else value >= lowest):
        raise ValueError(f"{what} must be {'>' if strict else '>='} {lowest:g}, got {value!r}")
    return float(value)


def _momentum(value: float) -> float:
    if not 0 <= value <= 1:
        raise ValueError(f"momentum must be in [0, 1], got {value!r}")
    return float(value)


def _values_per_channel(x: torch.Tensor, layer: str) -> int:
    """m = N·H·W, the count behind a batch statistic; training needs m > 1."""
    m = x.numel() // x.shape[1]
    if m < 2:
        raise ValueError(f"{layer} needs more than one value per channel in training, got input shape "
                         f"{tuple(x.shape)}")
    return m


def _move(running: torch.Tensor, batch: torch.Tensor, momentum: float) -> None:
    """running ← running + momentum · (batch − running), in place, outside autograd."""
    with torch.no_grad():
        running.lerp_(batch.detach().flatten(), momentum)


def _per_channel(v: torch.Tensor) -> torch.Tensor:
    """A [C] tensor shaped [1, C, 1, 1] to broadcast over NCHW."""
    return v[None, :, None, None]


def _check_nchw(x: torch.Tensor, channels: int, layer: str) -> None:
    if x.dim() != 4 or x.shape[1] != channels:
        raise ValueError(f"{layer} expects an N×{channels}×H×W input, got shape {tuple(x.shape)}")


class _BatchStatsNorm2d(nn.Module):
    """Per-channel γ/β and running mean over N, H, W; eval mode is plain BatchNorm.

    Subclasses compute the training-mode output and keep one running scale
    statistic; `_eval_variance()` turns it into the `var` of
    y = γ (x - mean) / sqrt(var + eps_bn) + β so that eval calls F.batch_norm
    (exported as BatchNormalization).
    """

    def __init__(self, num_features: int, eps: float, momentum: float):
        super().__init__()
        self.num_features = _positive_int(num_features, "num_features")
        self.eps = _at_least(eps, 0.0, "eps")
        self.momentum = _momentum(momentum)
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_nchw(x, self.num_features, type(self).__name__)
        if self.training:
            return self._train_forward(x)
        var, eps = self._eval_variance()
        return F.batch_norm(x, self.running_mean, var, self.weight, self.bias, False, 0.0, eps)

    def _affine(self, normalized: torch.Tensor) -> torch.Tensor:
        return normalized * _per_channel(self.weight) + _per_channel(self.bias)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps:g}, momentum={self.momentum:g}"


class BatchRenorm2d(_BatchStatsNorm2d):
    """Batch Renormalization (Ioffe 2017) over N, H, W of NCHW input.

    Training, with batch statistics μ_B, σ_B = sqrt(var_B + ε) (population
    variance) and running μ, σ = sqrt(running_var + ε):

        r = clip(σ_B / σ, 1/r_max, r_max)        d = clip((μ_B − μ) / σ, −d_max, d_max)
        y = γ · ((x − μ_B) / σ_B · r + d) + β     (r, d: no gradient)

    then μ ← μ + momentum (μ_B − μ), running_var ← running_var + momentum
    (var_B·m/(m−1) − running_var) as in nn.BatchNorm2d (m = N·H·W).
    Eval: y = γ (x − μ) / σ + β, i.e. BatchNorm with the running statistics.
    r_max = 1, d_max = 0 is plain BatchNorm training.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float = 0.1, r_max: float = 3.0,
                 d_max: float = 5.0):
        super().__init__(num_features, eps, momentum)
        self.r_max = _at_least(r_max, 1.0, "r_max")
        self.d_max = _at_least(d_max, 0.0, "d_max")
        self.register_buffer("running_var", torch.ones(num_features))

    def _train_forward(self, x: torch.Tensor) -> torch.Tensor:
        m = _values_per_channel(x, "BatchRenorm2d")
        mean = x.mean(_BATCH_AXES)
        var = x.var(_BATCH_AXES, unbiased=False)
        std = torch.sqrt(var + self.eps)
        with torch.no_grad():
            running_std = torch.sqrt(self.running_var + self.eps)
            r = (std / running_std).clamp(1 / self.r_max, self.r_max)
            d = ((mean - self.running_mean) / running_std).clamp(-self.d_max, self.d_max)
        normalized = (x - _per_channel(mean)) / _per_channel(std) * _per_channel(r) + _per_channel(d)
        _move(self.running_mean, mean, self.momentum)
        _move(self.running_var, var * m / (m - 1), self.momentum)
        return self._affine(normalized)

    def _eval_variance(self) -> tuple[torch.Tensor, float]:
        return self.running_var, self.eps

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, r_max={self.r_max:g}, d_max={self.d_max:g}"


class L1BatchNorm2d(_BatchStatsNorm2d):
    """L1-norm BatchNorm (Wu et al. 2018) over N, H, W of NCHW input.

    Training: σ_L1 = sqrt(π/2) · mean(|x − μ_B|) (the mean absolute deviation,
    scaled to equal σ for Gaussian data),

        y = γ (x − μ_B) / (σ_L1 + ε) + β

    and the running μ, σ_L1 move by `momentum` towards the batch values.
    Eval: y = γ (x − μ) / (σ_L1 + ε) + β, computed as BatchNorm with
    var = (σ_L1 + ε)² and epsilon 0, so it exports as BatchNormalization.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float = 0.1):
        super().__init__(num_features, eps, momentum)
        self.register_buffer("running_scale", torch.ones(num_features))

    def _train_forward(self, x: torch.Tensor) -> torch.Tensor:
        _values_per_channel(x, "L1BatchNorm2d")
        mean = x.mean(_BATCH_AXES)
        centered = x - _per_channel(mean)
        scale = math.sqrt(math.pi / 2) * centered.abs().mean(_BATCH_AXES)
        _move(self.running_mean, mean, self.momentum)
        _move(self.running_scale, scale, self.momentum)
        return self._affine(centered / _per_channel(scale + self.eps))

    def _eval_variance(self) -> tuple[torch.Tensor, float]:
        return (self.running_scale + self.eps) ** 2, 0.0


class SwitchableNorm2d(nn.Module):
    """Switchable Normalization (Luo et al. 2018) of NCHW input.

    Statistics of Instance Norm (per n, c over H, W), Layer Norm (per n over
    C, H, W) and Batch Norm (per c over N, H, W; the running statistics in
    eval mode), all population variances, mixed with softmax weights:

        μ = Σ_k softmax(λ_μ)_k μ_k     σ² = Σ_k softmax(λ_σ)_k σ²_k     k ∈ (IN, LN, BN)
        y = γ (x − μ) / sqrt(σ² + ε) + β

    In training the running mean/var move by `momentum` towards the batch
    mean and unbiased batch variance, as in nn.BatchNorm2d.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float = 0.1):
        super().__init__()
        self.num_features = _positive_int(num_features, "num_features")
        self.eps = _at_least(eps, 0.0, "eps", strict=True)
        self.momentum = _momentum(momentum)
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.mean_weight = nn.Parameter(torch.ones(3))
        self.var_weight = nn.Parameter(torch.ones(3))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_nchw(x, self.num_features, type(self).__name__)
        mean_in = x.mean(_SPATIAL, keepdim=True)
        var_in = (x - mean_in).pow(2).mean(_SPATIAL, keepdim=True)
        mean_ln, var_ln = _pooled(mean_in, var_in, 1)
        if self.training:
            m = _values_per_channel(x, "SwitchableNorm2d")
            mean_bn, var_bn = _pooled(mean_in, var_in, 0)
            _move(self.running_mean, mean_bn, self.momentum)
            _move(self.running_var, var_bn * m / (m - 1), self.momentum)
        else:
            mean_bn, var_bn = _per_channel(self.running_mean), _per_channel(self.running_var)
        wm, wv = self.mean_weight.softmax(0), self.var_weight.softmax(0)
        mean = wm[0] * mean_in + wm[1] * mean_ln + wm[2] * mean_bn
        var = wv[0] * var_in + wv[1] * var_ln + wv[2] * var_bn
        normalized = (x - mean) / torch.sqrt(var + self.eps)
        return normalized * _per_channel(self.weight) + _per_channel(self.bias)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps:g}, momentum={self.momentum:g}"


def _pooled(mean: torch.Tensor, var: torch.Tensor, axis: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and population variance of equal-sized groups pooled over `axis`
    (law of total variance: mean of the variances plus variance of the means)."""
    pooled_mean = mean.mean(axis, keepdim=True)
    return pooled_mean, (var + (mean - pooled_mean).pow(2)).mean(axis, keepdim=True)


class FilterResponseNorm2d(nn.Module):
    """Filter Response Normalization with Thresholded Linear Unit (Singh & Krishnan 2019).

        ν² = mean over H, W of x²              (per n, c; no mean subtraction)
        y  = γ · x / sqrt(ν² + ε) + β          ε = eps, or eps + |ε_l| with learnable_eps
        z  = max(y, τ)                          (TLU; y if tlu=False)

    γ, β, τ are per channel; the learned ε_l starts at 1e-4.
    """

    def __init__(self, num_features: int, eps: float = 1e-6, learnable_eps: bool = False, tlu: bool = True):
        super().__init__()
        self.num_features = _positive_int(num_features, "num_features")
        self.eps = _at_least(eps, 0.0, "eps")
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.tau = nn.Parameter(torch.zeros(num_features)) if tlu else None
        self.eps_l = nn.Parameter(torch.full((1,), 1e-4)) if learnable_eps else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_nchw(x, self.num_features, type(self).__name__)
        eps = self.eps if self.eps_l is None else self.eps + self.eps_l.abs()
        nu2 = x.pow(2).mean(_SPATIAL, keepdim=True)
        y = x * torch.rsqrt(nu2 + eps) * _per_channel(self.weight) + _per_channel(self.bias)
        return y if self.tau is None else torch.max(y, _per_channel(self.tau))

    def extra_repr(self) -> str:
        return (f"{self.num_features}, eps={self.eps:g}, learnable_eps={self.eps_l is not None}, "
                f"tlu={self.tau is not None}")


class LayerNorm2d(nn.Module):
    """Channel-first LayerNorm of NCHW input, as in ConvNeXt (per n, h, w over C):

        μ = mean_c x     σ² = mean_c (x − μ)²     y = γ (x − μ) / sqrt(σ² + ε) + β
    """

    def __init__(self, num_channels: int, eps: float = 1e-6):
        super().__init__()
        self.num_channels = _positive_int(num_channels, "num_channels")
        self.eps = _at_least(eps, 0.0, "eps")
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() < 3 or x.shape[1] != self.num_channels:
            raise ValueError(f"LayerNorm2d expects an N×{self.num_channels}×... input, got shape {tuple(x.shape)}")
        mean = x.mean(1, keepdim=True)
        var = (x - mean).pow(2).mean(1, keepdim=True)
        normalized = (x - mean) / torch.sqrt(var + self.eps)
        tail = (1,) * (x.dim() - 2)
        return self.weight.view(-1, *tail) * normalized + self.bias.view(-1, *tail)

    def extra_repr(self) -> str:
        return f"{self.num_channels}, eps={self.eps:g}"


class RMSNorm(nn.Module):
    """Root-mean-square LayerNorm (Zhang & Sennrich 2019) over the last axis:

        y = x · rsqrt(mean(x²) + ε) · γ

    Written out (not torch.nn.RMSNorm, which the TorchScript exporter cannot
    export) in the form normfold's RMSNorm matcher recognises.
    """

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.dim = _positive_int(dim, "dim")
        self.eps = _at_least(eps, 0.0, "eps")
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() < 1 or x.shape[-1] != self.dim:
            raise ValueError(f"RMSNorm expects an input whose last axis is {self.dim}, got shape {tuple(x.shape)}")
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight

    def extra_repr(self) -> str:
        return f"{self.dim}, eps={self.eps:g}"


class CosineLinear(nn.Module):
    """Cosine normalization (Luo et al. 2017) of a linear layer:

        y = s · (x / ‖x‖) · (w / ‖w‖)ᵀ      ‖w‖ per output row; ‖·‖ ≥ eps

    The weight side s · w/‖w‖ depends on parameters only, so in an exported
    model it is a subgraph over constants that normfold computes offline.
    """

    def __init__(self, in_features: int, out_features: int, scale: float = 1.0, eps: float = 1e-12):
        super().__init__()
        self.in_features = _positive_int(in_features, "in_features")
        self.out_features = _positive_int(out_features, "out_features")
        self.scale = float(scale)
        self.eps = _at_least(eps, 0.0, "eps", strict=True)
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() < 1 or x.shape[-1] != self.in_features:
            raise ValueError(f"CosineLinear expects an input whose last axis is {self.in_features}, "
                             f"got shape {tuple(x.shape)}")
        return F.linear(F.normalize(x, dim=-1, eps=self.eps), self.normalized_weight())

    def normalized_weight(self) -> torch.Tensor:
        """s · w / max(‖w‖, eps), one row per output."""
        return self.scale * F.normalize(self.weight, dim=1, eps=self.eps)

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, scale={self.scale:g}"
