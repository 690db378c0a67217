"""The call-overhead benchmark (benchmarks/bench_call_overhead.py) compares like with like: each
com.normfold chain computes what onnxruntime's own op chain computes, and the report has a row per
pair and shape."""

from __future__ import annotations

import argparse
import datetime

import numpy as np
import onnxruntime as ort
import pytest

from benchmarks.bench_call_overhead import CHAIN, PAIRS, chain_model, per_node_times, report
from normfold.ops.library import register_ops


def run(case: str, shape, feeds) -> np.ndarray:
    options = ort.SessionOptions()
    register_ops(options)
    session = ort.InferenceSession(chain_model(case, shape), options, providers=["CPUExecutionProvider"])
    return session.run(None, {i.name: feeds[i.name] for i in session.get_inputs()})[0]


@pytest.mark.parametrize("op", PAIRS)
@pytest.mark.parametrize("shape", [(1, 12, 32), (2, 3, 768)])
def test_each_custom_chain_computes_what_onnxruntime_s_chain_computes(op, shape):
    rng = np.random.default_rng(3)
    feeds = {"X": rng.standard_normal(shape, dtype=np.float32), "S": rng.standard_normal(shape, dtype=np.float32)}
    want = run(f"{op} ort", shape, feeds)
    np.testing.assert_allclose(run(op, shape, feeds), want, rtol=1e-4, atol=1e-4)
    assert not np.allclose(want, feeds["X"])  # the chain does something


def test_report_has_a_row_per_pair_and_shape():
    shape = (1, 4, 32)
    times = per_node_times(shape, rounds=3)
    assert all(len(t) == 3 and np.all(t > 0) for t in times.values())
    text = report([(shape, times)], argparse.Namespace(rounds=3), datetime.datetime.now(datetime.timezone.utc), (0, 0))
    rows = [line for line in text.splitlines() if line.startswith("| ") and "1x4x32" in line]
    assert [r.split("|")[1].strip() for r in rows] == PAIRS
    assert f"Chains of {CHAIN} nodes" in text
