"""Smoke test of the fold-bn benchmark's model generator (the tools are not run)."""

import json
import subprocess
import sys
from pathlib import Path

import onnx

ROOT = Path(__file__).resolve().parents[1]


def test_quick_generator_writes_a_valid_model_with_the_requested_pairs(tmp_path):
    subprocess.run([sys.executable, "-m", "benchmarks.bench_fold_bn", "--quick", "--generate-only", "--pairs", "9",
                    "--out", str(tmp_path)], check=True, capture_output=True, timeout=120, cwd=ROOT)
    model = onnx.load(tmp_path / "model.onnx")
    onnx.checker.check_model(model, full_check=True)

    from benchmarks.bench_fold_bn import count_conv_bn_pairs

    assert count_conv_bn_pairs(model) == 9
    facts = json.loads((tmp_path / "model.json").read_text())
    ops = [n.op_type for n in model.graph.node]
    assert facts["bn_total"] == ops.count("BatchNormalization") == 9 + 4
    assert "ConvTranspose" in ops and "Gemm" in ops and "Concat" in ops
    assert any(a.name == "group" and a.i > 1 for n in model.graph.node for a in n.attribute)
