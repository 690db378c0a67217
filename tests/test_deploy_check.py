"""The output check of every writing command (`normfold.pipeline.deploy_check`):
the result runs and matches the input in the four deployment configurations,
breaking rewrites are rolled back (exactly those, the rest kept), and the
failure classes of issue 14 (4: unnamed tensors in external data; 5: -1 sizes
around fused ops) on small models that reproduce them."""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from normfold.passes.registry import PASSES, PassSpec
from normfold.pipeline.files import rewrite_file
from normfold.report import EXCLUDED, PassReport
from normfold.runtime.session import CONFIGURATIONS, make_session
from tests.test_cli_fold_bn import run_cli

ALL = tuple(CONFIGURATIONS)


def relu_chain(n: int, width: int = 8) -> onnx.ModelProto:
    """x -> n x (MatMul, Relu) -> y, ReLU nodes named relu0..relu{n-1}."""
    rng = np.random.default_rng(n)
    nodes, inits, last = [], [], "x"
    for i in range(n):
        inits.append(numpy_helper.from_array(rng.standard_normal((width, width)).astype(np.float32), f"w{i}"))
        nodes += [helper.make_node("MatMul", [last, f"w{i}"], [f"m{i}"], name=f"mm{i}"),
                  helper.make_node("Relu", [f"m{i}"], [f"r{i}"], name=f"relu{i}")]
        last = f"r{i}"
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, width])],
                              [helper.make_tensor_value_info(last, TensorProto.FLOAT, [4, width])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def relu_rewriter(bad: dict[str, str], name: str = "relu-rewrite"):
    """A pass rewriting Relu(x) as Max(x, 0) (exact); the nodes in `bad` get a
    broken rewrite instead: "abs" (wrong numbers) or "invalid" (refused by the
    onnx checker). It reports as `name` and honours `exclude` as registered passes do."""

    def rewrite_relus(graph: gs.Graph, exclude: frozenset[str] = frozenset(), **_fuse_options) -> PassReport:
        report = PassReport(name)
        for node in [n for n in graph.nodes if n.op == "Relu"]:
            if node.name in exclude:
                report.skip(node.name, "Relu", EXCLUDED)
                continue
            kind = bad.get(node.name)
            if kind == "abs":
                node.op = "Abs"
            elif kind == "invalid":
                node.attrs["no_such_attribute"] = 1
            else:
                node.op = "Max"
                node.inputs.append(gs.Constant(f"{node.name}_zero", np.zeros((), np.float32)))
            report.changed(node.name, "Relu", node.op)
        return report

    return rewrite_relus


def run_rewriter(tmp_path, monkeypatch, n: int, bad: dict[str, str]):
    monkeypatch.setitem(PASSES, "relu-rewrite", PassSpec("relu-rewrite", relu_rewriter(bad), "test pass",
                                                         {"exclude": frozenset()}))
    src, out = tmp_path / "chain.onnx", tmp_path / "chain.out.onnx"
    onnx.save(relu_chain(n), src)
    return src, out, rewrite_file(src, out, False, ("relu-rewrite",))


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_exactly_the_breaking_rewrites_are_rolled_back(tmp_path_factory, monkeypatch, data):
    n = data.draw(st.integers(1, 9), label="n")
    names = [f"relu{i}" for i in range(n)]
    bad = data.draw(st.dictionaries(st.sampled_from(names), st.sampled_from(["abs", "invalid"]), max_size=3))
    tmp_path = tmp_path_factory.mktemp("rollback")
    src, out, summary = run_rewriter(tmp_path, monkeypatch, n, bad)
    assert {r.node for r in summary.rollbacks} == set(bad)
    for rollback in summary.rollbacks:
        expected = "outside tolerance" if bad[rollback.node] == "abs" else "no_such_attribute"
        assert expected in rollback.reason, rollback.reason
    assert summary.written and summary.verification.passed
    written = onnx.load(out)
    ops = {node.name: node.op_type for node in written.graph.node}
    assert {name for name in names if ops[name] == "Relu"} == set(bad)  # rolled back: left as it was
    assert {name for name in names if ops[name] == "Max"} == set(names) - set(bad)  # the rest kept
    x = np.random.default_rng(1).standard_normal((4, 8)).astype(np.float32)
    reference = make_session(str(src)).run(None, {"x": x})[0]
    for config in CONFIGURATIONS.values():
        got = make_session(str(out), optimize=config.optimize, library=config.library).run(None, {"x": x})[0]
        np.testing.assert_allclose(got, reference, rtol=1e-6, atol=1e-6)


def test_rollbacks_reported_in_json_and_exit_0(tmp_path, monkeypatch):
    monkeypatch.setitem(PASSES, "fuse", PassSpec("fuse", relu_rewriter({"relu1": "abs"}, "fuse"), "test pass",
                                                 {"exclude": frozenset(), "ops": (), "target": "auto"}))
    src = tmp_path / "chain.onnx"
    onnx.save(relu_chain(3), src)
    code, stdout, stderr = run_cli("fuse", src, "-o", tmp_path / "o.onnx", "--json", "-")
    assert code == 0, stderr
    report = json.loads(stdout)
    assert report["checked"] and report["written"]
    assert [c["name"] for c in report["verification"]["configurations"]] == list(ALL)
    assert all(c["status"] == "pass" for c in report["verification"]["configurations"])
    [rollback] = report["rollbacks"]
    assert rollback["node"] == "relu1" and rollback["pass_name"] == "fuse" and "outside tolerance" in rollback["reason"]


def test_no_check_writes_the_broken_rewrite(tmp_path, monkeypatch):
    monkeypatch.setitem(PASSES, "fuse", PassSpec("fuse", relu_rewriter({"relu0": "abs"}, "fuse"), "test pass",
                                                 {"exclude": frozenset(), "ops": (), "target": "auto"}))
    src, out = tmp_path / "chain.onnx", tmp_path / "o.onnx"
    onnx.save(relu_chain(2), src)
    code, stdout, stderr = run_cli("fuse", src, "-o", out, "--no-check", "--json", "-")
    assert code == 0, stderr
    report = json.loads(stdout)
    assert not report["checked"] and report["rollbacks"] == []
    assert [n.op_type for n in onnx.load(out).graph.node if n.name == "relu0"] == ["Abs"]


def test_failure_no_rollback_can_fix_writes_nothing(tmp_path, monkeypatch):
    """A pass that breaks the model without reporting a change: nothing to roll back, exit 1, nothing written."""

    def silent(graph: gs.Graph, exclude: frozenset[str] = frozenset(), **_fuse_options) -> PassReport:
        next(n for n in graph.nodes if n.op == "Relu").op = "Abs"
        return PassReport("fuse")

    monkeypatch.setitem(PASSES, "fuse", PassSpec("fuse", silent, "test", {"exclude": frozenset(), "ops": (),
                                                                           "target": "auto"}))
    src, out = tmp_path / "chain.onnx", tmp_path / "o.onnx"
    onnx.save(relu_chain(2), src)
    code, _, stderr = run_cli("fuse", src, "-o", out)
    assert code == 1 and "output check failed" in stderr and "outside tolerance" in stderr
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["chain.onnx"]


def group_norm_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.GroupNorm(2, 8), nn.SiLU(), nn.Conv2d(8, 4, 1)).eval()


def export(module: nn.Module, args: tuple, path, opset: int = 17, **kw) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, args, path, dynamo=False, opset_version=opset, do_constant_folding=True, **kw)


def test_no_portable_output_needs_the_library_as_a_fact(tmp_path):
    src, out = tmp_path / "gn.onnx", tmp_path / "gn.fused.onnx"
    export(group_norm_model(), (torch.randn(1, 3, 8, 8),), src)
    code, stdout, stderr = run_cli("fuse", src, "-o", out, "--no-portable", "--json", "-")
    assert code == 0, stderr
    configs = {c["name"]: c for c in json.loads(stdout)["verification"]["configurations"]}
    assert configs["lib-none"]["status"] == configs["lib-all"]["status"] == "pass"
    for name in ("nolib-none", "nolib-all"):
        assert configs[name]["status"] == "n/a" and "needs normfold's library: GroupNorm" in configs[name]["detail"]
    assert any(n.domain == "com.normfold" for n in onnx.load(out).graph.node)


def test_verify_configs_option(tmp_path):
    src = tmp_path / "gn.onnx"
    export(group_norm_model(), (torch.randn(1, 3, 8, 8),), src)
    code, stdout, stderr = run_cli("verify", src, "--against", src, "--configs", "nolib-all,lib-none", "--json", "-")
    assert code == 0, stderr
    assert [c["name"] for c in json.loads(stdout)["configurations"]] == ["nolib-all", "lib-none"]
    code, _, stderr = run_cli("verify", src, "--against", src, "--configs", "lib-fast")
    assert code == 2 and "unknown configuration(s) lib-fast" in stderr


# ---------------------------------------------------------------- issue 14, class 4


def test_constant_values_stay_inline_with_external_data(tmp_path):
    """A Constant node holding ≥ 1 KB in a model with external data: its value has no
    name and must not go to the .data file (onnx and onnxruntime resolve it against
    the working folder: "Data of TensorProto ( tensor name: ) ... is not regular file")."""
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Constant", [], ["c"], value=numpy_helper.from_array(
                 rng.standard_normal((16, 64)).astype(np.float32), "")),
             helper.make_node("MatMul", ["x", "w"], ["m"]), helper.make_node("Add", ["m", "c"], ["a"]),
             helper.make_node("Identity", ["a"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [16, 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [16, 64])],
                              [numpy_helper.from_array(rng.standard_normal((64, 64)).astype(np.float32), "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    src, out = tmp_path / "m.onnx", tmp_path / "out" / "m.opt.onnx"
    out.parent.mkdir()
    onnx.save(model, src, save_as_external_data=True, location="m.onnx.data", size_threshold=0)
    code, _, stderr = run_cli("optimize", src, "-o", out)
    assert code == 0, stderr
    written = onnx.load(out, load_external_data=False)
    constant = next(n for n in written.graph.node if n.op_type == "Constant").attribute[0].t
    assert constant.data_location == TensorProto.DEFAULT and len(constant.raw_data) == 16 * 64 * 4
    assert any(t.data_location == TensorProto.EXTERNAL for t in written.graph.initializer)
    x = rng.standard_normal((16, 64)).astype(np.float32)
    np.testing.assert_allclose(make_session(str(out)).run(None, {"x": x})[0],
                               make_session(str(src)).run(None, {"x": x})[0], rtol=1e-5, atol=1e-5)


def test_dynamo_export_with_external_data_optimizes(tmp_path):
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(64, 64), nn.LayerNorm(64), nn.GELU(), nn.Linear(64, 64)).eval()
    src, out = tmp_path / "d.onnx", tmp_path / "d.opt.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (torch.randn(2, 16, 64),), src, dynamo=True, opset_version=18, optimize=False,
                          external_data=True)
    code, stdout, stderr = run_cli("optimize", src, "-o", out, "--json", "-")
    assert code == 0, stderr
    assert json.loads(stdout)["verification"]["passed"]
    x = torch.randn(2, 16, 64)
    got = make_session(str(out), optimize=True).run(None, {make_session(str(out)).get_inputs()[0].name: x.numpy()})
    np.testing.assert_allclose(got[0], module(x).detach().numpy(), rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- issue 14, class 5
# onnxruntime loses a size (computed Reshape targets, sliced buffers) before a fused norm; the
# custom ops' shape inference then wrote it back as the size -1; it now names such a size afresh
# (same_as_input in custom_ops/src/ort_glue.h).


class LlamaRMSAfterReshape(nn.Module):
    """5a: Llama's RMSNorm (x.float() ... .to(dtype), rsqrt, then the weight Mul) after a computed reshape."""

    def __init__(self, d=16):
        super().__init__()
        self.inp, self.out, self.weight = nn.Linear(d, d), nn.Linear(d, d), nn.Parameter(torch.randn(d))

    def forward(self, x):
        h = self.inp(x)
        b, t, d = h.shape
        h = h.reshape(b * t, d).reshape(b, t, d)
        dtype, f = h.dtype, h.to(torch.float32)
        f = f * torch.rsqrt(f.pow(2).mean(-1, keepdim=True) + 1e-6)
        return self.out(self.weight * f.to(dtype))


class GroupNormAttention(nn.Module):
    """5b: a diffusion-style attention block: GroupNorm, then q, k, v reshaped from the norm's shape."""

    def __init__(self, c=16):
        super().__init__()
        self.conv, self.norm = nn.Conv2d(3, c, 3, padding=1), nn.GroupNorm(4, c)
        self.qkv, self.proj = nn.Conv2d(c, 3 * c, 1), nn.Conv2d(c, c, 1)

    def forward(self, x):
        h = self.conv(x)
        b, c, hh, ww = h.shape
        h = h.view(b, c, hh * ww).view(b, c, hh, ww)
        n = self.norm(h)
        b, c, hh, ww = n.shape
        q, k, v = self.qkv(n).reshape(b, 3, c, hh * ww).unbind(1)
        a = torch.softmax(q.transpose(1, 2) @ k / math.sqrt(c), -1)
        return h + self.proj((v @ a.transpose(1, 2)).reshape(b, c, hh, ww))


class BertStyleEncoder(nn.Module):
    """5c: BERT-style embeddings (sliced position/token-type buffers), LayerNorm, attention with -1 reshapes."""

    def __init__(self, d=32, heads=4, vocab=50):
        super().__init__()
        self.emb, self.pos, self.tt = nn.Embedding(vocab, d), nn.Embedding(16, d), nn.Embedding(2, d)
        self.register_buffer("pos_ids", torch.arange(16).unsqueeze(0), persistent=False)
        self.register_buffer("tt_ids", torch.zeros(1, 16, dtype=torch.long), persistent=False)
        self.ln, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.heads = heads

    def split(self, x):
        return x.view(*x.shape[:-1], -1, x.size(-1) // self.heads).transpose(1, 2)

    def forward(self, ids):
        b, t = ids.size()
        h = self.ln(self.emb(ids) + self.tt(self.tt_ids[:, :t].expand(b, t)) + self.pos(self.pos_ids[:, :t]))
        q, k, v = self.split(self.q(h)), self.split(self.k(h)), self.split(self.v(h))
        a = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.size(-1)), -1)
        c = (a @ v).transpose(1, 2).reshape(*h.shape[:-1], -1)
        return self.ln2(h + self.o(c))


CLASS_5 = {
    "5a-llama-rmsnorm": (LlamaRMSAfterReshape, lambda: torch.randn(2, 5, 16), 17, {0: "n", 1: "t"}, "RMSNorm"),
    "5b-groupnorm-attention": (GroupNormAttention, lambda: torch.randn(1, 3, 8, 8), 17, {0: "n", 2: "h", 3: "w"},
                               "GroupNorm"),
    "5c-bert-encoder": (BertStyleEncoder, lambda: torch.randint(0, 50, (1, 8)), 13, None, "LayerNorm"),
}


@pytest.mark.parametrize("case", CLASS_5)
def test_fused_model_loads_in_every_configuration(tmp_path, case):
    make, example, opset, dynamic, fused_op = CLASS_5[case]
    torch.manual_seed(0)
    module, x = make().eval(), example()
    src, out = tmp_path / "m.onnx", tmp_path / "m.opt.onnx"
    export(module, (x,), src, opset, input_names=["x"],
           **({"dynamic_axes": {"x": dynamic}} if dynamic else {}))
    # --no-check: the rewrite itself must be right, not rescued by a rollback
    code, _, stderr = run_cli("optimize", src, "-o", out, "--no-check", "--no-measure", "-q")  # nor a timing revert
    assert code == 0, stderr
    written = onnx.load(out)
    fused_ops = (fused_op, f"Skip{fused_op}", f"Skip{fused_op}Sum")  # a residual add may be fused in too
    assert any(n.domain == "com.normfold" and n.op_type in fused_ops for n in written.graph.node)
    with torch.no_grad():
        expected = module(x).numpy()
    for config in CONFIGURATIONS.values():
        session = make_session(str(out), optimize=config.optimize, library=config.library)
        got = session.run(None, {"x": x.numpy()})[0]
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5, err_msg=config.name)
