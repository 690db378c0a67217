"""Reading intermediate tensors of an ONNX model: a copy of the model with those
tensors added as graph outputs, run in onnxruntime without graph optimizations
(so every node, and its output, is kept as written)."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.shape_inference

from normfold.io.inputs import Feeds
from normfold.io.model_io import skeleton


def tensor_types(model: onnx.ModelProto) -> dict[str, int]:
    """Element type of every main-graph tensor whose type is declared or can be
    inferred by ONNX shape inference. Tensors of unknown type are left out
    (onnxruntime needs a type for each graph output)."""
    graph = model.graph
    values = list(graph.input) + list(graph.output) + list(graph.value_info)
    try:
        inferred = onnx.shape_inference.infer_shapes(skeleton(model))
        values += list(inferred.graph.value_info)
    except (onnx.shape_inference.InferenceError, RuntimeError, ValueError):
        pass  # only the declared types are known
    types = {}
    for value in values:
        elem = value.type.tensor_type.elem_type if value.type.HasField("tensor_type") else 0
        if elem:
            types.setdefault(value.name, elem)
    for init in graph.initializer:
        types.setdefault(init.name, init.data_type)
    return types


def computed_tensors(model: onnx.ModelProto) -> list[str]:
    """Outputs of the main graph's nodes (Constant nodes left out), in node order."""
    return [out for node in model.graph.node if node.op_type != "Constant" for out in node.output if out]


class IntermediateRunner:
    """Runs `model` and returns the values of `names` (intermediate tensors or graph outputs)."""

    def __init__(self, model: onnx.ModelProto, names: list[str], types: dict[str, int], provider: str = "cpu"):
        from normfold.runtime.session import make_session

        exposed = onnx.ModelProto()
        exposed.CopyFrom(model)
        present = {o.name for o in exposed.graph.output}
        for name in names:
            if name not in present:
                exposed.graph.output.append(onnx.helper.make_tensor_value_info(name, types[name], None))
                present.add(name)
        self.names = list(dict.fromkeys(names))
        self.session = make_session(exposed, provider=provider, optimize=False)

    def run(self, feeds: Feeds) -> dict[str, np.ndarray]:
        """{name: value} for one sample."""
        from normfold.runtime.session import run_session

        return dict(zip(self.names, run_session(self.session, feeds, self.names)))
