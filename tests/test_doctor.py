"""`normfold doctor`: the report (API versions, installation, advice), and the CLI command."""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

import onnxruntime as ort
from click.testing import CliRunner

from normfold.ops import library as ops_library
from normfold.cli.main import main
from normfold.tools import doctor as doctor_module
from normfold.cli.render import format_doctor
from normfold.tools.doctor import doctor

ROOT = Path(__file__).resolve().parents[1]


def test_report_says_cpu_kernels_work():
    report = doctor()
    assert report["cpu_ops"]["works"], report["cpu_ops"]
    assert report["cpu_ops"]["library"] == ops_library.ops_library_path()
    assert report["versions"]["onnxruntime"] and report["versions"]["normfold"]
    assert "CPUExecutionProvider" in report["providers"]
    assert set(report["cuda_provider"]) == {"listed", "usable", "error"}
    assert report["advice"] is None
    text = format_doctor(report)
    assert "CPU kernels:    ok" in text and "CUDA provider:" in text and "to fix:" not in text


def test_report_says_which_copy_of_the_cpu_loops_runs():
    """The widest copy this CPU has (from /proc/cpuinfo), capped by NORMFOLD_LOOPS if this process has it,
    in the JSON and the text (tests/test_custom_ops.py checks the cap in fresh processes)."""
    flags = set(Path("/proc/cpuinfo").read_text().split()) if Path("/proc/cpuinfo").exists() else set()
    copies = ["baseline", "avx2", "avx512"]
    widest = 2 if {"avx512f", "avx512vl", "avx512bw", "avx512dq"} <= flags else 1 if {"avx2", "fma"} <= flags else 0
    cap = os.environ.get("NORMFOLD_LOOPS", "")
    expected = copies[min(widest, copies.index(cap))] if cap in copies else copies[widest]
    report = doctor()
    assert report["cpu_ops"]["loops"] == expected
    assert f"ok ({expected} loops, " in format_doctor(report)


def test_api_versions_of_the_library_and_of_onnxruntime():
    """The built version is the one compiled into the library; onnxruntime 1.N serves up to N."""
    api = doctor()["onnxruntime_api"]
    minor = int(re.match(r"1\.(\d+)\.", ort.__version__).group(1))
    assert api["runtime"] == minor
    assert isinstance(api["built"], int) and 17 <= api["built"] <= minor  # the lite custom-op API needs 17
    assert api["compatible"] is True
    assert api["built"] == ops_library.built_api_version(ops_library.ops_library_path())


def test_a_library_newer_than_onnxruntime_is_reported_incompatible(monkeypatch):
    built = ops_library.built_api_version(ops_library.ops_library_path())
    monkeypatch.setattr(doctor_module, "runtime_api_version", lambda: built - 1)
    report = doctor()
    assert report["onnxruntime_api"] == {"built": built, "runtime": built - 1, "compatible": False}
    assert f"NOT compatible (needs onnxruntime 1.{built} or newer)" in format_doctor(report)
    monkeypatch.setattr(doctor_module, "_check_kernels", lambda library, provider: {"works": False, "error": "x"})
    assert doctor()["advice"].startswith(f"upgrade onnxruntime to 1.{built} or newer, or rebuild against headers"
                                         f" of onnxruntime 1.{built - 1} or older (ONNXRUNTIME_INCLUDE_DIR=...): ")


def test_installation_is_the_editable_checkout():
    """setup.sh's editable install; its library lies in site-packages, so cleaning the tree's build
    outputs (build/, normfold/_ops/) does not lose it."""
    assert doctor()["install"] == {"kind": "editable", "source": str(ROOT)}
    library = Path(ops_library.ops_library_path()).resolve()
    assert library.parent.parent.parent.name == "site-packages", library
    assert not library.is_relative_to(ROOT / "build") and not library.is_relative_to(ROOT / "normfold")


def test_missing_library_advice_fits_the_installation(monkeypatch):
    monkeypatch.setenv("NORMFOLD_OPS_LIBRARY", "/nonexistent/libnormfold_ops.so")
    monkeypatch.setenv("NORMFOLD_CUDA_OPS_LIBRARY", "/nonexistent/libnormfold_ops_cuda.so")
    report = doctor()
    assert report["cpu_ops"]["works"] is False and report["onnxruntime_api"]["built"] is None
    assert report["advice"].endswith(f"{sys.executable} -m pip install --no-deps -e {ROOT}")
    assert "NORMFOLD_NO_KERNELS unset" in report["advice"]
    text = format_doctor(report)
    assert "CPU kernels:    NOT AVAILABLE: not built" in text and f"to fix:         {report['advice']}" in text
    for install, expected in (({"kind": "directory", "source": "/src/normfold"}, "--force-reinstall /src/normfold"),
                              ({"kind": "archive", "source": "file:///w/normfold.whl"}, "came from a wheel or archive"),
                              ({"kind": "index", "source": None}, "pip wheel SOURCE")):
        monkeypatch.setattr(doctor_module, "_installation", lambda install=install: install)
        advice = doctor()["advice"]
        assert expected in advice and "build.sh" not in advice


def test_cuda_note_from_the_build_is_reported(tmp_path, monkeypatch):
    monkeypatch.setattr(ops_library, "ops_dirs", lambda: [tmp_path])
    (tmp_path / ops_library.CUDA_NOT_BUILT_NOTE).write_text("nvcc not found when normfold was built\n")
    report = doctor()
    assert report["cuda_ops"]["library"] is None
    assert report["cuda_ops"]["not_built"] == "nvcc not found when normfold was built"
    assert "CUDA kernels:   not built: nvcc not found when normfold was built" in format_doctor(report)


def test_cli_json_and_exit_codes(monkeypatch):
    result = CliRunner().invoke(main, ["doctor", "--json", "-"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["cpu_ops"]["works"] is True
    monkeypatch.setenv("NORMFOLD_OPS_LIBRARY", "/nonexistent/libnormfold_ops.so")
    result = CliRunner().invoke(main, ["doctor"])
    assert result.exit_code == 1
    assert "CPU kernels:    NOT AVAILABLE" in result.output
