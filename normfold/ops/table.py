"""The op table: every `com.normfold` op in one place.

One row per op says what the rest of normfold needs to know about it: its
inputs and attribute defaults (the kernels' and the function bodies'
signature), the `--ops` family that fuses it, the neutral value of each
optional parameter (written when a match leaves one out, so one function body
serves every node), the standard ONNX op that can stand in for it and from
which opset, and what `--target auto` prefers (benchmarks/RESULTS_ops.md).

Adding a norm kind: one matcher module in `normfold/passes/fuse/`, one row
here, one C++ file in `custom_ops/src/` (see README, "Development").
"""

from __future__ import annotations

from dataclasses import dataclass

DOMAIN = "com.normfold"


@dataclass(frozen=True)
class OpKind:
    """One com.normfold op."""

    op: str  # op type in DOMAIN
    family: str  # the `--ops` name of the subgraphs it replaces
    inputs: tuple[str, ...]  # formal inputs, X first
    attributes: dict  # attribute -> default (None: the node must set it)
    neutral: tuple = ()  # per parameter after X: the value meaning "left out" (None: never left out)
    standard: tuple[str, int] | None = None  # (standard op, first opset with the semantics we need)
    auto_standard: bool = False  # --target auto writes the standard op where the opset has it
    outputs: tuple[str, ...] = ("Y",)  # formal outputs; those after Y are optional

    @property
    def parameters(self) -> tuple[str, ...]:
        """The tensor inputs after X."""
        return self.inputs[1:]


OPS: dict[str, OpKind] = {k.op: k for k in (
    # GroupNormalization-18 takes per-group scale/bias: only 21 has per-channel ones. onnxruntime's
    # GroupNormalization-21 is slower than the exported subgraph, ours beats both: auto keeps custom.
    OpKind("GroupNorm", "gn", ("X", "scale", "bias"),
           {"num_groups": None, "epsilon": 1e-5, "activation": "none"},
           standard=("GroupNormalization", 21)),
    # no standard op normalizes over axis 1 alone (channel-first): that form is always custom;
    # onnxruntime's LayerNormalization kernel is as fast as ours over the last axes.
    OpKind("LayerNorm", "ln", ("X", "scale", "bias"),
           {"axis": -1, "epsilon": 1e-5, "channel_first": 0}, neutral=(None, 0.0),
           standard=("LayerNormalization", 17), auto_standard=True),
    OpKind("RMSNorm", "rms", ("X", "scale"), {"axis": -1, "epsilon": None}, neutral=(1.0,),
           standard=("RMSNormalization", 23), auto_standard=True),
    OpKind("FilterResponseNorm", "frn", ("X", "gamma", "beta", "tau"),
           {"epsilon": 1e-6, "use_tlu": 1}, neutral=(None, None, 0.0)),
    OpKind("WeightNorm", "wn", ("V", "g"), {"dim": 0}),
    # a per-(sample, channel) add fused into GroupNorm: X + add[N, C] (the time embedding of a diffusion
    # ResNet block)
    OpKind("BiasGroupNorm", "gn", ("X", "add", "scale", "bias"),
           {"num_groups": None, "epsilon": 1e-5, "activation": "none"}),
    # a residual add fused into a last-axes norm (sum = X + skip), benchmarks/RESULTS_skip.md. The ...Sum ops
    # also output the sum, for its other readers (one op each: a function body's
    # outputs are fixed, and a node must give them all for onnxruntime to inline it)
    OpKind("SkipLayerNorm", "ln", ("X", "skip", "scale", "bias"), {"axis": -1, "epsilon": 1e-5},
           neutral=(None, None, 0.0)),
    OpKind("SkipLayerNormSum", "ln", ("X", "skip", "scale", "bias"), {"axis": -1, "epsilon": 1e-5},
           neutral=(None, None, 0.0), outputs=("Y", "sum")),
    OpKind("SkipRMSNorm", "rms", ("X", "skip", "scale"), {"axis": -1, "epsilon": None}),
    OpKind("SkipRMSNormSum", "rms", ("X", "skip", "scale"), {"axis": -1, "epsilon": None}, outputs=("Y", "sum")),
)}

FAMILIES: tuple[str, ...] = tuple(dict.fromkeys(k.family for k in OPS.values()))
FAMILY_TITLES: dict[str, str] = {
    "gn": "GroupNorm (+SiLU)", "ln": "LayerNorm", "rms": "RMSNorm", "frn": "Filter Response Norm",
    "wn": "weight norm / weight standardisation",
}
assert set(FAMILY_TITLES) == set(FAMILIES), "every --ops family needs a title"
