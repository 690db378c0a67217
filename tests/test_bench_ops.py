"""benchmarks/bench_ops.py compares like with like: every op of the op table has a row at a large
(8 MB or more per tensor) and at a small size, the variants of each row compute the same outputs,
and the copy floor reads and writes the tensors the table says it does."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

from benchmarks.bench_ops import cases
from normfold.ops.library import register_ops
from normfold.ops.table import OPS

ROWS = cases()
SMALL = [r for r in ROWS if np.prod(r.shape) * 4 < 8e6]


def run(model, feeds: dict) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    register_ops(options, "cpu")
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, {i.name: feeds[i.name] for i in session.get_inputs()})


def feeds_for(row, rng) -> dict:
    feeds = {k: (rng.standard_normal(s) + 0.5).astype(np.float32) for k, s in row.inputs.items()}
    return {**feeds, "zero": np.zeros(1, np.float32)}


def test_every_op_of_the_table_has_a_large_and_a_small_row():
    sizes: dict[str, set] = {}
    for row in ROWS:
        node = row.variants["custom"].graph.node[0]
        sizes.setdefault(node.op_type, set()).add(np.prod(row.shape) * 4 >= 8e6)
    assert sizes == {op: {True, False} for op in OPS}
    labels = {r.op for r in ROWS}
    assert {"GroupNorm+SiLU", "BiasGroupNorm+SiLU", "SkipLayerNormSum", "SkipRMSNormSum"} <= labels


@pytest.mark.parametrize("row", SMALL, ids=[f"{r.op}-{'x'.join(map(str, r.shape))}" for r in SMALL])
def test_variants_of_a_row_agree_and_the_copy_moves_the_bytes_it_claims(row, rng):
    feeds = feeds_for(row, rng)
    want = run(row.variants["custom"], feeds)
    assert len(want) == len(row.outputs)
    for name, m in row.variants.items():
        for got, expected in zip(run(m, feeds), want):
            np.testing.assert_allclose(got, expected, rtol=1e-3, atol=1e-3, err_msg=name)
    size = int(np.prod(row.shape))
    flat = {k: v.reshape(-1) for k, v in feeds.items()}
    copied = run(row.copy_model, flat)
    big = [flat[k] for k, s in row.inputs.items() if int(np.prod(s)) == size]
    expected = [big[0] + big[1]] if len(big) == 2 and len(row.outputs) == 1 else big
    assert len(copied) == len(row.outputs) == len(expected)
    for got, value in zip(copied, expected):
        np.testing.assert_array_equal(got, value)
    reads = len(big)
    assert row.megabytes == pytest.approx((reads + len(row.outputs)) * size * 4 / 1e6)


@pytest.mark.parametrize("name", ["GroupNorm+SiLU", "FilterResponseNorm+TLU"])
@pytest.mark.parametrize("threads", [1, 2])
def test_activation_cases_time_in_one_session(name, threads):
    """`--activations` builds and times each case: wall time always, CPU time with 1 thread only."""
    from benchmarks.bench_ops import time_activation_case

    got = time_activation_case(name, threads, rounds=1)
    assert got["wall"] > 0
    assert (got["cpu"] is None) == (threads != 1) and (got["cpu"] is None or got["cpu"] > 0)
