"""Packaging: `pip wheel` on a clean copy of the tree gives a wheel whose installed library runs
fused models with no source tree around; a build without onnxruntime's headers stops with one
line naming the three ways to provide them; NORMFOLD_NO_KERNELS=1 builds the pure-Python
package; `python -m normfold` is the command line.

The wheel builds compile the CPU library only (NORMFOLD_CUDA=OFF) on at most two cores."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import onnx
import pytest

from tests.helpers.graphs import G
from tests.helpers.norm_graphs import affine, custom_nodes, group_norm

ROOT = Path(__file__).resolve().parents[1]
HEADERS_LINE = "normfold: onnxruntime C/C++ API headers not found"


def _build_env(**extra: str) -> dict:
    """This process's environment without the variables that steer normfold's build, plus `extra`."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("NORMFOLD_") and k not in ("ONNXRUNTIME_INCLUDE_DIR", "PYTHONPATH")}
    return {**env, "CMAKE_BUILD_PARALLEL_LEVEL": "2", "NORMFOLD_CUDA": "OFF", **extra}


def _run(command: list, cwd: Path, env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run([str(c) for c in command], cwd=cwd, env=env or _build_env(), capture_output=True,
                            text=True, timeout=900)
    if check:
        assert result.returncode == 0, f"{command} failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    return result


def _pip_wheel(tree: Path, out: Path, env: dict, *config: str) -> subprocess.CompletedProcess:
    """`pip wheel` of `tree` into `out`, CMake building in `out`/build."""
    out.mkdir(parents=True, exist_ok=True)
    return _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", out, tree,
                 f"--config-settings=build-dir={out / 'build'}", *config], out, env, check=False)


@pytest.fixture(scope="module")
def clean_tree(tmp_path_factory) -> Path:
    """The files git tracks or would track (no build outputs, no venv), copied to a fresh folder."""
    listed = _run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], ROOT).stdout
    tree = tmp_path_factory.mktemp("tree") / "normfold-src"
    for name in filter(None, listed.split("\0")):
        if (ROOT / name).is_file():
            (tree / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, tree / name)
    assert (tree / "pyproject.toml").is_file() and not (tree / "build").exists()
    return tree


@pytest.fixture(scope="module")
def installed(clean_tree, tmp_path_factory) -> dict:
    """The wheel built from the clean tree (headers fetched as a first-time user's build would),
    installed with its dependencies into a fresh venv; commands run from an empty folder."""
    base = tmp_path_factory.mktemp("installed")
    built = _pip_wheel(clean_tree, base / "wheels", _build_env())
    assert built.returncode == 0, built.stdout[-4000:] + built.stderr[-4000:]
    wheel, = (base / "wheels").glob("normfold-*.whl")
    _run([sys.executable, "-m", "venv", base / "venv"], base)
    python = base / "venv" / "bin" / "python"
    _run([python, "-m", "pip", "install", "-q", wheel], base)
    work = base / "work"
    work.mkdir()
    return {"wheel": wheel, "venv": base / "venv", "python": python, "work": work}


@pytest.mark.slow
def test_wheel_carries_the_library_and_doctor_states_its_api_version(installed):
    with zipfile.ZipFile(installed["wheel"]) as wheel:
        names = wheel.namelist()
    assert "normfold/_ops/libnormfold_ops.so" in names
    assert not any(name.startswith("custom_ops/") for name in names)
    result = _run([installed["venv"] / "bin" / "normfold", "doctor", "--json", "-"], installed["work"])
    report = json.loads(result.stdout)
    site = Path(installed["venv"]).resolve()
    assert report["cpu_ops"]["works"], report["cpu_ops"]
    assert Path(report["cpu_ops"]["library"]).resolve().is_relative_to(site)
    assert report["install"]["kind"] == "archive"
    header, = (installed["wheel"].parent / "build").glob("onnxruntime-headers/usr/include/onnxruntime/onnxruntime_c_api.h")
    header_api = int(re.search(r"^#define ORT_API_VERSION (\d+)", header.read_text(), re.M).group(1))
    runtime_minor = int(report["versions"]["onnxruntime"].split(".")[1])
    assert report["onnxruntime_api"] == {"built": header_api, "runtime": runtime_minor,
                                         "compatible": header_api <= runtime_minor}
    assert report["onnxruntime_api"]["compatible"] is True
    assert "NORMFOLD_CUDA=OFF" in report["cuda_ops"]["not_built"]
    assert report["advice"] is None
    text = _run([installed["venv"] / "bin" / "normfold", "doctor"], installed["work"]).stdout
    assert "CPU kernels:    ok" in text and f"built against {header_api}" in text


RUN_BOTH = """
import sys, numpy as np, onnxruntime as ort, normfold
x = np.load(sys.argv[3])["x"]
plain = ort.InferenceSession(sys.argv[1], providers=["CPUExecutionProvider"])
options = ort.SessionOptions()
options.register_custom_ops_library(normfold.ops_library_path())
fused = ort.InferenceSession(sys.argv[2], options, providers=["CPUExecutionProvider"])
try:
    ort.InferenceSession(sys.argv[2], providers=["CPUExecutionProvider"])
    without = "ran"
except Exception:
    without = "refused"
name = plain.get_inputs()[0].name
np.savez(sys.argv[4], plain=plain.run(None, {name: x})[0], fused=fused.run(None, {name: x})[0])
print(normfold.ops_library_path(), without)
"""


@pytest.mark.slow
def test_installed_library_runs_a_fused_model_like_the_unfused_one(installed, tmp_path):
    g = G(rng=np.random.default_rng(7))
    x = g.input([2, 8, 5, 6], name="x")
    y = affine(g, group_norm(g, x, 8, 4, 1e-5), g.randn([8, 1, 1]), g.randn([8, 1, 1]))
    g.output(y)
    onnx.save(g.model(), tmp_path / "plain.onnx")
    np.savez(tmp_path / "x.npz", x=g.feeds[x])
    normfold = installed["venv"] / "bin" / "normfold"
    _run([normfold, "fuse", tmp_path / "plain.onnx", "-o", tmp_path / "fused.onnx", "--target", "custom",
          "--no-portable", "-q"], installed["work"])
    fused = onnx.load(tmp_path / "fused.onnx")
    assert [n.op_type for n in custom_nodes(fused)] == ["GroupNorm"] and not fused.functions
    result = _run([installed["python"], "-c", RUN_BOTH, tmp_path / "plain.onnx", tmp_path / "fused.onnx",
                   tmp_path / "x.npz", tmp_path / "out.npz"], installed["work"])
    library, without = result.stdout.split()
    assert Path(library).resolve().is_relative_to(installed["venv"].resolve())
    assert without == "refused"  # the fused model needs the library: the installed one ran it
    out = np.load(tmp_path / "out.npz")
    np.testing.assert_allclose(out["fused"], out["plain"], rtol=1e-5, atol=1e-5)


def _one_headers_line(result: subprocess.CompletedProcess) -> str:
    assert result.returncode != 0
    lines = [line.strip() for line in (result.stdout + result.stderr).splitlines() if HEADERS_LINE in line]
    assert len(lines) == 1, result.stdout[-3000:] + result.stderr[-3000:]
    for remedy in ("ONNXRUNTIME_INCLUDE_DIR", "libonnxruntime-dev", "NORMFOLD_FETCH_ORT_HEADERS",
                   "NORMFOLD_NO_KERNELS=1"):
        assert remedy in lines[0]
    return lines[0]


# System headers are hidden by re-rooting CMake's searches in an empty folder.
def _hidden_system(empty: Path) -> tuple[str, str]:
    return (f"--config-settings=cmake.define.CMAKE_FIND_ROOT_PATH={empty}",
            "--config-settings=cmake.define.CMAKE_FIND_ROOT_PATH_MODE_INCLUDE=ONLY")


@pytest.mark.slow
def test_build_without_headers_fails_with_one_line(clean_tree, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    result = _pip_wheel(clean_tree, tmp_path / "none", _build_env(NORMFOLD_FETCH_ORT_HEADERS="OFF"),
                        *_hidden_system(empty))
    assert "fetching is off" in _one_headers_line(result)
    result = _pip_wheel(clean_tree, tmp_path / "given", _build_env(ONNXRUNTIME_INCLUDE_DIR=str(empty)))
    assert f"the folder given ({empty}) has no onnxruntime_lite_custom_op.h" in _one_headers_line(result)
    assert not list(tmp_path.rglob("*.whl"))


@pytest.mark.slow
def test_no_kernels_builds_the_pure_python_package(clean_tree, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    env = _build_env(NORMFOLD_NO_KERNELS="1", NORMFOLD_FETCH_ORT_HEADERS="OFF")
    result = _pip_wheel(clean_tree, tmp_path / "wheels", env, *_hidden_system(empty))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    wheel, = (tmp_path / "wheels").glob("normfold-*.whl")
    assert wheel.name.endswith("-py3-none-any.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
    assert "normfold/cli/main.py" in names and not [n for n in names if n.endswith(".so")]


def test_python_m_normfold_is_the_command_line(tmp_path):
    doctor = _run([sys.executable, "-m", "normfold", "doctor", "--json", "-"], tmp_path, dict(os.environ))
    assert json.loads(doctor.stdout)["cpu_ops"]["works"] is True
    missing = _run([sys.executable, "-m", "normfold", "fold-bn", tmp_path / "missing.onnx"], tmp_path,
                   dict(os.environ), check=False)
    assert missing.returncode == 2 and "missing.onnx" in missing.stderr
    assert len(missing.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "missing.onnx").exists()
