"""Moving between `onnx.ModelProto` and onnx-graphsurgeon graphs.

Passes work on graphsurgeon graphs with shapes filled in by ONNX shape
inference; the model written back keeps everything of the input that a pass
did not touch (IR version, opset imports, metadata, model-local functions,
its own value_info) and gains no inferred shape annotations.
"""

from __future__ import annotations

from collections import Counter
from contextlib import contextmanager

import numpy as np
import onnx
import onnx.shape_inference
import onnx_graphsurgeon as gs
from onnx import numpy_helper
from onnx_graphsurgeon.ir.tensor import LazyValues

from normfold.io.model_io import LARGE_TENSOR_ELEMENTS, DetachedTensor, copy_model_fields, skeleton
from normfold.ir.verbs import DeferredValues, names_kept, walk_graphs


def import_graph(model: onnx.ModelProto) -> gs.Graph:
    """A graphsurgeon graph of `model`, with inferred shapes on its tensors
    (subgraphs of If/Loop/Scan included). `model` is left as it was."""
    try:
        inferred = _infer_shapes(skeleton(model))
        pairs = list(_paired_graphs(model.graph, inferred.graph))
    except (onnx.shape_inference.InferenceError, RuntimeError):
        pairs = []  # shapes stay unknown; passes that need one skip with a reason
    saved = [(g, list(g.value_info)) for g, _ in pairs]
    for g, inferred_graph in pairs:
        known = {vi.name for vi in g.value_info} | {i.name for i in g.input} | {o.name for o in g.output}
        g.value_info.extend(vi for vi in inferred_graph.value_info if vi.name not in known)
    try:
        graph = gs.import_onnx(model)
    finally:
        for g, info in saved:
            del g.value_info[:]
            g.value_info.extend(info)
    # graphsurgeon keeps `model.opset_import` itself and appends new domains to it on export
    graph.import_domains = [onnx.helper.make_opsetid(o.domain, o.version) for o in model.opset_import]
    return graph


def refresh_shapes(graph: gs.Graph) -> None:
    """Infer the shapes of `graph`'s main-graph tensors that are still unknown again, on
    the graph as it is now: once constant folding has made computed Reshape targets and
    pads constants, inference gets further. Large weights are not copied."""
    unknown = {name: t for name, t in graph.tensors().items() if isinstance(t, gs.Variable) and _vague(t.shape)}
    if not unknown:
        return
    opsets = getattr(graph, "import_domains", None) or [onnx.helper.make_opsetid("", graph.opset)]
    like = onnx.helper.make_model(onnx.helper.make_graph([], graph.name or "graph", [], []), opset_imports=opsets)
    model, _ = export_detached(graph, like)
    try:
        inferred = _infer_shapes(skeleton(model))
    except (onnx.shape_inference.InferenceError, RuntimeError):
        return
    for info in inferred.graph.value_info:
        tensor, kind = unknown.get(info.name), info.type.tensor_type
        if tensor is None or not info.type.HasField("tensor_type") or not kind.HasField("shape"):
            continue
        shape = _dims(info)
        if tensor.shape is None or _known_dims(shape) > _known_dims(tensor.shape):
            tensor.shape = shape
        if tensor.dtype is None and kind.elem_type:
            tensor.dtype = onnx.helper.tensor_dtype_to_np_dtype(kind.elem_type)


def _vague(shape) -> bool:
    """Whether `shape` is unknown or has a dimension that is not a number."""
    return shape is None or not all(isinstance(d, int) and d >= 0 for d in shape)


def _known_dims(shape) -> int:
    return sum(isinstance(d, int) and d >= 0 for d in shape)


def _infer_shapes(skel: onnx.ModelProto) -> onnx.ModelProto:
    """Shapes from the best source: onnx shape inference on `skel` (modified), once more
    with each `Shape` of a tensor of static shape written as a constant (onnx's data
    propagation does not always carry such shapes into the `Reshape` that reads them),
    and, for what is still unknown, onnxruntime's symbolic shape inference, which follows
    shape arithmetic (Shape→Gather→Concat→Reshape, as TorchScript opset-13 exports
    compute attention reshapes) much further."""
    untouched = onnx.ModelProto()
    untouched.CopyFrom(skel)  # symbolic inference reads Shape nodes as Shape nodes
    inferred = _static_shapes_as_constants(skel)
    unknown = _unshaped(inferred.graph)
    if unknown:
        _add_symbolic_shapes(untouched, inferred, unknown)
    return inferred


def _unshaped(graph: onnx.GraphProto) -> set[str]:
    """Names of the node outputs of `graph` (main graph only) whose inferred shape is
    missing or has a dimension that is not a number."""
    shaped = {vi.name for vi in (*graph.value_info, *graph.output, *graph.input) if vi.type.HasField("tensor_type")
              and vi.type.tensor_type.HasField("shape") and not _vague(_dims(vi))}
    return {out for node in graph.node for out in node.output if out and out not in shaped}


def _dims(info: onnx.ValueInfoProto) -> list:
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in info.type.tensor_type.shape.dim]


def _add_symbolic_shapes(skel: onnx.ModelProto, inferred: onnx.ModelProto, unknown: set[str]) -> None:
    """Give the `unknown` tensors of `inferred` the shapes onnxruntime's symbolic shape
    inference finds for `skel` where they say more (nothing when it cannot run)."""
    try:
        from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

        with _quiet_logging():
            symbolic = SymbolicShapeInference.infer_shapes(skel, auto_merge=True, guess_output_rank=False)
    except Exception:  # it raises many types (unknown ops, sympy); plain inference stands
        return
    if symbolic is None:
        return
    known = {vi.name: vi for vi in inferred.graph.value_info}
    found = {vi.name: vi for vi in symbolic.graph.value_info if vi.name in unknown and
             vi.type.HasField("tensor_type") and vi.type.tensor_type.HasField("shape") and
             (vi.name not in known or _known_dims(_dims(vi)) > _known_dims(_dims(known[vi.name])))}
    kept = [vi for vi in inferred.graph.value_info if vi.name not in found]
    del inferred.graph.value_info[:]
    inferred.graph.value_info.extend(kept + list(found.values()))


@contextmanager
def _quiet_logging():
    """Silence the warnings symbolic shape inference logs while it runs."""
    import logging

    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(previous)


def _static_shapes_as_constants(skel: onnx.ModelProto) -> onnx.ModelProto:
    """onnx shape inference on `skel` (modified), and once more after each `Shape` of
    a tensor of static shape is written as a constant."""
    inferred = onnx.shape_inference.infer_shapes(skel, data_prop=True)
    static = {}
    for info in (*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output):
        dims = info.type.tensor_type.shape.dim if info.type.HasField("tensor_type") else []
        if info.type.tensor_type.HasField("shape") and all(d.HasField("dim_value") for d in dims):
            static[info.name] = [d.dim_value for d in dims]
    replaced = False
    for i, node in enumerate(skel.graph.node):
        if node.op_type == "Shape" and node.domain in ("", "ai.onnx") and node.input[0] in static:
            start = next((a.i for a in node.attribute if a.name == "start"), 0)
            end = next((a.i for a in node.attribute if a.name == "end"), None)
            value = np.array(static[node.input[0]][start:end], np.int64)
            skel.graph.node[i].CopyFrom(onnx.helper.make_node(
                "Constant", [], list(node.output), value=numpy_helper.from_array(value)))
            replaced = True
    return onnx.shape_inference.infer_shapes(skel, data_prop=True) if replaced else inferred


def _paired_graphs(graph: onnx.GraphProto, twin: onnx.GraphProto):
    """(graph, twin) and the same pairs for their subgraphs; `twin` has the same nodes."""
    yield graph, twin
    for node, twin_node in zip(graph.node, twin.node):
        for attr, twin_attr in zip(node.attribute, twin_node.attribute):
            if attr.HasField("g"):
                yield from _paired_graphs(attr.g, twin_attr.g)
            for sub, twin_sub in zip(attr.graphs, twin_attr.graphs):
                yield from _paired_graphs(sub, twin_sub)


def export_model(graph: gs.Graph, like: onnx.ModelProto) -> onnx.ModelProto:
    """Export `graph` as a model carrying `like`'s metadata, IR version, opsets
    and functions, with value_info limited to the entries `like` had."""
    graph.cleanup(remove_unused_graph_inputs=False, recurse_subgraphs=True)
    graph.toposort(recurse_subgraphs=True)
    # graphsurgeon renames the TensorProtos it was imported from (the caller's
    # model) to the tensor names it exports: put their names back afterwards.
    with names_kept(_lazy_protos(graph)), _empty_lists_set_aside(graph) as restore:
        exported = gs.export_onnx(graph, do_type_check=False)
        restore(exported.graph)
    _restrict_value_info(exported.graph, {vi.name for vi in like.graph.value_info})

    opsets = _merged_opsets(like, exported)
    for field in ("ir_version", "producer_name", "producer_version", "domain", "model_version", "doc_string"):
        exported.ClearField(field)
    del exported.opset_import[:]
    copy_model_fields(like, exported, skip=("graph", "opset_import", "functions"))
    exported.opset_import.extend(opsets)
    return exported


@contextmanager
def _empty_lists_set_aside(graph: gs.Graph):
    """graphsurgeon cannot export an empty list attribute (e.g. ReduceMean axes=[]):
    take them off the nodes for the export, then give the exported nodes typed
    empty attributes (`restore(exported_graph)`) and the nodes their lists back."""
    aside: dict[int, list[tuple[str, int]]] = {}
    nodes = [n for g, _ in walk_graphs(graph) for n in g.nodes]
    for node in nodes:
        for key in [k for k, v in node.attrs.items() if isinstance(v, (list, tuple)) and not len(v)]:
            aside.setdefault(id(node), []).append((key, _list_attribute_type(node, key, graph.opset)))
            del node.attrs[key]

    def restore(exported: onnx.GraphProto, g: gs.Graph = graph) -> None:
        for node, proto in zip(g.nodes, exported.node):
            for key, kind in aside.get(id(node), ()):
                proto.attribute.append(onnx.AttributeProto(name=key, type=kind))
            for key, value in node.attrs.items():
                if isinstance(value, gs.Graph):
                    restore(next(a.g for a in proto.attribute if a.name == key), value)

    try:
        yield restore
    finally:
        for node in nodes:
            for key, _ in aside.get(id(node), ()):
                node.attrs[key] = []


def _list_attribute_type(node: gs.Node, key: str, opset: int) -> int:
    """The AttributeProto type of list attribute `key` of `node` (its schema's, else INTS)."""
    try:
        return int(onnx.defs.get_schema(node.op, opset, node.domain or "").attributes[key].type)
    except (onnx.defs.SchemaError, KeyError):
        return onnx.AttributeProto.INTS


def _lazy_protos(graph: gs.Graph):
    """The imported TensorProtos behind `graph`'s constants, node attributes and
    subgraphs included."""
    for tensor in graph.tensors().values():
        if isinstance(tensor, gs.Constant) and type(tensor._values) is LazyValues:
            yield tensor._values.tensor
    for node in graph.nodes:
        for value in node.attrs.values():
            if isinstance(value, gs.Constant) and type(value._values) is LazyValues:
                yield value._values.tensor
            elif isinstance(value, gs.Graph):
                yield from _lazy_protos(value)


def export_detached(graph: gs.Graph, like: onnx.ModelProto) -> tuple[onnx.ModelProto, dict[str, DetachedTensor]]:
    """Like `export_model`, but large main-graph initializers are exported as
    data-less placeholders whose data `save_model` loads one at a time: no copy
    of the weights is made in memory."""
    graph.cleanup(remove_unused_graph_inputs=False, recurse_subgraphs=True)
    detached: dict[str, DetachedTensor] = {}
    swapped: list[tuple[gs.Constant, object]] = []
    for tensor in graph.tensors().values():
        if not isinstance(tensor, gs.Constant) or _elements(tensor.shape) <= LARGE_TENSOR_ELEMENTS:
            continue
        values = tensor._values
        placeholder = onnx.TensorProto(name=tensor.name, dims=tensor.shape, data_type=_onnx_dtype(values))
        detached[tensor.name] = DetachedTensor(nbytes=_nbytes(values), load=_loader(values))
        swapped.append((tensor, values))
        tensor._values = LazyValues(placeholder)
    try:
        return export_model(graph, like), detached
    finally:
        for tensor, values in swapped:
            tensor._values = values


def _elements(shape) -> int:
    count = 1
    for d in shape:
        count *= int(d)
    return count


def _onnx_dtype(values) -> int:
    if isinstance(values, LazyValues) and not isinstance(values, DeferredValues):
        return values.tensor.data_type
    return onnx.helper.np_dtype_to_tensor_dtype(np.dtype(values.dtype))


def _nbytes(values) -> int:
    return int(values.nbytes)


def _loader(values):
    if isinstance(values, LazyValues):
        return lambda: values.tensor  # the original TensorProto, or computed for DeferredValues
    return lambda: numpy_helper.from_array(np.asarray(values))


def _restrict_value_info(graph: onnx.GraphProto, keep: set[str]) -> None:
    """Keep only the value_info entries named in `keep`, in `graph` and its
    subgraphs (graphsurgeon writes every shape it knows)."""
    infos = [vi for vi in graph.value_info if vi.name in keep]
    del graph.value_info[:]
    graph.value_info.extend(infos)
    for sub in subgraphs(graph):
        _restrict_value_info(sub, keep)


def subgraphs(graph: onnx.GraphProto):
    """The subgraphs (If/Loop/Scan bodies) directly inside `graph`."""
    for node in graph.node:
        for attr in node.attribute:
            yield from attr.graphs
            if attr.HasField("g"):
                yield attr.g


def _merged_opsets(like: onnx.ModelProto, exported: onnx.ModelProto) -> list[onnx.OperatorSetIdProto]:
    """`like`'s opset imports, plus any domain the exported graph newly uses."""
    opsets = list(like.opset_import)
    have = {op.domain for op in opsets}
    new_versions = {op.domain: op.version for op in exported.opset_import}
    for domain in sorted(_used_domains(exported.graph) - have - {"ai.onnx"}):
        opsets.append(onnx.helper.make_opsetid(domain, new_versions.get(domain, 1)))
    return opsets


def all_graphs(graph: onnx.GraphProto):
    """`graph` and every graph nested in it (If/Loop/Scan bodies, at any depth)."""
    yield graph
    for sub in subgraphs(graph):
        yield from all_graphs(sub)


def count_ops(graph: onnx.GraphProto) -> Counter:
    """Number of nodes per op type in `graph`, subgraphs included."""
    return Counter(node.op_type for g in all_graphs(graph) for node in g.node)


def _used_domains(graph: onnx.GraphProto) -> set[str]:
    return {node.domain for g in all_graphs(graph) for node in g.node}
