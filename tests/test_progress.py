"""Progress of long steps (normfold.progress): shown on stderr only for steps
that last, never with -q or when --json writes to stdout."""

from __future__ import annotations

import io
import json
import time

import onnx
from click.testing import CliRunner

import normfold.progress as progress_module
from tests.helpers.graphs import conv_bn_model
from normfold.cli.main import main
from normfold.progress import Progress


def test_short_steps_stay_quiet_long_ones_show_with_their_time():
    stream = io.StringIO()
    progress = Progress(enabled=True, stream=stream, show_after=0.2)
    with progress.step("quick"):
        pass
    assert stream.getvalue() == ""
    with progress.step("slow"):
        time.sleep(0.5)
    line = stream.getvalue()
    assert line.startswith("normfold: slow ...") and line.endswith(" s\n")
    assert 0.4 <= float(line.split("...")[1].split()[0]) < 5


def test_disabled_progress_writes_nothing():
    stream = io.StringIO()
    progress = Progress(enabled=False, stream=stream, show_after=0)
    with progress.step("anything"):
        pass
    assert list(progress.each(range(3), "items")) == [0, 1, 2]
    assert stream.getvalue() == ""


def test_each_shows_a_bar_once_slow():
    stream = io.StringIO()
    progress = Progress(enabled=True, stream=stream, show_after=0)
    assert list(progress.each(range(3), "samples", total=3)) == [0, 1, 2]
    assert "normfold: samples" in stream.getvalue()


def test_cli_steps_on_stderr_never_with_quiet_or_json_stdout(tmp_path, monkeypatch):
    monkeypatch.setattr(progress_module, "SHOW_AFTER_S", 0.0)  # every step counts as long
    monkeypatch.setenv("NORMFOLD_PROGRESS", "1")  # stderr is not a terminal here
    src = tmp_path / "m.onnx"
    onnx.save(conv_bn_model()[0], src)
    runner = CliRunner()
    result = runner.invoke(main, ["fold-bn", str(src), "-o", str(tmp_path / "a.onnx")])
    assert result.exit_code == 0, result.output
    for step in ("loading m.onnx", "fold-bn", "writing a.onnx"):
        assert f"normfold: {step} ..." in result.stderr
    result = runner.invoke(main, ["fold-bn", str(src), "-o", str(tmp_path / "b.onnx"), "-q"])
    assert result.exit_code == 0 and result.stderr == "" and result.stdout == ""
    result = runner.invoke(main, ["optimize", str(src), "-o", str(tmp_path / "c.onnx"), "--json", "-"])
    assert result.exit_code == 0 and result.stderr == ""
    assert json.loads(result.stdout)["verification"]["passed"]
    result = runner.invoke(main, ["verify", str(tmp_path / "a.onnx"), "--against", str(src), "--samples", "2"])
    assert result.exit_code == 0 and "normfold: loading the candidate ..." in result.stderr


def test_off_unless_a_terminal_or_forced(monkeypatch):
    monkeypatch.delenv("NORMFOLD_PROGRESS", raising=False)
    assert not progress_module.progress_for(quiet=False, to_stdout=False).enabled  # pytest's stderr is no tty
    monkeypatch.setenv("NORMFOLD_PROGRESS", "1")
    assert progress_module.progress_for(quiet=False, to_stdout=False).enabled
    assert not progress_module.progress_for(quiet=True, to_stdout=False).enabled
    assert not progress_module.progress_for(quiet=False, to_stdout=True).enabled
    monkeypatch.setenv("NORMFOLD_PROGRESS", "0")
    assert not progress_module.progress_for(quiet=False, to_stdout=False).enabled


def test_a_failing_step_says_it_stopped():
    stream = io.StringIO()
    progress = Progress(enabled=True, stream=stream, show_after=0)
    try:
        with progress.step("loading"):
            raise ValueError("bad")
    except ValueError:
        pass
    assert stream.getvalue() == "normfold: loading ... stopped\n"
