"""Cheap structural checks of a model read from disk, in one walk over its graphs.

`onnx.checker` answers the same questions slowly or vaguely (a cycle and a
tensor nobody produces both read "must be topologically sorted"), and never
compares an initializer's data with its dims. These checks name the node and
tensor at fault: every tensor a node reads is produced earlier (else: nobody
produces it, or a cycle, or out of order), every tensor is produced once,
every graph has outputs and each is computed, and every tensor's data fits its dims.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import onnx

T = onnx.TensorProto
# Element types stored several to a byte: elements per byte.
_PACKED = {T.INT4: 2, T.UINT4: 2, T.FLOAT4E2M1: 2, T.INT2: 4, T.UINT2: 4}
# Types whose storage these checks do not model (variable size or unusual packing).
_UNCHECKED = {T.STRING, T.FLOAT6E2M3, T.FLOAT6E3M2}
_KNOWN_TYPES = set(T.DataType.values()) - {T.UNDEFINED}
_TYPED_FIELDS = ("float_data", "int32_data", "int64_data", "double_data", "uint64_data")
_TENSOR_TEXT_FIELDS = [T.DESCRIPTOR.fields_by_name[name] for name in ("name", "doc_string", "external_data",
                                                                        "metadata_props")]


def printable(text: str | bytes, limit: int = 80) -> str:
    """`text` fit for a one-line message: control characters escaped, cut to
    `limit` characters (names in a corrupt file can hold anything; protobuf
    hands out a string field that is not UTF-8 as bytes)."""
    if isinstance(text, bytes):
        text = text.decode("utf-8", "backslashreplace")
    shown = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text[:limit])
    return shown + ("..." if len(text) > limit else "")


def quote(text: str | bytes) -> str:
    """`printable(text)` in single quotes."""
    return f"'{printable(text)}'"


class StructureError(ValueError):
    """What is structurally wrong with a model, as a phrase (no path)."""


def check_structure(model: onnx.ModelProto) -> None:
    """Raise StructureError naming the first structural fault of `model`'s graphs
    (main graph and every subgraph) or of a tensor's data. The main graph's
    initializers are left to the reader, which checks each with
    `check_tensor_data` as it parses it (reading `raw_data` here would copy every weight)."""
    _check_graph(model.graph, outer=())


def _check_graph(graph: onnx.GraphProto, outer: tuple[set[str], ...]) -> None:
    """`outer`: the names visible from enclosing graphs (one set per level, not copied)."""
    where = f" in subgraph {quote(graph.name)}" if outer else ""
    for tensor in graph.initializer if outer else ():
        check_tensor_data(tensor)
    defined = {i.name for i in graph.input} | {t.name for t in graph.initializer}
    defined |= {s.values.name for s in graph.sparse_initializer}
    nodes = list(graph.node)
    producers: dict[str, int] = {}  # tensor name -> index of the node producing it
    for i, node in enumerate(nodes):
        for name in filter(None, node.output):
            if name in defined or name in producers:
                first = "a graph input or initializer" if name in defined else _describe(nodes[producers[name]])
                raise StructureError(f"tensor {quote(name)} is produced more than once{where} (by {first} and by "
                                     f"{_describe(node)})")
            producers[name] = i
    available = set(defined)
    for node in nodes:
        for name in filter(None, node.input):
            if name not in available and not _visible(name, outer):
                raise StructureError(_unavailable(graph, nodes, node, name, producers, where))
        for subgraph in _subgraphs(node):
            _check_graph(subgraph, outer + (available,))
        for tensor in _attribute_tensors(node):
            check_tensor_data(tensor)
        available.update(filter(None, node.output))
    if not graph.output:
        raise StructureError(f"{'subgraph ' + repr(graph.name) if outer else 'the graph'} has no outputs")
    for output in graph.output:
        if output.name not in available and not _visible(output.name, outer):
            raise StructureError(f"graph output {quote(output.name)}{where} is computed by no node and is not "
                                 "an input")


def _visible(name: str, scopes: tuple[set[str], ...]) -> bool:
    return any(name in scope for scope in scopes)


def _unavailable(graph: onnx.GraphProto, nodes: list, node: onnx.NodeProto, name: str, producers: dict[str, int],
                 where: str) -> str:
    """Why `name`, read by `node`, is not available there."""
    if name not in producers:
        return (f"{_describe(node)}{where} reads {quote(name)}, which no node produces and which is not a graph "
                "input or initializer")
    cycle = _find_cycle(nodes, producers)
    scope = f"subgraph {quote(graph.name)}" if where else "the graph"
    if cycle:
        return f"{scope} has a cycle: " + " -> ".join(_describe(n) for n in cycle)
    return (f"the nodes of {scope} are not in topological order: {_describe(node)} reads {quote(name)} before "
            f"{_describe(nodes[producers[name]])} produces it")


def _find_cycle(nodes: list, producers: dict[str, int]) -> list[onnx.NodeProto]:
    """The nodes of one cycle (first node repeated at the end), or [] (iterative DFS)."""
    state = [0] * len(nodes)  # 0 new, 1 on the current path, 2 done
    for start in range(len(nodes)):
        if state[start]:
            continue
        path, stack = [], [(start, _preds(nodes[start], producers))]
        state[start] = 1
        path.append(start)
        while stack:
            current, preds = stack[-1]
            step = next(preds, None)
            if step is None:
                state[current] = 2
                stack.pop()
                path.pop()
            elif state[step] == 1:
                loop = path[path.index(step):] + [step]
                return [nodes[i] for i in reversed(loop)]
            elif state[step] == 0:
                state[step] = 1
                path.append(step)
                stack.append((step, _preds(nodes[step], producers)))
    return []


def _preds(node: onnx.NodeProto, producers: dict[str, int]) -> Iterator[int]:
    """Indices of the nodes producing `node`'s inputs."""
    return (producers[name] for name in node.input if name in producers)


def _describe(node: onnx.NodeProto) -> str:
    op = printable(node.op_type)
    if node.name:
        return f"node {quote(node.name)} ({op})"
    return f"unnamed {op} node" + (f" writing {quote(node.output[0])}" if node.output else "")


def _subgraphs(node: onnx.NodeProto) -> Iterator[onnx.GraphProto]:
    for attr in node.attribute:
        if attr.HasField("g"):
            yield attr.g
        yield from attr.graphs


def _attribute_tensors(node: onnx.NodeProto) -> Iterator[onnx.TensorProto]:
    for attr in node.attribute:
        if attr.HasField("t"):
            yield attr.t
        yield from attr.tensors


def check_text(model: onnx.ModelProto) -> None:
    """Raise StructureError when a string field anywhere in `model` is not UTF-8
    (protobuf parses such a file and hands the field out as bytes). Tensor data
    is not read (no copy of the weights)."""
    _check_text(model)


def _check_text(message) -> None:
    if isinstance(message, T):
        fields = [(f, getattr(message, f.name)) for f in _TENSOR_TEXT_FIELDS]
    else:
        fields = message.ListFields()
    for field, value in fields:
        items = value if field.is_repeated else [value]
        if field.message_type is not None:
            for item in items:
                _check_text(item)
        elif field.type == field.TYPE_STRING:
            for item in items:
                if isinstance(item, bytes):
                    raise StructureError(f"{type(message).__name__}.{field.name} {item[:40]!r} is not UTF-8 text")


def check_tensor_data(tensor: onnx.TensorProto, raw_size: int | None = None) -> None:
    """Raise StructureError when `tensor`'s dims are negative or its data does not
    hold exactly dims' product of elements. `raw_size` is the size of its raw
    data when the caller knows it (external data, a parsed record); otherwise
    raw data is measured, and external tensors are not checked."""
    if any(d < 0 for d in tensor.dims):
        raise StructureError(f"tensor {quote(tensor.name)} has a negative dimension {list(tensor.dims)}")
    if tensor.data_type not in _KNOWN_TYPES:
        raise StructureError(f"tensor {quote(tensor.name)} has no known element type (data_type {tensor.data_type})")
    if tensor.data_type in _UNCHECKED:
        return
    if raw_size is None:
        if tensor.data_location == T.EXTERNAL:
            return
        if tensor.HasField("raw_data"):
            raw_size = len(tensor.raw_data)
    count = math.prod(tensor.dims)
    if raw_size is not None:
        want = _storage_bytes(tensor.data_type, count)
        if want is not None and raw_size != want:
            raise StructureError(f"tensor {quote(tensor.name)} has {raw_size} bytes of data, but its dims "
                                 f"{list(tensor.dims)} and type {T.DataType.Name(tensor.data_type)} need {want} bytes")
        return
    stored = max(len(getattr(tensor, field)) for field in _TYPED_FIELDS)
    if tensor.data_type in _PACKED:
        want = -(-count // _PACKED[tensor.data_type])
    else:
        want = count * (2 if tensor.data_type in (T.COMPLEX64, T.COMPLEX128) else 1)
    if stored != want:
        raise StructureError(f"tensor {quote(tensor.name)} holds {stored} values, but its dims {list(tensor.dims)} "
                             f"need {want}")


def _storage_bytes(data_type: int, count: int) -> int | None:
    """Bytes of raw data for `count` elements of `data_type`, or None if unknown."""
    if data_type in _PACKED:
        return -(-count // _PACKED[data_type])
    try:
        return count * onnx.helper.tensor_dtype_to_np_dtype(data_type).itemsize
    except (KeyError, ValueError, TypeError):
        return None
