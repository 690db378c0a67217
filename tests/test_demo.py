"""`normfold demo` runs end to end: every built-in network is rewritten and matches."""

from __future__ import annotations

import onnx
from click.testing import CliRunner

from normfold.cli.main import main


def test_demo_folds_and_fuses(tmp_path):
    result = CliRunner().invoke(main, ["demo", "--keep", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "all rewritten models match" in result.output
    fused = sorted(tmp_path.glob("*.fused.onnx"))
    assert len(fused) == 4
    custom = [n.op_type for path in fused for n in onnx.load(str(path)).graph.node if n.domain == "com.normfold"]
    assert sorted(set(custom)) == ["FilterResponseNorm", "GroupNorm", "LayerNorm", "RMSNorm"]
    folded = sorted(tmp_path.glob("*.folded.onnx"))
    # left: BN before the padded 3x3 conv of the pre-activation net, and BN after the concat
    assert sum(n.op_type == "BatchNormalization" for p in folded for n in onnx.load(str(p)).graph.node) == 2
    assert "not a foldable layer" in " ".join(result.output.split())
