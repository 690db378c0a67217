"""Every case in norm_models.CASES exports with both PyTorch exporters and runs in
onnxruntime, matching PyTorch.

Fast (not marked slow): every case with the TorchScript exporter at opsets 13 and 18, one case per
family with the dynamo exporter at opset 18. Marked slow: every case with dynamo at opsets 17 and 18,
GroupNorm cases at dynamo opset 21 and RMSNorm cases at dynamo opset 23 (the opsets that have
GroupNormalization-21 / RMSNormalization-23). Exports are cached on disk (norm_models.cache_dir()),
so re-runs are fast. Combinations an exporter cannot do are listed in
norm_models.KNOWN_EXPORT_FAILURES; those tests check that the export really fails, then skip.
dynamo below opset 18 skips (norm_models.DYNAMO_BELOW_18) when the exporter fell back to opset 18.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnxscript")
ort = pytest.importorskip("onnxruntime")

import tests.helpers.norm_models as nm  # noqa: E402

ATOL = RTOL = 1e-4

# one representative per family for the fast dynamo run
DYNAMO_FAST = {}
for _name, _family in nm.FAMILY.items():
    if _name not in nm.NEGATIVE:
        DYNAMO_FAST.setdefault(_family, _name)


def _params():
    out = []
    for name in nm.CASES:
        family = nm.FAMILY[name]
        for opset in (13, 18):
            out.append(pytest.param(name, "torchscript", opset, True, id=f"{name}-ts{opset}"))
        out.append(pytest.param(name, "torchscript", 13, False, id=f"{name}-ts13-nofold"))
        for opset in (17, 18):
            fast = opset == 18 and DYNAMO_FAST.get(family) == name
            marks = () if fast else (pytest.mark.slow,)
            out.append(pytest.param(name, "dynamo", opset, True, id=f"{name}-dynamo{opset}", marks=marks))
        if family == "groupnorm":
            out.append(pytest.param(name, "dynamo", 21, True, id=f"{name}-dynamo21", marks=pytest.mark.slow))
            out.append(pytest.param(name, "torchscript", 21, True, id=f"{name}-ts21"))
        if family == "rmsnorm":
            out.append(pytest.param(name, "dynamo", 23, True, id=f"{name}-dynamo23", marks=pytest.mark.slow))
    # the un-optimized dynamo exports keep the most structure: check a representative set
    for family, name in DYNAMO_FAST.items():
        out.append(pytest.param(name, "dynamo", 18, False, id=f"{name}-dynamo18-nofold", marks=pytest.mark.slow))
    return out


def _run(model, args):
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    feeds = {i.name: a.numpy() for i, a in zip(sess.get_inputs(), args)}
    return sess.run(None, feeds)


@pytest.mark.parametrize("name,exporter,opset,folding", _params())
def test_case_exports_and_matches_torch(name, exporter, opset, folding):
    reason = nm.known_failure(name, exporter, opset)
    if reason:
        with pytest.raises(nm.ExportError):
            nm.export_case(name, exporter=exporter, opset=opset, constant_folding=folding)
        pytest.skip(f"known exporter limitation: {reason}")
    try:
        model = nm.export_case(name, exporter=exporter, opset=opset, constant_folding=folding)
    except nm.ExportError as exc:
        if exporter == "dynamo" and opset < 18 and nm.is_downconvert_failure(exc):
            pytest.skip(nm.DYNAMO_BELOW_18)
        raise
    assert model.ir_version <= nm.MAX_IR_VERSION
    assert {o.version for o in model.opset_import if o.domain in ("", "ai.onnx")} == {opset}

    module = nm.make(name)
    args = nm.example_inputs(name, seed=1)  # not the export's example input
    expected = nm.torch_outputs(module, args)
    got = _run(model, args)
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        np.testing.assert_allclose(g, e, atol=ATOL, rtol=RTOL)


def test_registry_is_consistent():
    assert set(nm.CASES) == set(nm.FAMILY)
    assert nm.NEGATIVE <= set(nm.CASES) and set(nm.NEGATIVE_REASON) == nm.NEGATIVE
    assert {nm.FAMILY[n] for n in nm.CASES} == {
        "groupnorm", "layernorm", "layernorm_cf", "rmsnorm", "frn", "weightnorm", "weightstd"}
    for name, (factory, shape) in nm.CASES.items():
        module = factory()
        assert not module.training, name
        assert all(len(s) >= 1 for s in nm.input_shapes(name)), name


@pytest.mark.parametrize("name", [n for n in nm.CASES if n not in nm.NEGATIVE])
def test_affine_parameters_are_not_trivial(name):
    """γ is not all ones and β/τ not all zeros (the identity init hides mistakes); a weight-norm
    magnitude g is not the default ||v||."""
    module = nm.make(name)
    checked = 0
    for sub in module.modules():
        if isinstance(sub, (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d, torch.nn.Linear)):
            if hasattr(sub, "parametrizations"):
                g, v = sub.parametrizations.weight.original0, sub.parametrizations.weight.original1
            elif hasattr(sub, "weight_g"):
                g, v = sub.weight_g, sub.weight_v
            else:
                continue
            dims = [d for d in range(v.dim()) if g.shape[d] == 1]
            assert not torch.allclose(g, torch.linalg.vector_norm(v, dim=dims, keepdim=True)), name
            checked += 1
            continue
        for pname, p in sub.named_parameters(recurse=False):
            if pname in ("weight", "gamma"):
                assert not torch.allclose(p, torch.ones_like(p)), (name, pname)
            elif pname in ("bias", "beta", "tau"):
                assert not torch.allclose(p, torch.zeros_like(p)), (name, pname)
            else:
                continue
            checked += 1
    if "noaffine" in name:
        return
    assert checked, f"{name}: no norm parameters found"


def test_factories_are_deterministic():
    for name in ("gn2d_g4_silu", "frn_tlu_learned_eps", "wn_linear_dim1"):
        a, b = nm.make(name).state_dict(), nm.make(name).state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a), name
        x1, x2 = nm.example_inputs(name), nm.example_inputs(name)
        assert all(torch.equal(u, v) for u, v in zip(x1, x2))


def test_export_cache_returns_the_same_model(tmp_path, monkeypatch):
    monkeypatch.setenv("NORMFOLD_EXPORT_CACHE", str(tmp_path))
    first = nm.export_case("ln_last1", exporter="torchscript", opset=17)
    files = list(tmp_path.glob("*.onnx"))
    assert len(files) == 1 and files[0].name.startswith("ln_last1-torchscript-op17-cf1-")
    second = nm.export_case("ln_last1", exporter="torchscript", opset=17)
    assert first.SerializeToString() == second.SerializeToString()
    # a different flag is a different entry
    nm.export_case("ln_last1", exporter="torchscript", opset=17, constant_folding=False)
    assert len(list(tmp_path.glob("*.onnx"))) == 2
    # a changed parameter is a different entry
    module = nm.make("ln_last1")
    with torch.no_grad():
        module.norm.weight.add_(1.0)
    nm.export(module, nm.example_inputs("ln_last1"), exporter="torchscript", opset=17, name="ln_last1")
    assert len(list(tmp_path.glob("*.onnx"))) == 3


def test_failed_exports_are_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("NORMFOLD_EXPORT_CACHE", str(tmp_path))
    with pytest.raises(nm.ExportError, match="rms_norm"):
        nm.export_case("rms_nn", exporter="torchscript", opset=17)
    assert len(list(tmp_path.glob("*.err"))) == 1
    with pytest.raises(nm.ExportError, match="rms_norm"):  # from the cache
        nm.export_case("rms_nn", exporter="torchscript", opset=17)


def test_multi_input_and_multi_output_names():
    model = nm.export_case("neg_ln_runtime_gamma", exporter="torchscript", opset=17)
    assert [i.name for i in model.graph.input] == ["x", "gamma"]
    model = nm.export_case("neg_rms_extra_output", exporter="torchscript", opset=17)
    assert [o.name for o in model.graph.output] == ["y0", "y1"]
