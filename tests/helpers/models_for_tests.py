"""Small PyTorch models for normfold's verify/export tests, importable as
`tests.helpers.models_for_tests:make_...` (the `package.module:callable` form)."""

from __future__ import annotations

import torch
from torch import nn


def _randomize_norm_stats(model: nn.Module) -> nn.Module:
    """Give every BatchNorm non-trivial running statistics and affine parameters."""
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.uniform_(-0.5, 0.5)
    return model.eval()


class BasicBlock(nn.Module):
    """conv-BN-ReLU-conv-BN plus identity, as in ResNet."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x):
        y = self.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(y)) + x)


class ResNetish(nn.Module):
    """A stem, two residual blocks and a linear head."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.layer1 = nn.Sequential(BasicBlock(8), BasicBlock(8))
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        y = self.layer1(self.stem(x))
        return self.fc(y.mean(dim=(2, 3)))


class GroupNormNet(nn.Module):
    """conv-GroupNorm-SiLU-conv."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.norm = nn.GroupNorm(4, 8)
        self.act = nn.SiLU()
        self.conv2 = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.conv2(self.act(self.norm(self.conv1(x))))


class LayerNormNet(nn.Module):
    """A transformer-style MLP block on [batch, tokens, channels]."""

    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(16)
        self.fc1 = nn.Linear(16, 32)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(32, 16)

    def forward(self, x):
        return x + self.fc2(self.act(self.fc1(self.norm(x))))


class TwoInOut(nn.Module):
    """Two inputs, two outputs."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, image, bias):
        y = self.bn(self.conv(image)) + bias
        return y, y.sum(dim=1)


def make_resnetish() -> nn.Module:
    """ResNetish with seeded weights and BN statistics."""
    torch.manual_seed(0)
    return _randomize_norm_stats(ResNetish())


def make_groupnorm() -> nn.Module:
    """GroupNormNet with seeded weights."""
    torch.manual_seed(1)
    model = GroupNormNet()
    model.norm.weight.data.uniform_(0.5, 1.5)
    model.norm.bias.data.uniform_(-0.5, 0.5)
    return model.eval()


def make_layernorm() -> nn.Module:
    """LayerNormNet with seeded weights."""
    torch.manual_seed(2)
    model = LayerNormNet()
    model.norm.weight.data.uniform_(0.5, 1.5)
    model.norm.bias.data.uniform_(-0.5, 0.5)
    return model.eval()


def make_two_in_out() -> nn.Module:
    """TwoInOut with seeded weights."""
    torch.manual_seed(3)
    return _randomize_norm_stats(TwoInOut())


NOT_CALLABLE = 42


def make_not_a_module():
    """A callable that returns something other than an nn.Module."""
    return {"not": "a module"}


class OneInTwoOut(nn.Module):
    """One input, two outputs (for output-count mismatches)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)

    def forward(self, x):
        y = self.conv(x)
        return y, y.mean()


def make_one_in_two_out() -> nn.Module:
    """OneInTwoOut with seeded weights."""
    torch.manual_seed(4)
    return OneInTwoOut().eval()


class TokenNet(nn.Module):
    """Embedding (int64 token ids) then LayerNorm."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 16)
        self.norm = nn.LayerNorm(16)

    def forward(self, tokens):
        return self.norm(self.embed(tokens))


def make_tokens() -> nn.Module:
    """TokenNet with seeded weights."""
    torch.manual_seed(5)
    return TokenNet().eval()


# ---- ONNX files of the models above, made once per test session -------------------------------

import functools  # noqa: E402
import tempfile  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import onnx  # noqa: E402
from onnx import numpy_helper  # noqa: E402

EXAMPLE_SHAPES = {
    "make_resnetish": [(1, 3, 16, 16)],
    "make_groupnorm": [(1, 3, 8, 8)],
    "make_layernorm": [(2, 4, 16)],
    "make_two_in_out": [(1, 3, 8, 8), (1, 4, 8, 8)],
    "make_one_in_two_out": [(1, 3, 8, 8)],
}
INPUT_NAMES = {"make_two_in_out": ["image", "bias"]}
_CACHE = Path(tempfile.mkdtemp(prefix="normfold-test-models-"))


@functools.lru_cache(maxsize=None)
def onnx_file(factory: str, *, dynamo: bool = False, folding: bool = True, dynamic_batch: bool = False) -> Path:
    """Path of `factory`'s model exported to ONNX (cached; do not modify the file).
    folding=False keeps Conv->BN unfolded (TorchScript exporter)."""
    model = globals()[factory]()
    args = tuple(torch.randn(*shape) for shape in EXAMPLE_SHAPES[factory])
    names = INPUT_NAMES.get(factory, ["x"])
    path = _CACHE / f"{factory}-{dynamo}-{folding}-{dynamic_batch}.onnx"
    options = {"dynamo": dynamo, "input_names": names}
    if dynamic_batch:
        options["dynamic_axes"] = {name: {0: "batch"} for name in names}
    if not dynamo:
        options["do_constant_folding"] = folding
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, args, str(path), **options)
    return path


def load_copy(path: Path) -> onnx.ModelProto:
    """The model at `path`, as a fresh ModelProto."""
    return onnx.load(str(path))


def weight_of_node(model: onnx.ModelProto, node_name_part: str, op_type: str = "Conv") -> onnx.TensorProto:
    """The weight initializer (input 1) of the first `op_type` node whose name, or
    dynamo name scopes, contain `node_name_part`."""
    inits = {init.name: init for init in model.graph.initializer}
    for node in model.graph.node:
        scopes = " ".join(p.value for p in node.metadata_props if p.key == "pkg.torch.onnx.name_scopes")
        named = f"'{node_name_part}'" in scopes if scopes else node_name_part in node.name
        if node.op_type == op_type and named:
            return inits[node.input[1]]
    raise KeyError(f"no {op_type} node named like {node_name_part}")


def perturb(model: onnx.ModelProto, node_name_part: str, value: float | None = None) -> onnx.ModelProto:
    """Change one element of a node's weight in place: add 1.0, or set it to `value` (e.g. NaN)."""
    init = weight_of_node(model, node_name_part)
    array = numpy_helper.to_array(init).copy()
    array.flat[0] = array.flat[0] + 1.0 if value is None else value
    init.CopyFrom(numpy_helper.from_array(array, init.name))
    return model


def save(model: onnx.ModelProto, folder: Path, name: str) -> Path:
    """Write `model` to folder/name and return the path."""
    path = Path(folder) / name
    onnx.save(model, str(path))
    return path


def feeds_for(factory: str, seed: int = 0) -> dict[str, np.ndarray]:
    """Random float32 inputs for the exported `factory` model."""
    rng = np.random.default_rng(seed)
    names = INPUT_NAMES.get(factory, ["x"])
    return {n: rng.standard_normal(s).astype(np.float32) for n, s in zip(names, EXAMPLE_SHAPES[factory])}
