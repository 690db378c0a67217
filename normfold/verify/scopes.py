"""Which ONNX tensor holds a PyTorch module's output, from the scopes the exporters record.

- TorchScript exporter (`dynamo=False`): node names are scope paths,
  `/layer1/layer1.0/conv1/Conv`; each segment is a module's name as the
  exporter writes it (its attribute name, with the parent's name in front when
  the name is a number: `layer1.0`).
- dynamo exporter: each node carries metadata `pkg.torch.onnx.name_scopes`,
  e.g. `['', 'layer1', 'layer1.0', 'layer1.0.conv1', 'conv2d']`, the full module
  paths of the calls it came from.

A module's output is the first output of the last node (in graph order) under
its scope. Modules with no node under their scope (e.g. a BatchNorm folded
into its Conv) have no tensor; callers must say so rather than guess.
"""

from __future__ import annotations

import ast

import onnx

NAME_SCOPES_KEY = "pkg.torch.onnx.name_scopes"


def torchscript_segment(path: str) -> str:
    """The scope segment the TorchScript exporter writes for module `path`:
    its last non-numeric atom and what follows (`layer1.0` -> `layer1.0`,
    `layer1.0.conv1` -> `conv1`)."""
    atoms = path.split(".")
    for i in range(len(atoms) - 1, -1, -1):
        if not atoms[i].isnumeric():
            return ".".join(atoms[i:])
    return path


def torchscript_scopes(module_paths: list[str]) -> dict[tuple[str, ...], str]:
    """{scope segments: module path} for every module path, e.g.
    ('layer1', 'layer1.0', 'conv1') -> 'layer1.0.conv1'."""
    known = set(module_paths)
    scopes = {}
    for path in module_paths:
        atoms = path.split(".")
        chain = [".".join(atoms[:i]) for i in range(1, len(atoms) + 1)]
        segments = tuple(torchscript_segment(p) for p in chain if p in known)
        scopes[segments] = path
    return scopes


def node_modules(node: onnx.NodeProto, ts_scopes: dict[tuple[str, ...], str]) -> list[str]:
    """Module paths whose scope holds `node` (outermost first)."""
    for prop in node.metadata_props:
        if prop.key == NAME_SCOPES_KEY:
            try:
                scopes = ast.literal_eval(prop.value)
            except (ValueError, SyntaxError):
                return []
            return [s for s in scopes[:-1] if s]
    if not node.name.startswith("/"):
        return []
    segments = node.name.split("/")[1:-1]
    return [ts_scopes[tuple(segments[:k])] for k in range(1, len(segments) + 1) if tuple(segments[:k]) in ts_scopes]


def module_tensors(model: onnx.ModelProto, module_paths: list[str]) -> dict[str, tuple[onnx.NodeProto, str]]:
    """{module path: (last node under its scope, that node's first output)} for
    each module in `module_paths` that has nodes in `model`'s main graph."""
    ts_scopes = torchscript_scopes(module_paths)
    wanted = set(module_paths)
    found: dict[str, tuple[onnx.NodeProto, str]] = {}
    for node in model.graph.node:
        if not node.output or node.op_type == "Constant":
            continue
        for path in node_modules(node, ts_scopes):
            if path in wanted:
                found[path] = (node, node.output[0])
    return found
