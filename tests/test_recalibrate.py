"""`normfold recalibrate` (AdaBN) against an independent PyTorch reference.

Reference: for each BN module in forward order, run the torch model (eval
mode) over every calibration batch, collect that BN's input with a forward
hook, take its exact population mean/var in float64, set running_mean /
running_var, then go on to the next BN. The recalibrated ONNX model must hold
those statistics and compute what the updated torch model computes, folded
(`--fold`) or not. Exports keep their BN (TorchScript, no constant folding,
eval mode), with a dynamic batch so batches of different sizes can be fed.
"""

from __future__ import annotations

import io
import json
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import helper, numpy_helper

from tests.helpers.graphs import G, count_op, file_digests, ort_run, tolerance
from normfold.cli.main import main
from normfold.errors import NormfoldError
from normfold.passes.recalibrate import RunningMoments
from normfold.pipeline.api import recalibrate

torch = pytest.importorskip("torch")
nn = torch.nn

BATCH_SIZES = (3, 5, 2)


# ------------------------------------------------------------------ torch models
class ConvChain(nn.Module):
    """Conv -> BN -> ReLU, three times: three waves."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6)
        self.conv2, self.bn2 = nn.Conv2d(6, 5, 3, padding=1, stride=2), nn.BatchNorm2d(5, eps=1e-3)
        self.conv3, self.bn3 = nn.Conv2d(5, 4, 1, bias=False), nn.BatchNorm2d(4)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.bn3(self.conv3(x))


class Branches(nn.Module):
    """Two parallel Conv -> BN branches, BN after their Concat, then Conv -> BN."""

    def __init__(self):
        super().__init__()
        self.conva, self.bna = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.convb, self.bnb = nn.Conv2d(3, 2, 1), nn.BatchNorm2d(2)
        self.bncat = nn.BatchNorm2d(6)
        self.convd, self.bnd = nn.Conv2d(6, 3, 3), nn.BatchNorm2d(3)

    def forward(self, x):
        a = torch.relu(self.bna(self.conva(x)))
        b = torch.sigmoid(self.bnb(self.convb(x)))
        return self.bnd(self.convd(torch.relu(self.bncat(torch.cat([a, b], 1)))))


class InputBN(nn.Module):
    """BN on the network input, then Conv -> BN."""

    def __init__(self):
        super().__init__()
        self.bn0 = nn.BatchNorm2d(3)
        self.conv, self.bn1 = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn1(self.conv(self.bn0(x)))


class MLP(nn.Module):
    """Linear -> BatchNorm1d -> ReLU -> Linear -> BatchNorm1d."""

    def __init__(self):
        super().__init__()
        self.fc1, self.bn1 = nn.Linear(7, 6), nn.BatchNorm1d(6)
        self.fc2, self.bn2 = nn.Linear(6, 4), nn.BatchNorm1d(4)

    def forward(self, x):
        return self.bn2(self.fc2(torch.relu(self.bn1(self.fc1(x)))))


class TwoInputs(nn.Module):
    """Two inputs; two BNs reading the same tensor (one wave), BN on the second input."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bna, self.bnb, self.bnz = nn.BatchNorm2d(4), nn.BatchNorm2d(4), nn.BatchNorm2d(4)

    def forward(self, x, z):
        h = self.conv(x)
        return torch.relu(self.bna(h)) - self.bnb(h) + self.bnz(z)


# name -> (factory, per-input shapes without the batch axis, opset, waves, BNs left by --fold)
CASES = {
    "conv_chain": (ConvChain, [(3, 8, 8)], 13, 3, 0),
    "branches": (Branches, [(3, 7, 7)], 14, 3, 1),  # BN after Concat, before ReLU: not foldable
    "input_bn": (InputBN, [(3, 6, 6)], 15, 2, 0),
    "mlp": (MLP, [(7,)], 16, 2, 0),
    "two_inputs": (TwoInputs, [(3, 5, 5), (4, 5, 5)], 17, 1, 3),  # a shared conv output; BN on an input
}


def make(name: str, seed: int = 0) -> nn.Module:
    """The case's module with random BN statistics and affine parameters, eval mode."""
    torch.manual_seed(seed)
    module = CASES[name][0]()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                c = m.num_features
                m.running_mean.copy_(torch.randn(c, generator=gen))
                m.running_var.copy_(torch.rand(c, generator=gen) * 2 + 0.2)
                m.weight.copy_(torch.rand(c, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(c, generator=gen))
    return module.eval()


def input_names(name: str) -> list[str]:
    return ["x", "z"][: len(CASES[name][1])]


def export(module: nn.Module, name: str) -> onnx.ModelProto:
    """TorchScript export keeping BN (eval mode, no constant folding), dynamic batch, IR <= 10."""
    _, shapes, opset, _, _ = CASES[name]
    names = input_names(name)
    args = tuple(torch.randn(2, *s) for s in shapes)
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, args, buf, dynamo=False, opset_version=opset, do_constant_folding=False,
                          training=torch.onnx.TrainingMode.EVAL, input_names=names, output_names=["y"],
                          dynamic_axes={n: {0: "batch"} for n in names + ["y"]})
    model = onnx.load_from_string(buf.getvalue())
    model.ir_version = min(model.ir_version, 10)
    return model


def calibration_batches(name: str, sizes=BATCH_SIZES, seed: int = 7) -> list[dict[str, np.ndarray]]:
    """Target-domain data: shifted and scaled away from what the statistics describe."""
    rng = np.random.default_rng(seed)
    shapes = CASES[name][1]
    return [{n: (rng.standard_normal((k, *s)) * 2.5 + 0.7).astype(np.float32)
             for n, s in zip(input_names(name), shapes)} for k in sizes]


def bn_modules(module: nn.Module, batch: dict) -> list[tuple[str, nn.Module]]:
    """(name, BN module) in the order the forward pass calls them."""
    order: list[str] = []
    hooks = [m.register_forward_hook(lambda mod, args, out, n=n: order.append(n))
             for n, m in module.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    with torch.no_grad():
        module(*[torch.from_numpy(a) for a in batch.values()])
    for h in hooks:
        h.remove()
    mods = dict(module.named_modules())
    return [(n, mods[n]) for n in order]


def torch_adabn(module: nn.Module, batches: list[dict]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Recalibrate `module` in place, one BN at a time in forward order; {name: (mean, var)}."""
    stats = {}
    for name, bn in bn_modules(module, batches[0]):
        seen: list[torch.Tensor] = []
        hook = bn.register_forward_hook(lambda mod, args, out: seen.append(args[0].detach().double()))
        with torch.no_grad():
            for batch in batches:
                module(*[torch.from_numpy(a) for a in batch.values()])
        hook.remove()
        values = torch.cat([t.transpose(0, 1).reshape(t.shape[1], -1) for t in seen], dim=1)
        mean, var = values.mean(dim=1), values.var(dim=1, unbiased=False)
        with torch.no_grad():
            bn.running_mean.copy_(mean)
            bn.running_var.copy_(var)
        stats[name] = (mean.numpy(), var.numpy())
    return stats


def onnx_stats(model: onnx.ModelProto, bn_name: str) -> tuple[np.ndarray, np.ndarray]:
    """(mean, var) initializers of the BN node exported for torch module `bn_name`."""
    (node,) = [n for n in model.graph.node if n.op_type == "BatchNormalization" and n.name.startswith(f"/{bn_name}/")]
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    return inits[node.input[3]], inits[node.input[4]]


def assert_stats(got, want):
    """Within 1e-5 relative; the mean also within 1e-5 of the channel's std (means near 0)."""
    (mean, var), (ref_mean, ref_var) = got, want
    np.testing.assert_allclose(var, ref_var, rtol=1e-5, atol=1e-12)
    np.testing.assert_allclose(mean, ref_mean, rtol=1e-5, atol=1e-5 * np.sqrt(ref_var).max())


def assert_matches_torch(model: onnx.ModelProto, module: nn.Module, feeds: dict):
    with torch.no_grad():
        want = module(*[torch.from_numpy(a) for a in feeds.values()]).numpy()
    (got,) = ort_run(model, feeds)
    assert got.shape == want.shape
    assert np.max(np.abs(got - want)) <= tolerance(want, np.float32)


def run_cli(*args):
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=True)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise AssertionError(f"normfold raised {type(result.exception).__name__}: {result.exception}")
    return result.exit_code, result.stdout, result.stderr


def save_batches(folder: Path, batches: list[dict]) -> Path:
    folder.mkdir()
    for i, batch in enumerate(batches):
        np.savez(folder / f"batch{i:02d}.npz", **batch)
    return folder


# ------------------------------------------------------------------ against PyTorch
@pytest.mark.parametrize("name", list(CASES))
def test_matches_pytorch_adabn(tmp_path, name):
    module = make(name)
    model_path = tmp_path / "model.onnx"
    model_path.write_bytes(export(module, name).SerializeToString())
    batches = calibration_batches(name)
    data = save_batches(tmp_path / "calib", batches)
    test_feeds = calibration_batches(name, sizes=(4,), seed=99)[0]
    before = file_digests(tmp_path)

    code, out, err = run_cli("recalibrate", model_path, "--data", data, "-o", tmp_path / "r.onnx",
                             "--json", tmp_path / "r.json", "-q")
    assert code == 0, err
    code, out, err = run_cli("recalibrate", model_path, "--data", data, "--fold", "-o", tmp_path / "f.onnx", "-q")
    assert code == 0, err
    assert file_digests(tmp_path / "calib") == {k.removeprefix("calib/"): v for k, v in before.items()
                                                if k.startswith("calib/")}
    assert file_digests(tmp_path)["model.onnx"] == before["model.onnx"]

    want = torch_adabn(module, batches)
    recalibrated = onnx.load(str(tmp_path / "r.onnx"))
    for bn_name, ref in want.items():
        assert_stats(onnx_stats(recalibrated, bn_name), ref)
    assert_matches_torch(recalibrated, module, test_feeds)
    folded = onnx.load(str(tmp_path / "f.onnx"))
    assert count_op(folded, "BatchNormalization") == CASES[name][4]
    assert_matches_torch(folded, module, test_feeds)

    report = json.loads((tmp_path / "r.json").read_text())["passes"][0]
    assert report["pass"] == "recalibrate"
    assert (report["changed"], report["skipped"]) == (len(want), 0)
    assert (report["batches"], report["samples"], report["waves"]) == (3, sum(BATCH_SIZES), CASES[name][3])
    for change in report["changes"]:
        bn_name = change["node"].split("/")[1]
        old_mean = make(name).get_submodule(bn_name).running_mean.double().numpy()
        assert change["max_abs_delta_mean"] == pytest.approx(np.abs(want[bn_name][0] - old_mean).max(), rel=1e-4)


def test_python_api_in_memory_batches_and_input_untouched():
    module = make("branches")
    model = export(module, "branches")
    original = model.SerializeToString()
    batches = calibration_batches("branches")
    new, report = recalibrate(model, batches)
    assert model.SerializeToString() == original
    want = torch_adabn(module, batches)
    for bn_name, ref in want.items():
        assert_stats(onnx_stats(new, bn_name), ref)
    assert report.samples == sum(BATCH_SIZES) and report.batches == 3 and len(report.changes) == 4
    waves = {c.node.split("/")[1]: c.how for c in report.changes}
    assert waves == {"bna": "wave 1", "bnb": "wave 1", "bncat": "wave 2", "bnd": "wave 3"}


def test_single_file_equals_folder(tmp_path):
    """One .npz holding all samples gives the statistics of the folder of batches."""
    name = "conv_chain"
    model_path = tmp_path / "model.onnx"
    model = export(make(name), name)
    model_path.write_bytes(model.SerializeToString())
    batches = calibration_batches(name)
    data = save_batches(tmp_path / "calib", batches)
    # one array under another name: a one-input model takes any single array name
    np.savez(tmp_path / "all.npz", images=np.concatenate([b["x"] for b in batches]))
    for source, out in ((data, "a.onnx"), (tmp_path / "all.npz", "b.onnx")):
        code, _, err = run_cli("recalibrate", model_path, "--data", source, "-o", tmp_path / out, "-q")
        assert code == 0, err
    a, b = onnx.load(str(tmp_path / "a.onnx")), onnx.load(str(tmp_path / "b.onnx"))
    for bn in ("bn1", "bn2", "bn3"):
        for x, y in zip(onnx_stats(a, bn), onnx_stats(b, bn)):
            np.testing.assert_allclose(x, y, rtol=2e-6)
        assert not np.allclose(onnx_stats(a, bn)[0], onnx_stats(model, bn)[0])


# ------------------------------------------------------------------ batch split does not matter
@pytest.fixture(scope="module")
def chain_model():
    return export(make("conv_chain"), "conv_chain")


SPLIT_DATA = calibration_batches("conv_chain", sizes=(12,), seed=3)[0]["x"]


@pytest.fixture(scope="module")
def chain_stats_one_batch(chain_model):
    new, _ = recalibrate(chain_model, [{"x": SPLIT_DATA}])
    return {bn: onnx_stats(new, bn) for bn in ("bn1", "bn2", "bn3")}


@settings(max_examples=12)
@given(cuts=st.lists(st.integers(1, 11), unique=True, max_size=6))
def test_statistics_do_not_depend_on_the_split(chain_model, chain_stats_one_batch, cuts):
    batches = [{"x": part} for part in np.split(SPLIT_DATA, sorted(cuts))]
    new, report = recalibrate(chain_model, batches)
    assert report.batches == len(cuts) + 1 and report.samples == 12
    for bn, (mean, var) in chain_stats_one_batch.items():
        got_mean, got_var = onnx_stats(new, bn)
        np.testing.assert_allclose(got_mean, mean, rtol=2e-6, atol=1e-7)
        np.testing.assert_allclose(got_var, var, rtol=2e-6)


@given(seed=st.integers(0, 2**32 - 1), rows=st.integers(1, 40), channels=st.integers(1, 5),
       spatial=st.integers(1, 4), cuts=st.lists(st.integers(0, 40), max_size=6))
def test_running_moments_match_numpy(seed, rows, channels, spatial, cuts):
    """Chan's combination over any split (empty batches included) equals numpy over all of it."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, channels, spatial)) * rng.uniform(0.1, 100) + rng.uniform(-1e3, 1e3)
    moments = RunningMoments(channels)
    for part in np.split(x, sorted(min(c, rows) for c in cuts)):
        moments.add(part)
    flat = x.transpose(1, 0, 2).reshape(channels, -1)
    assert moments.count == rows * spatial
    np.testing.assert_allclose(moments.mean, flat.mean(axis=1), rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(moments.var, flat.var(axis=1), rtol=1e-8, atol=1e-9)


# ------------------------------------------------------------------ hand-built graphs
def shared_params_model(dtype=np.float32, stats_dtype=None, opset=15):
    """BN1(x) and BN2(z) sharing scale/B/mean/var tensors; the mean is also read by
    an Identity (a graph output); BN2's B is the same tensor as its mean. BN
    parameters are `stats_dtype` (default: the data's dtype)."""
    g = G(dtype=dtype, opset=opset)
    c = 3
    x = g.input(["n", c, 4, 4], name="x", value=np.zeros((1, c, 4, 4)))
    z = g.input(["n", c, 4, 4], name="z", value=np.zeros((1, c, 4, 4)))
    sd = stats_dtype or dtype
    scale = g.const(np.array([1.0, -0.5, 2.0]).astype(sd), name="scale", keep_dtype=True)
    mean = g.const(np.array([0.1, 0.2, 0.3]).astype(sd), name="mean", keep_dtype=True)
    var = g.const(np.array([1.0, 2.0, 0.5]).astype(sd), name="var", keep_dtype=True)
    bias = g.const(np.array([0.0, 1.0, -1.0]).astype(sd), name="bias", keep_dtype=True)
    g.op("BatchNormalization", [x, scale, bias, mean, var], outputs=["y1"], name="bn1")
    g.op("BatchNormalization", [z, scale, mean, mean, var], outputs=["y2"], name="bn2")
    g.op("Identity", [mean], outputs=["m"], name="id")
    for out in ("y1", "y2"):
        g.output(out)
    g.output("m", dtype=sd)
    return g.model()


def numpy_bn(x, scale, bias, mean, var, eps=1e-5):
    shape = (1, -1, 1, 1)
    return (x - mean.reshape(shape)) / np.sqrt(var.reshape(shape) + eps) * scale.reshape(shape) + bias.reshape(shape)


@pytest.mark.parametrize("dtype,stats_dtype", [(np.float32, None), (np.float16, None), (np.float16, np.float32)])
def test_shared_statistics_are_copied_not_changed_under_others(dtype, stats_dtype):
    model = shared_params_model(dtype, stats_dtype)
    rng = np.random.default_rng(0)
    xs = [(rng.standard_normal((k, 3, 4, 4)) * 3 + 1).astype(dtype) for k in (2, 3)]
    zs = [(rng.standard_normal((k, 3, 4, 4)) * 0.5 - 2).astype(dtype) for k in (2, 3)]
    new, report = recalibrate(model, [{"x": x, "z": z} for x, z in zip(xs, zs)])
    assert len(report.changes) == 2 and not report.skipped
    inits = {t.name: t for t in new.graph.initializer}
    sd = np.dtype(stats_dtype or dtype)
    feeds = {"x": xs[1], "z": zs[1]}
    y1, y2, m = ort_run(new, feeds)
    np.testing.assert_array_equal(m, np.array([0.1, 0.2, 0.3], sd))  # the Identity still reads the old mean
    rtol = 1e-3 if dtype == np.float16 else 1e-5
    nodes = {n.name: n for n in new.graph.node}
    for bn, data, out in (("bn1", xs, y1), ("bn2", zs, y2)):
        node = nodes[bn]
        all_data = np.concatenate(data).astype(np.float64).transpose(1, 0, 2, 3).reshape(3, -1)
        mean, var = (numpy_helper.to_array(inits[node.input[i]]) for i in (3, 4))
        assert mean.dtype == var.dtype == sd
        np.testing.assert_allclose(mean, all_data.mean(axis=1), rtol=rtol, atol=rtol)
        np.testing.assert_allclose(var, all_data.var(axis=1), rtol=rtol)
        scale, bias = (numpy_helper.to_array(inits[node.input[i]]).astype(np.float64) for i in (1, 2))
        if bn == "bn2":
            np.testing.assert_array_equal(bias, np.array([0.1, 0.2, 0.3], sd))  # B was the shared mean: kept
        want = numpy_bn(feeds["x" if bn == "bn1" else "z"].astype(np.float64), scale, bias, mean, var)
        np.testing.assert_allclose(out.astype(np.float64), want, rtol=10 * rtol, atol=10 * rtol)


def test_bn_inside_if_is_skipped_with_reason():
    """The main-graph BN is recalibrated; the one in an If branch is reported, unchanged."""
    c = 2
    params = [np.array(v, np.float32) for v in ([1, 1], [0, 0], [0.5, -0.5], [2, 3])]

    def branch(name):
        inits = [numpy_helper.from_array(p, f"{name}_{k}") for k, p in zip("sbmv", params)]
        node = helper.make_node("BatchNormalization", ["h", *[t.name for t in inits]], [f"{name}_y"], name=f"{name}_bn")
        return helper.make_graph([node], name, [], [helper.make_tensor_value_info(f"{name}_y", 1, None)], inits)

    g = G(opset=15)
    x = g.input(["n", c, 3], name="x", value=np.zeros((1, c, 3)))
    cond = g.input([], name="cond", dtype=np.bool_, value=np.array(True))
    h, _ = g.bn(x, c, name="main_bn", params=params)
    g.op("Identity", [h], outputs=["h"])
    g.op("If", [cond], outputs=["y"], then_branch=branch("then"), else_branch=branch("else"))
    g.output("y", shape=["n", c, 3])
    model = g.model()
    rng = np.random.default_rng(1)
    x_data = rng.standard_normal((5, c, 3)).astype(np.float32) * 2 + 3
    new, report = recalibrate(model, [{"x": x_data, "cond": np.array(True)}])
    assert [c.node for c in report.changes] == ["main_bn"]
    assert sorted(s.node for s in report.skipped) == ["else_bn", "then_bn"]
    assert all("subgraph" in s.reason for s in report.skipped)
    inits = {t.name: numpy_helper.to_array(t) for t in new.graph.initializer}
    main = [n for n in new.graph.node if n.name == "main_bn"][0]
    np.testing.assert_allclose(inits[main.input[3]], x_data.transpose(1, 0, 2).reshape(c, -1).mean(axis=1), rtol=1e-5)
    branch_inits = {t.name: numpy_helper.to_array(t) for n in new.graph.node if n.op_type == "If"
                    for a in n.attribute for t in a.g.initializer}
    np.testing.assert_array_equal(branch_inits["then_m"], params[2])


def test_nan_statistics_leave_the_bn_and_say_why():
    model = shared_params_model()
    x = np.ones((2, 3, 4, 4), np.float32)
    x[0, 1, 0, 0] = np.nan
    new, report = recalibrate(model, [{"x": x, "z": np.ones_like(np.nan_to_num(x))}])
    assert [s.node for s in report.skipped] == ["bn1"] and "NaN" in report.skipped[0].reason
    assert [c.node for c in report.changes] == ["bn2"]


# ------------------------------------------------------------------ CLI: output, progress, JSON
@pytest.fixture
def chain_files(tmp_path, chain_model):
    model_path = tmp_path / "model.onnx"
    model_path.write_bytes(chain_model.SerializeToString())
    data = save_batches(tmp_path / "calib", calibration_batches("conv_chain"))
    return model_path, data


def test_json_to_stdout_has_no_progress_bar(chain_files):
    model_path, data = chain_files
    code, out, err = run_cli("recalibrate", model_path, "--data", data, "--json", "-")
    assert code == 0 and err == ""
    report = json.loads(out)
    assert report["output"].endswith("model.recalibrated.onnx")
    assert report["passes"][0]["samples"] == sum(BATCH_SIZES)
    assert Path(report["output"]).is_file()


def test_progress_on_stderr_summary_on_stdout_quiet_silent(chain_files, monkeypatch):
    monkeypatch.setenv("NORMFOLD_PROGRESS", "1")  # progress shows on terminals; stderr is not one here
    model_path, data = chain_files
    code, out, err = run_cli("recalibrate", model_path, "--data", data, "-o", model_path.with_name("o.onnx"))
    assert code == 0
    assert "batch" in err and "wave" in err  # the progress bar
    assert "recalibrate: 3 changed" in out and f"{sum(BATCH_SIZES)} samples in 3 batches" in out
    code, out, err = run_cli("recalibrate", model_path, "--data", data, "-o", model_path.with_name("q.onnx"), "-q")
    assert (code, out, err) == (0, "", "")


def test_inplace(chain_files, chain_model):
    model_path, data = chain_files
    code, _, err = run_cli("recalibrate", model_path, "--data", data, "--inplace", "-q")
    assert code == 0, err
    new = onnx.load(str(model_path))
    assert not np.allclose(onnx_stats(new, "bn1")[0], onnx_stats(chain_model, "bn1")[0])


# ------------------------------------------------------------------ bad input
def assert_bad_input(code, out, err, *words):
    assert code == 2, f"exit code {code}, stderr: {err!r}"
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("normfold: error: "), lines
    assert "Traceback" not in err + out
    for word in words:
        assert word in lines[0], lines[0]


def _truncated_npz(folder):
    path = folder / "b.npz"
    np.savez(path, x=np.zeros((2, 3, 8, 8), np.float32))
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return path


def _stray_file(folder):
    (folder / "b0.npz").write_bytes(b"")
    np.savez(folder / "b0.npz", x=np.zeros((2, 3, 8, 8), np.float32))
    (folder / "notes.txt").write_text("hello")
    return folder


BAD_DATA = {
    "wrong rank": (lambda d: _npz(d, x=np.zeros((2, 3, 8), np.float32)), "shape"),
    "wrong dtype": (lambda d: _npz(d, x=np.zeros((2, 3, 8, 8), np.float64)), "float64"),
    "wrong channels": (lambda d: _npz(d, x=np.zeros((2, 4, 8, 8), np.float32)), "shape"),
    "two arrays, neither named x": (lambda d: _npz(d, a=np.zeros((2, 3, 8, 8), np.float32),
                                                   b=np.zeros((2, 3, 8, 8), np.float32)), "missing x"),
    "empty folder": (lambda d: _mkdir(d / "empty"), "no .npz"),
    "stray file in folder": (lambda d: _stray_file(_mkdir(d / "calib")), "notes.txt"),
    "not an npz": (lambda d: _write(d / "data.npz", b"not a zip file" * 10), "not a readable .npz"),
    "npy instead of npz": (lambda d: _npy(d / "data.npy"), "not a readable .npz"),
    "truncated npz": (_truncated_npz, "not a readable .npz"),
    "missing": (lambda d: d / "nothing_here", "no such file"),
    "no samples": (lambda d: _npz(d, x=np.zeros((0, 3, 8, 8), np.float32)), "no samples"),
}


def _npz(folder, **arrays):
    np.savez(folder / "data.npz", **arrays)
    return folder / "data.npz"


def _mkdir(path):
    path.mkdir()
    return path


def _write(path, data):
    path.write_bytes(data)
    return path


def _npy(path):
    np.save(path, np.zeros((2, 3, 8, 8), np.float32))
    return path


@pytest.mark.parametrize("case", list(BAD_DATA))
def test_bad_data(tmp_path, chain_model, case):
    model_path = tmp_path / "model.onnx"
    model_path.write_bytes(chain_model.SerializeToString())
    build, word = BAD_DATA[case]
    data = build(tmp_path)
    before = file_digests(tmp_path)
    assert_bad_input(*run_cli("recalibrate", model_path, "--data", data), word)
    assert_bad_input(*run_cli("recalibrate", model_path, "--data", data, "--inplace"), word)
    assert file_digests(tmp_path) == before, "files changed or were written"


def test_missing_input_in_two_input_model(tmp_path):
    model_path = tmp_path / "model.onnx"
    model_path.write_bytes(export(make("two_inputs"), "two_inputs").SerializeToString())
    np.savez(tmp_path / "data.npz", x=np.zeros((2, 3, 5, 5), np.float32))
    before = file_digests(tmp_path)
    assert_bad_input(*run_cli("recalibrate", model_path, "--data", tmp_path / "data.npz"), "missing z")
    assert file_digests(tmp_path) == before


def test_model_without_batchnorm_says_recalibrate_before_folding(tmp_path, chain_files):
    model_path, data = chain_files
    folded = model_path.with_name("folded.onnx")
    assert run_cli("fold-bn", model_path, "-o", folded, "-q")[0] == 0
    before = file_digests(model_path.parent)
    assert_bad_input(*run_cli("recalibrate", folded, "--data", data, "-o", model_path.with_name("r.onnx")),
                     "before folding", "unfolded model")
    assert file_digests(model_path.parent) == before
    with pytest.raises(NormfoldError, match="before folding"):
        recalibrate(onnx.load(str(folded)), str(data))


def test_one_shot_iterator_is_refused(chain_model):
    with pytest.raises(NormfoldError, match="iterator"):
        recalibrate(chain_model, iter(calibration_batches("conv_chain")))
