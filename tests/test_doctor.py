"""`normfold doctor`: the report, the build-failure note, and the CLI command."""

from __future__ import annotations

import json

from click.testing import CliRunner

from normfold.ops import library as ops_library
from normfold.cli.main import main
from normfold.tools.doctor import doctor, format_doctor


def test_report_says_cpu_kernels_work():
    report = doctor()
    assert report["cpu_ops"]["works"], report["cpu_ops"]
    assert report["cpu_ops"]["library"] == ops_library.ops_library_path()
    assert report["versions"]["onnxruntime"] and report["versions"]["normfold"]
    assert "CPUExecutionProvider" in report["providers"]
    assert set(report["cuda_provider"]) == {"listed", "usable", "error"}
    text = format_doctor(report)
    assert "CPU kernels:    ok" in text and "CUDA provider:" in text


def test_missing_library_reports_the_build_failure(tmp_path, monkeypatch):
    monkeypatch.setattr(ops_library, "OPS_DIR", tmp_path)
    monkeypatch.delenv("NORMFOLD_OPS_LIBRARY", raising=False)
    (tmp_path / "BUILD_FAILED.txt").write_text("downloading libonnxruntime-dev from Debian trixie failed (network?)\n")
    report = doctor()
    assert report["cpu_ops"]["works"] is False
    assert report["cpu_ops"]["build_failure"].startswith("downloading libonnxruntime-dev")
    assert "NOT AVAILABLE: downloading libonnxruntime-dev" in format_doctor(report)


def test_cli_json_and_exit_codes(monkeypatch):
    result = CliRunner().invoke(main, ["doctor", "--json", "-"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["cpu_ops"]["works"] is True
    monkeypatch.setenv("NORMFOLD_OPS_LIBRARY", "/nonexistent/libnormfold_ops.so")
    result = CliRunner().invoke(main, ["doctor"])
    assert result.exit_code == 1
    assert "CPU kernels:    NOT AVAILABLE" in result.output
