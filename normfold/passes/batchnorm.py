"""What makes a BatchNormalization node an inference BN whose statistics are known.

Shared by the passes that read BN parameters (fold-bn, recalibrate): the same
checks, the same reasons when a node is not one.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from normfold.ir.verbs import NotConstant, constant_value, consumers, float_attr, int_attr, is_observable

BN = "BatchNormalization"


class Skip(Exception):
    """This node is left as it is; the message says why."""


@dataclass
class InferenceBN:
    """An inference BN's constant parameters, as stored (shapes and dtypes kept)."""

    node: gs.Node
    scale: np.ndarray
    bias: np.ndarray
    mean: np.ndarray
    var: np.ndarray
    epsilon: float


def inference_bn(graph: gs.Graph, node: gs.Node, opset: int) -> InferenceBN:
    """Read `node` as an inference BN with constant scale/B/mean/var, or raise
    Skip saying why it is not one (training mode, spatial=0, a training output
    in use, parameters computed at run time or of different sizes)."""
    if int_attr(node, "training_mode", 0):
        raise Skip("training_mode=1 (statistics come from the batch)")
    if not int_attr(node, "spatial", 1):
        raise Skip("spatial=0 (per-activation statistics) is not supported")
    if len(node.inputs) != 5:
        raise Skip("expected 5 inputs (X, scale, B, mean, var)")
    for extra in node.outputs[1:]:
        if extra.name and (consumers(extra) or is_observable(graph, extra)):
            raise Skip(f"training output '{extra.name}' is used")
    try:
        scale, bias, mean, var = (constant_value(t, opset) for t in node.inputs[1:])
    except NotConstant as why:
        raise Skip(f"parameters are not constant ({why})") from None
    if any(p.size != mean.size for p in (scale, bias, var)):
        raise Skip("scale, B, mean and var have different sizes")
    return InferenceBN(node, scale, bias, mean, var, float_attr(node, "epsilon", 1e-5))
