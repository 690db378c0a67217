"""normfold.nn reference layers.

Forward passes are checked against direct numpy (float64) implementations of
the papers' formulas, in training and eval mode (running-statistic updates
included), and against PyTorch's own layers where a setting reduces to one.
Each layer, inside a tiny model, is exported with both exporters and run
through normfold's passes; the result holds the expected op and computes
what the PyTorch module computes (onnxruntime with normfold's op library).
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from onnx import numpy_helper
from torch import nn

import normfold
import tests.helpers.norm_models as zoo
from normfold import nn as nfnn
from normfold.runtime.session import make_session

RTOL = 1e-5  # fp32 forward vs float64 numpy, relative to the output's magnitude


def assert_close(got, want, rtol=RTOL, what=""):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape, (what, got.shape, want.shape)
    scale = max(1.0, float(np.abs(want).max(initial=0.0)))
    err = float(np.abs(got - want).max(initial=0.0))
    assert err <= rtol * scale, f"{what}: max error {err:.3g} > {rtol:g} × {scale:.3g}"


# ---------------------------------------------------------------------------------------------
# numpy references (float64), written from the formulas in the layers' papers
# ---------------------------------------------------------------------------------------------

def _c(v):
    """[C] -> [1, C, 1, 1]."""
    return np.asarray(v, np.float64)[None, :, None, None]


def np_bn_eval(x, mean, var, gamma, beta, eps):
    return _c(gamma) * (x - _c(mean)) / np.sqrt(_c(var) + eps) + _c(beta)


def np_batch_renorm_train(x, p, eps, momentum, r_max, d_max):
    """Ioffe 2017, Algorithm 1; returns y and the new running mean / var."""
    m = x.shape[0] * x.shape[2] * x.shape[3]
    mu_b = x.mean(axis=(0, 2, 3))
    var_b = x.var(axis=(0, 2, 3))
    sigma_b = np.sqrt(var_b + eps)
    sigma = np.sqrt(p["running_var"] + eps)
    r = np.clip(sigma_b / sigma, 1 / r_max, r_max)
    d = np.clip((mu_b - p["running_mean"]) / sigma, -d_max, d_max)
    x_hat = (x - _c(mu_b)) / _c(sigma_b) * _c(r) + _c(d)
    y = _c(p["weight"]) * x_hat + _c(p["bias"])
    new_mean = p["running_mean"] + momentum * (mu_b - p["running_mean"])
    new_var = p["running_var"] + momentum * (var_b * m / (m - 1) - p["running_var"])
    return y, new_mean, new_var, r


def np_l1_bn_train(x, p, eps, momentum):
    mu_b = x.mean(axis=(0, 2, 3))
    sigma_l1 = np.sqrt(np.pi / 2) * np.abs(x - _c(mu_b)).mean(axis=(0, 2, 3))
    y = _c(p["weight"]) * (x - _c(mu_b)) / (_c(sigma_l1) + eps) + _c(p["bias"])
    new_mean = p["running_mean"] + momentum * (mu_b - p["running_mean"])
    new_scale = p["running_scale"] + momentum * (sigma_l1 - p["running_scale"])
    return y, new_mean, new_scale


def np_l1_bn_eval(x, p, eps):
    return _c(p["weight"]) * (x - _c(p["running_mean"])) / (_c(p["running_scale"]) + eps) + _c(p["bias"])


def _softmax(v):
    e = np.exp(v - v.max())
    return e / e.sum()


def np_switchable(x, p, eps, momentum, training):
    """Luo et al. 2018: IN/LN/BN means and variances mixed by softmax weights."""
    n, c = x.shape[:2]
    mean_in, var_in = x.mean(axis=(2, 3), keepdims=True), x.var(axis=(2, 3), keepdims=True)
    mean_ln, var_ln = x.mean(axis=(1, 2, 3), keepdims=True), x.var(axis=(1, 2, 3), keepdims=True)
    if training:
        mean_bn, var_bn = x.mean(axis=(0, 2, 3)), x.var(axis=(0, 2, 3))
        m = n * x.shape[2] * x.shape[3]
        new_mean = p["running_mean"] + momentum * (mean_bn - p["running_mean"])
        new_var = p["running_var"] + momentum * (var_bn * m / (m - 1) - p["running_var"])
    else:
        mean_bn, var_bn = p["running_mean"], p["running_var"]
        new_mean, new_var = mean_bn, var_bn
    wm, wv = _softmax(p["mean_weight"]), _softmax(p["var_weight"])
    mean = wm[0] * mean_in + wm[1] * mean_ln + wm[2] * _c(mean_bn)
    var = wv[0] * var_in + wv[1] * var_ln + wv[2] * _c(var_bn)
    y = _c(p["weight"]) * (x - mean) / np.sqrt(var + eps) + _c(p["bias"])
    return y, new_mean, new_var


def np_frn(x, p, eps, tlu):
    """Singh & Krishnan 2019, eq. 1-3 (ε = eps + |ε_l| when learned)."""
    if "eps_l" in p:
        eps = eps + abs(float(p["eps_l"][0]))
    nu2 = (x ** 2).mean(axis=(2, 3), keepdims=True)
    y = _c(p["weight"]) * x / np.sqrt(nu2 + eps) + _c(p["bias"])
    return np.maximum(y, _c(p["tau"])) if tlu else y


def np_layer_norm_2d(x, p, eps):
    mean = x.mean(axis=1, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=1, keepdims=True)
    return _c(p["weight"]) * (x - mean) / np.sqrt(var + eps) + _c(p["bias"])


def np_rms_norm(x, p, eps):
    return x / np.sqrt((x ** 2).mean(axis=-1, keepdims=True) + eps) * p["weight"]


def np_cosine(x, p, scale):
    w = p["weight"]
    xn = x / np.linalg.norm(x, axis=-1, keepdims=True)
    wn = w / np.linalg.norm(w, axis=1, keepdims=True)
    return scale * xn @ wn.T


# ---------------------------------------------------------------------------------------------
# inputs and parameters
# ---------------------------------------------------------------------------------------------

_SAMPLERS = {
    "weight": lambda rng, s: rng.uniform(0.5, 1.5, s) * np.where(rng.random(s) < 0.2, -1, 1),
    "bias": lambda rng, s: rng.normal(0, 0.5, s),
    "tau": lambda rng, s: rng.normal(0, 0.5, s),
    "eps_l": lambda rng, s: rng.normal(0, 1e-3, s),
    "mean_weight": lambda rng, s: rng.normal(0, 1, s),
    "var_weight": lambda rng, s: rng.normal(0, 1, s),
    "running_mean": lambda rng, s: rng.normal(0, 1, s),
    "running_var": lambda rng, s: rng.uniform(0.5, 2.0, s),
    "running_scale": lambda rng, s: rng.uniform(0.5, 2.0, s),
}


def randomize(module: nn.Module, seed: int) -> dict[str, np.ndarray]:
    """Give the norm layers of `module` random parameters and running statistics
    (any weight of other layers keeps its init); return the layer's values as
    float64 numpy arrays, keyed by name."""
    rng = np.random.default_rng(seed)
    values = {}
    with torch.no_grad():
        for layer in module.modules():
            if type(layer).__module__ != nfnn.__name__:
                continue
            for name, t in [*layer.named_parameters(recurse=False), *layer.named_buffers(recurse=False)]:
                sample = _SAMPLERS.get(name, lambda rng, s: rng.normal(0, 1, s))
                t.copy_(torch.from_numpy(sample(rng, tuple(t.shape))))
                values[name] = t.detach().double().numpy().copy()
    return values


def sample_input(shape, seed: int) -> np.ndarray:
    """float32 input with a random offset and spread per channel (axis 1 of rank ≥ 3)."""
    rng = np.random.default_rng(seed + 1)
    per_channel = (1, shape[1]) + (1,) * (len(shape) - 2) if len(shape) > 2 else ()
    offset, spread = rng.uniform(-2, 2, per_channel), rng.uniform(0.2, 5, per_channel)
    return (offset + spread * rng.standard_normal(shape)).astype(np.float32)


def run(module: nn.Module, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return module(torch.from_numpy(x)).double().numpy()


def buffers(module: nn.Module) -> dict[str, np.ndarray]:
    return {k: v.double().numpy() for k, v in module.named_buffers()}


nchw = st.tuples(st.integers(1, 4), st.integers(1, 6), st.integers(1, 5), st.integers(1, 5))
nchw_train = nchw.filter(lambda s: s[0] * s[2] * s[3] > 1)
seeds = st.integers(0, 2**31 - 1)


# ---------------------------------------------------------------------------------------------
# forward vs numpy
# ---------------------------------------------------------------------------------------------

@given(shape=nchw_train, seed=seeds, r_max=st.floats(1.0, 4.0), d_max=st.floats(0.0, 3.0))
def test_batch_renorm_train_steps_then_eval(shape, seed, r_max, d_max):
    layer = nfnn.BatchRenorm2d(shape[1], eps=1e-3, momentum=0.3, r_max=r_max, d_max=d_max).train()
    p = randomize(layer, seed)
    for step in range(2):
        x = sample_input(shape, seed + step)
        want, p["running_mean"], p["running_var"], _ = np_batch_renorm_train(
            x.astype(np.float64), p, 1e-3, 0.3, r_max, d_max)
        assert_close(run(layer, x), want, what=f"train step {step}")
        assert_close(buffers(layer)["running_mean"], p["running_mean"], what="running_mean")
        assert_close(buffers(layer)["running_var"], p["running_var"], what="running_var")
    x = sample_input(shape, seed + 2)
    want = np_bn_eval(x.astype(np.float64), p["running_mean"], p["running_var"], p["weight"], p["bias"], 1e-3)
    assert_close(run(layer.eval(), x), want, what="eval")


def test_batch_renorm_clipping_is_active():
    """A batch far from the running statistics puts r at its bound, and the
    output then differs from BatchNorm's."""
    layer = nfnn.BatchRenorm2d(4, r_max=1.5, d_max=0.5).train()
    p = randomize(layer, 3)
    x = sample_input((8, 4, 3, 3), 3) * 10 + 7
    want, _, _, r = np_batch_renorm_train(x.astype(np.float64), p, 1e-5, 0.1, 1.5, 0.5)
    assert np.all(r == 1.5)
    got = run(layer, x)
    assert_close(got, want)
    bn = np_bn_eval(x.astype(np.float64), x.mean(axis=(0, 2, 3)), x.var(axis=(0, 2, 3)), p["weight"], p["bias"], 1e-5)
    assert np.abs(got - bn).max() > 0.1


@pytest.mark.parametrize("shape", [(4, 3, 5, 5), (2, 6, 1, 7), (1, 2, 3, 3)])
def test_batch_renorm_without_clipping_room_is_batch_norm(shape):
    """r_max = 1, d_max = 0: outputs, gradients and running statistics of nn.BatchNorm2d."""
    ours = nfnn.BatchRenorm2d(shape[1], momentum=0.2, r_max=1.0, d_max=0.0).train()
    randomize(ours, 5)
    ref = nn.BatchNorm2d(shape[1], momentum=0.2).train()
    ref.load_state_dict(ours.state_dict(), strict=False)
    x = torch.from_numpy(sample_input(shape, 5))
    grad = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    (xa, xb) = (x.clone().requires_grad_(), x.clone().requires_grad_())
    ya, yb = ours(xa), ref(xb)
    (ya * grad).sum().backward()
    (yb * grad).sum().backward()
    assert_close(ya.detach(), yb.detach(), what="output")
    assert_close(xa.grad, xb.grad, rtol=1e-4, what="input gradient")
    assert_close(ours.weight.grad, ref.weight.grad, rtol=1e-4, what="γ gradient")
    assert_close(ours.running_var, ref.running_var, what="running_var")
    assert_close(ours.running_mean, ref.running_mean, what="running_mean")


def test_batch_renorm_r_and_d_carry_no_gradient():
    """With r and d treated as constants, ∂y/∂x of Batch Renorm is r times that of
    BatchNorm (same γ): the input gradient equals BN's for an upstream gradient scaled by r."""
    shape = (6, 3, 4, 4)
    ours = nfnn.BatchRenorm2d(3, r_max=1.2, d_max=0.3).train()
    p = randomize(ours, 11)
    ref = nn.BatchNorm2d(3).train()
    ref.load_state_dict(ours.state_dict(), strict=False)
    x = sample_input(shape, 11) * 3
    _, _, _, r = np_batch_renorm_train(x.astype(np.float64), p, 1e-5, 0.1, 1.2, 0.3)
    assert np.any(r != 1.0)
    grad = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    xa, xb = torch.from_numpy(x).requires_grad_(), torch.from_numpy(x).requires_grad_()
    (ours(xa) * grad).sum().backward()
    (ref(xb) * grad * torch.from_numpy(_c(r)).float()).sum().backward()
    assert_close(xa.grad, xb.grad, rtol=1e-4)


@given(shape=nchw_train, seed=seeds)
def test_l1_batch_norm_train_steps_then_eval(shape, seed):
    layer = nfnn.L1BatchNorm2d(shape[1], eps=1e-3, momentum=0.25).train()
    p = randomize(layer, seed)
    for step in range(2):
        x = sample_input(shape, seed + step)
        want, p["running_mean"], p["running_scale"] = np_l1_bn_train(x.astype(np.float64), p, 1e-3, 0.25)
        assert_close(run(layer, x), want, what=f"train step {step}")
        assert_close(buffers(layer)["running_mean"], p["running_mean"], what="running_mean")
        assert_close(buffers(layer)["running_scale"], p["running_scale"], what="running_scale")
    x = sample_input(shape, seed + 2)
    assert_close(run(layer.eval(), x), np_l1_bn_eval(x.astype(np.float64), p, 1e-3), what="eval")


def test_l1_scale_matches_std_on_gaussian_data():
    """sqrt(π/2)·mean|x − μ| estimates σ for Gaussian data: on a large batch the
    running scale after one step with momentum 1 is the batch's σ within 1%."""
    layer = nfnn.L1BatchNorm2d(2, momentum=1.0).train()
    x = np.random.default_rng(0).normal(0, [[[[0.5]], [[3.0]]]], (64, 2, 32, 32)).astype(np.float32)
    run(layer, x)
    np.testing.assert_allclose(layer.running_scale.numpy(), [0.5, 3.0], rtol=0.01)


@given(shape=nchw_train, seed=seeds, training=st.booleans())
def test_switchable_norm(shape, seed, training):
    layer = nfnn.SwitchableNorm2d(shape[1], eps=1e-3, momentum=0.2).train(training)
    p = randomize(layer, seed)
    x = sample_input(shape, seed)
    want, new_mean, new_var = np_switchable(x.astype(np.float64), p, 1e-3, 0.2, training)
    assert_close(run(layer, x), want)
    assert_close(buffers(layer)["running_mean"], new_mean, what="running_mean")
    assert_close(buffers(layer)["running_var"], new_var, what="running_var")


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("which", ["instance", "layer", "batch"])
def test_switchable_norm_one_hot_is_the_torch_norm(which, training):
    """A softmax weight of ~1 on one statistic gives InstanceNorm2d, GroupNorm(1, C) or BatchNorm2d."""
    shape, c = (3, 4, 5, 6), 4
    layer = nfnn.SwitchableNorm2d(c, momentum=0.2).train(training)
    randomize(layer, 2)
    k = ["instance", "layer", "batch"].index(which)
    with torch.no_grad():
        layer.mean_weight.copy_(torch.full((3,), -50.0).index_fill(0, torch.tensor(k), 50.0))
        layer.var_weight.copy_(layer.mean_weight)
    ref = {"instance": nn.InstanceNorm2d(c, affine=True), "layer": nn.GroupNorm(1, c),
           "batch": nn.BatchNorm2d(c, momentum=0.2)}[which].train(training)
    ref.load_state_dict(layer.state_dict(), strict=False)
    x = sample_input(shape, 2)
    assert_close(run(layer, x), run(ref, x))
    if which == "batch":
        assert_close(layer.running_var, ref.running_var, what="running_var")


@given(shape=nchw, seed=seeds, learnable_eps=st.booleans(), tlu=st.booleans())
def test_filter_response_norm(shape, seed, learnable_eps, tlu):
    layer = nfnn.FilterResponseNorm2d(shape[1], eps=1e-4, learnable_eps=learnable_eps, tlu=tlu)
    p = randomize(layer, seed)
    x = sample_input(shape, seed)
    assert_close(run(layer, x), np_frn(x.astype(np.float64), p, 1e-4, tlu))


@given(shape=nchw, seed=seeds)
def test_layer_norm_2d(shape, seed):
    layer = nfnn.LayerNorm2d(shape[1], eps=1e-5)
    p = randomize(layer, seed)
    x = sample_input(shape, seed)
    # few channels: x - mean cancels in fp32 and 1/sqrt(var + ε) amplifies it (seen: 2.8e-5)
    assert_close(run(layer, x), np_layer_norm_2d(x.astype(np.float64), p, 1e-5), rtol=1e-4)
    ref = nn.LayerNorm(shape[1], eps=1e-5)
    ref.load_state_dict(layer.state_dict())
    assert_close(run(layer, x), run(ref, x.transpose(0, 2, 3, 1).copy()).transpose(0, 3, 1, 2), what="nn.LayerNorm")


@given(shape=st.lists(st.integers(1, 6), min_size=1, max_size=3), seed=seeds)
def test_rms_norm(shape, seed):
    layer = nfnn.RMSNorm(shape[-1], eps=1e-5)
    p = randomize(layer, seed)
    x = sample_input(tuple(shape), seed)
    assert_close(run(layer, x), np_rms_norm(x.astype(np.float64), p, 1e-5))
    ref = nn.RMSNorm(shape[-1], eps=1e-5)
    ref.load_state_dict(layer.state_dict())
    assert_close(run(layer, x), run(ref, x), what="nn.RMSNorm")


@given(lead=st.lists(st.integers(1, 4), max_size=2), n_in=st.integers(1, 8), n_out=st.integers(1, 8),
       scale=st.floats(0.1, 30.0), seed=seeds)
def test_cosine_linear(lead, n_in, n_out, scale, seed):
    layer = nfnn.CosineLinear(n_in, n_out, scale=scale)
    p = randomize(layer, seed)
    x = sample_input((*lead, n_in), seed)
    want = np_cosine(x.astype(np.float64), p, scale)
    assert_close(run(layer, x), want)


# ---------------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("build, message", [
    (lambda: nfnn.BatchRenorm2d(0), "num_features"),
    (lambda: nfnn.BatchRenorm2d(4, r_max=0.5), "r_max"),
    (lambda: nfnn.BatchRenorm2d(4, d_max=-1), "d_max"),
    (lambda: nfnn.BatchRenorm2d(4, momentum=1.5), "momentum"),
    (lambda: nfnn.L1BatchNorm2d(4, eps=-1e-5), "eps"),
    (lambda: nfnn.SwitchableNorm2d(4, eps=0.0), "eps"),
    (lambda: nfnn.FilterResponseNorm2d(2.5), "num_features"),
    (lambda: nfnn.LayerNorm2d(-3), "num_channels"),
    (lambda: nfnn.RMSNorm(0), "dim"),
    (lambda: nfnn.CosineLinear(4, 0), "out_features"),
])
def test_bad_arguments(build, message):
    with pytest.raises(ValueError, match=message):
        build()


@pytest.mark.parametrize("layer, shape", [
    (nfnn.BatchRenorm2d(4), (2, 3, 5, 5)),
    (nfnn.L1BatchNorm2d(4), (2, 4, 5)),
    (nfnn.SwitchableNorm2d(4), (2, 4)),
    (nfnn.FilterResponseNorm2d(4), (2, 5, 3, 3)),
    (nfnn.LayerNorm2d(4), (2, 3, 3, 3)),
    (nfnn.RMSNorm(8), (2, 7)),
    (nfnn.CosineLinear(8, 3), (2, 3)),
])
def test_bad_input_shape(layer, shape):
    with pytest.raises(ValueError, match="expects"):
        layer(torch.zeros(shape))


@pytest.mark.parametrize("cls", [nfnn.BatchRenorm2d, nfnn.L1BatchNorm2d, nfnn.SwitchableNorm2d])
def test_training_needs_more_than_one_value_per_channel(cls):
    layer = cls(3).train()
    with pytest.raises(ValueError, match="more than one value per channel"):
        layer(torch.zeros(1, 3, 1, 1))
    assert layer.eval()(torch.zeros(1, 3, 1, 1)).shape == (1, 3, 1, 1)


def test_normfold_imports_without_torch():
    """`import normfold` works where torch cannot be imported; `import normfold.nn` says why it fails."""
    code = ("import sys; sys.modules['torch'] = None\n"
            "import normfold\n"
            "try:\n    import normfold.nn\nexcept ImportError as e:\n    print('ImportError', e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.startswith("ImportError") and "torch" in out


# ---------------------------------------------------------------------------------------------
# export -> normfold passes -> onnxruntime
# ---------------------------------------------------------------------------------------------

class ConvBlock(nn.Module):
    """Conv2d(3→C) → layer → ReLU."""

    def __init__(self, layer: nn.Module, c: int = 8):
        super().__init__()
        self.conv = nn.Conv2d(3, c, 3, padding=1)
        self.layer = layer
        self.act = nn.ReLU()

    def forward(self, x):
        return self.act(self.layer(self.conv(x)))


class LinearBlock(nn.Module):
    """Linear(12→D) → layer → ReLU."""

    def __init__(self, layer: nn.Module, d: int = 16):
        super().__init__()
        self.fc = nn.Linear(12, d)
        self.layer = layer
        self.act = nn.ReLU()

    def forward(self, x):
        return self.act(self.layer(self.fc(x)))


# name -> (block factory, input shape)
BLOCKS = {
    "batch_renorm": (lambda: ConvBlock(nfnn.BatchRenorm2d(8)), (2, 3, 8, 8)),
    "l1_batch_norm": (lambda: ConvBlock(nfnn.L1BatchNorm2d(8)), (2, 3, 8, 8)),
    "frn": (lambda: ConvBlock(nfnn.FilterResponseNorm2d(8)), (2, 3, 8, 8)),
    "frn_learned_eps": (lambda: ConvBlock(nfnn.FilterResponseNorm2d(8, learnable_eps=True)), (2, 3, 8, 8)),
    "frn_no_tlu": (lambda: ConvBlock(nfnn.FilterResponseNorm2d(8, tlu=False)), (2, 3, 8, 8)),
    "layer_norm_2d": (lambda: ConvBlock(nfnn.LayerNorm2d(8)), (2, 3, 8, 8)),
    "rms_norm": (lambda: LinearBlock(nfnn.RMSNorm(16)), (2, 5, 12)),
    "cosine_linear": (lambda: LinearBlock(nfnn.CosineLinear(16, 6, scale=8.0)), (4, 12)),
    "cosine_linear_3d": (lambda: LinearBlock(nfnn.CosineLinear(16, 6, scale=8.0)), (2, 5, 12)),
    "switchable_norm": (lambda: ConvBlock(nfnn.SwitchableNorm2d(8)), (2, 3, 8, 8)),
}
# (exporter, opset, exporter's own constant folding). Folding off leaves the work to normfold.
EXPORTS = [("torchscript", 17, False), ("torchscript", 17, True), ("dynamo", 18, False), ("dynamo", 18, True)]


def _block(name: str) -> tuple[nn.Module, torch.Tensor]:
    factory, shape = BLOCKS[name]
    torch.manual_seed(0)
    module = factory().eval()
    randomize(module, 7)
    return module, torch.from_numpy(sample_input(shape, 7))


def _export_params():
    for name in BLOCKS:
        for exporter, opset, folding in EXPORTS:
            marks = [pytest.mark.slow] if exporter == "dynamo" else []
            yield pytest.param(name, exporter, opset, folding, marks=marks,
                               id=f"{name}-{exporter}{opset}{'' if folding else '-nofold'}")


def _custom_ops(model: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in model.graph.node if n.domain == "com.normfold"]


def _ops(model: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in model.graph.node]


def _constant_inputs(model: onnx.ModelProto, op_types) -> list[np.ndarray]:
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    return [inits[i] for n in model.graph.node if n.op_type in op_types for i in n.input if i in inits]


def _expect_batch_norm_folded(model, module):
    assert "BatchNormalization" not in _ops(model)


def _expect_custom(op):
    def check(model, module):
        assert _custom_ops(model) == [op], _ops(model)
        assert not {"ReduceMean", "Sqrt", "Reciprocal"} & set(_ops(model)), _ops(model)
    return check


def _expect_rms(model, module):
    assert _custom_ops(model) == ["RMSNorm"] or _ops(model).count("RMSNormalization") == 1, _ops(model)
    assert "ReduceMean" not in _ops(model)


def _expect_weight_offline(model, module):
    """The cosine layer's weight s·w/‖w‖ is a stored constant; only ‖x‖ is computed at run time."""
    layer = module.layer
    w = layer.weight.detach().double().numpy()
    want = layer.scale * w / np.linalg.norm(w, axis=1, keepdims=True)
    stored = [a for a in _constant_inputs(model, ("Gemm", "MatMul")) if a.size == want.size]
    assert any(np.allclose(a.reshape(want.shape), want, rtol=1e-6, atol=1e-7) or
               np.allclose(a.T.reshape(want.shape), want, rtol=1e-6, atol=1e-7) for a in stored), _ops(model)
    assert _ops(model).count("ReduceL2") <= 1 and "Sqrt" not in _ops(model), _ops(model)


def _expect_nothing(model, module):
    """Kept as is: only checked numerically."""


EXPECTED = {
    "batch_renorm": _expect_batch_norm_folded,
    "l1_batch_norm": _expect_batch_norm_folded,
    "frn": _expect_custom("FilterResponseNorm"),
    "frn_learned_eps": _expect_custom("FilterResponseNorm"),
    "frn_no_tlu": _expect_custom("FilterResponseNorm"),
    "layer_norm_2d": _expect_custom("LayerNorm"),
    "rms_norm": _expect_rms,
    "cosine_linear": _expect_weight_offline,
    "cosine_linear_3d": _expect_weight_offline,
    "switchable_norm": _expect_nothing,
}


def optimize(model: onnx.ModelProto) -> onnx.ModelProto:
    """Every normfold pass (`normfold.optimize`), fused norms as com.normfold ops."""
    optimized, _ = normfold.optimize(model, target="custom")
    return optimized


@pytest.mark.parametrize("name, exporter, opset, folding", list(_export_params()))
def test_export_optimize_run(name, exporter, opset, folding):
    module, x = _block(name)
    model = zoo.export(module, x, exporter=exporter, opset=opset, constant_folding=folding, name=f"nn_{name}")
    optimized = optimize(model)
    onnx.checker.check_model(optimized)
    EXPECTED[name](optimized, module)
    got = make_session(optimized, threads=1).run(None, {"x": x.numpy()})[0]
    want = zoo.torch_outputs(module, (x,))[0]
    assert_close(got, want, rtol=1e-4, what="onnxruntime vs PyTorch")


def test_export_check_fails_on_the_unoptimized_model():
    """The op checks above can fail: the raw TorchScript export (folding off) still
    has the BatchNormalization, the decomposed LayerNorm and the weight-norm subgraph."""
    for name in ("batch_renorm", "layer_norm_2d", "cosine_linear"):
        module, x = _block(name)
        model = zoo.export(module, x, exporter="torchscript", opset=17, constant_folding=False, name=f"nn_{name}")
        with pytest.raises(AssertionError):
            EXPECTED[name](model, module)

