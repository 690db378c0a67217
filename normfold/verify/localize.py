"""Where a mismatch starts: the first node (ONNX reference) or module (PyTorch
reference) whose output diverges beyond tolerance.

ONNX vs ONNX: tensors that both graphs compute under the same name are read
and compared in the candidate's topological order.
ONNX vs PyTorch: each module's output is captured with a forward hook and
compared with the ONNX tensor produced under that module's scope
(`normfold.verify.scopes`), in the order the modules finished.

Folded layers: a fold removes a layer and its tensor, and the layer it was
folded into then computes the removed layer's output. A checkpoint that
diverges from its own reference but matches the output of a reference layer
that has no counterpart in the candidate (the folded one, right after it) is
reported as folded, not as divergent.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
import onnx

from normfold.verify.compare import OutputComparison, compare_arrays
from normfold.io.inputs import Feeds
from normfold.runtime.intermediates import IntermediateRunner, computed_tensors, tensor_types
from normfold.verify.references import OnnxReference, Reference, TorchReference
from normfold.verify.scopes import module_tensors

FOLD_SEARCH_DEPTH = 3  # reference layers after a checkpoint searched for a folded layer's output


@dataclass
class Checkpoint:
    """One compared intermediate: ONNX node (or PyTorch module) and its tensor."""

    where: str  # candidate node name, or module path
    op: str  # ONNX op type, or module class name
    tensor: str  # candidate tensor name
    comparison: OutputComparison
    folded_into: str = ""  # reference layer whose output it matches instead (a fold)
    absorbed: list[str] = field(default_factory=list)  # modules just before it with no node of their own

    @property
    def diverged(self) -> bool:
        """Outside tolerance (or NaN/Inf), and not explained by a fold."""
        return not self.comparison.passed and not self.folded_into

    def to_dict(self) -> dict:
        """JSON-ready form."""
        return {"where": self.where, "op": self.op, "tensor": self.tensor,
                "folded_into": self.folded_into, **self.comparison.to_dict()}


@dataclass
class Localization:
    """Outcome of `--localize`."""

    mode: str  # "onnx" or "pytorch"
    first: Checkpoint | None = None  # first divergent checkpoint, None when all agree
    checked: int = 0
    folded: list[str] = field(default_factory=list)
    unmapped: list[str] = field(default_factory=list)  # modules with no ONNX tensor, and why
    note: str = ""  # why localization could not run, if it could not

    def summary(self) -> str:
        """One or two sentences for the terminal and the assertion message."""
        if self.note:
            return f"localize: {self.note}"
        what = "shared tensors" if self.mode == "onnx" else "module outputs"
        if self.first is None:
            text = f"localize: all {self.checked} {what} compared agree"
        else:
            c = self.first.comparison
            kind = "node" if self.mode == "onnx" else "module"
            absorbed = (f" (its ONNX node also computes {', '.join(self.first.absorbed)}, which has no node "
                        "of its own)") if self.first.absorbed else ""
            text = (f"localize: first divergent {kind}: {self.first.where} ({self.first.op}){absorbed}, tensor "
                    f"'{self.first.tensor}': max abs err {c.max_abs:.3g}, max rel err {c.max_rel:.3g}"
                    + (f", {c.why()}" if c.why() else "") + f" ({self.checked} {what} compared)")
        if self.folded:
            text += f"; folded: {', '.join(self.folded)}"
        if self.unmapped:
            text += f"; no ONNX tensor for {len(self.unmapped)} modules (not compared): " + ", ".join(
                self.unmapped[:8]) + (" ..." if len(self.unmapped) > 8 else "")
        return text

    def to_dict(self) -> dict:
        """JSON-ready form."""
        return {"mode": self.mode, "first": self.first.to_dict() if self.first else None,
                "checked": self.checked, "folded": self.folded, "unmapped": self.unmapped, "note": self.note}


def localize(
    candidate: onnx.ModelProto,
    reference: Reference,
    samples: list[Feeds],
    *,
    atol: float | None = None,
    rtol: float | None = None,
    provider: str = "cpu",
) -> Localization:
    """Find the first divergent node/module of `candidate` against `reference`."""
    if isinstance(reference, OnnxReference):
        return _localize_onnx(candidate, reference, samples, atol, rtol, provider)
    if isinstance(reference, TorchReference):
        return _localize_torch(candidate, reference, samples, atol, rtol, provider)
    return Localization(mode="?", note=f"cannot localize against a {reference.kind} reference")


def _first_divergent(loc: Localization, checkpoints: list[Checkpoint]) -> Localization:
    loc.checked = len(checkpoints)
    loc.folded = [f"{c.where} (matches {c.folded_into})" for c in checkpoints if c.folded_into]
    loc.first = next((c for c in checkpoints if c.diverged), None)
    return loc


def _resolve_folds(checkpoints: list[Checkpoint], alternatives: dict[str, dict[str, OutputComparison]],
                   key: str = "where") -> None:
    """Mark failed checkpoints that match a folded reference layer's output instead.
    `alternatives` maps a checkpoint's `key` attribute to {reference layer: comparison}."""
    for point in checkpoints:
        if point.comparison.passed:
            continue
        for label, comparison in alternatives.get(getattr(point, key), {}).items():
            if comparison.passed:
                point.folded_into = label
                break


# ---- ONNX vs ONNX ---------------------------------------------------------------------------


def _localize_onnx(candidate, reference: OnnxReference, samples, atol, rtol, provider) -> Localization:
    cand_types, ref_types = tensor_types(candidate), tensor_types(reference.model)
    cand_names, ref_computed = set(computed_tensors(candidate)), set(computed_tensors(reference.model))
    shared = [n for n in computed_tensors(candidate) if n in ref_computed and n in ref_types and n in cand_types]
    folded_alts = {n: _downstream_only_in_reference(n, reference.model, cand_names, ref_types) for n in shared}
    ref_names = shared + [a for alts in folded_alts.values() for a in alts]
    cand_run = IntermediateRunner(candidate, shared, cand_types, provider)
    ref_run = IntermediateRunner(reference.model, ref_names, ref_types, "cpu")
    comparisons: dict[str, OutputComparison] = {}
    alternatives: dict[str, dict[str, OutputComparison]] = defaultdict(dict)
    for feeds in samples:
        cand_values = cand_run.run(feeds)
        ref_values = ref_run.run({reference.feed_names[k]: v for k, v in feeds.items()})
        for name in shared:
            comparisons[name] = compare_arrays(cand_values[name], ref_values[name], name=name, atol=atol,
                                               rtol=rtol, into=comparisons.get(name))
            for alt in folded_alts[name]:
                alternatives[name][alt] = compare_arrays(cand_values[name], ref_values[alt], name=name,
                                                         reference_name=alt, atol=atol, rtol=rtol,
                                                         into=alternatives[name].get(alt))
    producer = {out: node for node in candidate.graph.node for out in node.output}
    checkpoints = [Checkpoint(producer[n].name or n, producer[n].op_type, n, comparisons[n]) for n in shared]
    _resolve_folds(checkpoints, alternatives, key="tensor")
    loc = Localization(mode="onnx")
    if not shared:
        loc.note = "the two graphs share no intermediate tensor names; nothing to compare"
    return _first_divergent(loc, checkpoints)


def _downstream_only_in_reference(name: str, model: onnx.ModelProto, cand_names: set[str],
                                  types: dict[str, int]) -> list[str]:
    """Reference tensors computed from `name` by layers the candidate does not have
    (tensor names absent from it), up to FOLD_SEARCH_DEPTH layers on."""
    consumers = defaultdict(list)
    for node in model.graph.node:
        for inp in node.input:
            consumers[inp].append(node)
    found, frontier = [], [name]
    for _ in range(FOLD_SEARCH_DEPTH):
        nxt = []
        for tensor in frontier:
            for node in consumers[tensor]:
                for out in node.output:
                    if out and out not in cand_names and out in types and out not in found:
                        found.append(out)
                        nxt.append(out)
        frontier = nxt
    return found


# ---- ONNX vs PyTorch ------------------------------------------------------------------------


def _localize_torch(candidate, reference: TorchReference, samples, atol, rtol, provider) -> Localization:
    module = reference.module
    if not hasattr(module, "named_modules") or _is_scripted(module):
        return Localization(mode="pytorch", note=(
            "the modules of a TorchScript or torch.export reference cannot be hooked; verify against "
            "package.module:callable to localize"))
    paths = [name for name, _ in module.named_modules() if name]
    mapping = module_tensors(candidate, paths)
    types = tensor_types(candidate)
    captured = _HookedOutputs(module)
    cand_run = IntermediateRunner(candidate, [t for _, t in mapping.values() if t in types], types, provider)
    comparisons: dict[str, OutputComparison] = {}
    alternatives: dict[str, dict[str, OutputComparison]] = defaultdict(dict)
    loc = Localization(mode="pytorch")
    try:
        for feeds in samples:
            captured.clear()
            reference.run(feeds)
            cand_values = cand_run.run(feeds)
            order = captured.order
            usable = [p for p in order if _usable(p, mapping, types, captured, cand_values, loc.unmapped)]
            for path in usable:
                tensor = mapping[path][1]
                comparisons[path] = compare_arrays(cand_values[tensor], captured.outputs[path], name=tensor,
                                                   reference_name=path, atol=atol, rtol=rtol,
                                                   into=comparisons.get(path))
                for later in _unmapped_after(path, order, set(usable))[:FOLD_SEARCH_DEPTH]:
                    if captured.outputs[later].shape == cand_values[tensor].shape:
                        alternatives[path][later] = compare_arrays(
                            cand_values[tensor], captured.outputs[later], name=tensor, reference_name=later,
                            atol=atol, rtol=rtol, into=alternatives[path].get(later))
    finally:
        captured.remove()
    loc.unmapped = list(dict.fromkeys(loc.unmapped))
    checkpoints = [Checkpoint(p, type(module.get_submodule(p)).__name__, mapping[p][1], c)
                   for p, c in comparisons.items()]
    _resolve_folds(checkpoints, alternatives)
    _first_divergent(loc, checkpoints)
    if loc.first is not None:
        loc.first.absorbed = _unmapped_before(loc.first.where, order, set(comparisons), mapping)
    return loc


def _unmapped_before(path: str, order: list[str], compared: set[str], mapping) -> list[str]:
    """Modules finishing right before `path` (after the previous compared one) that have
    no node under their scope: an exporter that fused them into `path` names the fused
    node after `path` (e.g. a Conv folded into the BatchNorm after it)."""
    before = []
    for other in reversed(order[:order.index(path)]):
        if other in compared:
            break
        if other not in mapping and not path.startswith(other + "."):
            before.insert(0, other)
    return before


def _is_scripted(module) -> bool:
    import torch

    return isinstance(module, torch.jit.ScriptModule) or isinstance(module, torch.fx.GraphModule)


def _usable(path, mapping, types, captured, cand_values, unmapped: list[str]) -> bool:
    """Whether module `path` has an ONNX tensor to compare with; records why not."""
    reason = ""
    if captured.calls[path] > 1:
        reason = f"called {captured.calls[path]} times"
    elif path not in captured.outputs:
        reason = "output is not a single tensor"
    elif path not in mapping:
        reason = "no node under its scope"
    elif mapping[path][1] not in types:
        reason = "tensor type unknown"
    elif cand_values[mapping[path][1]].shape != captured.outputs[path].shape:
        reason = "tensor shape differs"
    if reason:
        unmapped.append(f"{path} ({reason})")
    return not reason


def _unmapped_after(path: str, order: list[str], usable: set[str]) -> list[str]:
    """Modules finishing right after `path` that have no tensor of their own, up to
    the next module that has one: where a layer folded into `path` would be."""
    after = []
    for other in order[order.index(path) + 1:]:
        if other in usable:
            break
        after.append(other)
    return after


class _HookedOutputs:
    """Forward hooks on every submodule recording its output and call count."""

    def __init__(self, module):
        self.handles = [sub.register_forward_hook(self._hook(name))
                        for name, sub in module.named_modules() if name]
        self.clear()

    def clear(self) -> None:
        """Forget the outputs of the previous run."""
        self.outputs: dict[str, np.ndarray] = {}
        self.calls: dict[str, int] = defaultdict(int)
        self.order: list[str] = []

    def _hook(self, name: str):
        import torch

        def record(_module, _args, output):
            self.calls[name] += 1
            if name not in self.order:
                self.order.append(name)
            if isinstance(output, torch.Tensor):
                self.outputs[name] = output.detach().cpu().numpy().copy()

        return record

    def remove(self) -> None:
        """Remove the hooks."""
        for handle in self.handles:
            handle.remove()
