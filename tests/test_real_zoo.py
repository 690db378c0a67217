"""The real-model zoo (tests/helpers/zoo) in CI: a subset of architecture × export
configuration cases, chosen to cover every failure class of issue 14 and every norm
family at a few seconds each; the full zoo is `python -m benchmarks.bench_real_zoo`
(results in benchmarks/RESULTS_real_zoo.md). Each case is built from its library's own
code, exported, optimized with `normfold.optimize` and checked against PyTorch
(`tests.helpers.zoo.checks`)."""

from __future__ import annotations

from collections import Counter

import pytest

from tests.helpers.zoo import ARCHITECTURES, CONFIGS, run_case

CI_CASES = [
    ("bert", "ts13"),                 # shape knowledge (TorchScript opset 13 encoder)
    ("llama", "ts13"),                # shape knowledge + casts around the RMSNorm
    ("swin", "ts13"),                 # window reshapes and rolls
    ("t5_encoder", "ts13"),           # T5 norm: variance without mean, x.float() inside
    ("gemma", "dy18"),                # (1 + w) scale
    ("bit", "ts17"),                  # weight standardisation through F.batch_norm, GN
    ("bit", "dy21"),
    ("convnext", "dy18"),             # channel-first LN
    ("levit", "ts13"),                # Linear→BatchNorm1d, Conv→BN
    ("unet2d", "ts17"),               # GN + attention (diffusion)
    ("monai_segresnet_3d", "dy21"),   # 3-D GN
    ("wav2vec2", "dy18"),             # audio front end
    ("llama_fp16", "dy21"),           # fp16 decoder: up/down casts
    ("bert_fp16", "ts13"),            # fp16 LN: centred in fp16, normalized in double
]


@pytest.mark.parametrize("arch, config", CI_CASES, ids=[f"{a}-{c}" for a, c in CI_CASES])
def test_zoo_case_is_fully_optimized_and_exact(arch, config):
    result = run_case(ARCHITECTURES[arch], CONFIGS[config])
    assert result.stage == "checked", result.problems
    assert result.normfolds_problems == [], f"{arch} × {config}: {result.problems}; fuse skipped: {result.skip_reasons}"
    assert sum(result.fused.values()) > 0 or set(ARCHITECTURES[arch].norms) <= {"bn"}


def test_zoo_covers_what_the_issue_asks():
    archs = list(ARCHITECTURES.values())
    assert len(archs) >= 25
    assert len({a.library for a in archs}) >= 3
    norms = Counter(n for a in archs for n in a.norms)
    assert {"bn", "ln", "ln_cf", "gn", "rms", "ws"} <= set(norms)
    assert sum(a.fp16 for a in archs) >= 2
    assert set(CONFIGS) == {"ts13", "ts17", "dy18", "dy21"}


def test_the_benchmark_names_each_failure_by_its_cause():
    from benchmarks.bench_real_zoo import failure_classes

    def result(problems, stage="checked", skips=()):
        return {"problems": problems, "stage": stage, "skip_reasons": dict.fromkeys(skips, 1)}

    assert failure_classes(result([])) == []
    assert failure_classes(result(["export failed: x"], stage="export")) == ["exporter"]
    assert failure_classes(result(["optimize raised KeyError: x"], stage="optimize")) == ["4 crash"]
    assert failure_classes(result(["2 decomposed norm node(s) left: ReduceMean of a square"],
                                  skips=["rank of 'a' is unknown"])) == ["1 shape knowledge"]
    assert failure_classes(result(["2 decomposed norm node(s) left: ReduceMean of a square"])) == ["2 library spelling"]
    assert failure_classes(result(["1 BatchNormalization over a constant (weight standardisation) left",
                                   "relative error 1e-2 > 1e-5"])) == ["3 weight standardisation", "5 invalid output"]
    assert failure_classes(result(["onnxruntime's graph optimizations: the export itself is off"])) == ["ort"]
