"""Comparing one output of a candidate model with the same output of a reference.

An element passes when |candidate - reference| <= atol + rtol * |reference|
(numpy.isclose with the reference as the base). Defaults depend on the dtype
(of the less precise side), see `DEFAULT_TOLERANCES`.

Relative error is |candidate - reference| / max(|reference|, floor) with
floor = atol / rtol: below that magnitude the absolute tolerance governs the
pass/fail decision anyway, so tiny reference values (e.g. just after a ReLU)
do not produce huge relative errors. With these definitions an output within
tolerance has max relative error <= 2 * rtol. (rtol = 0: floor = max(atol, 1e-12).)

NaN or Inf on either side always fails, whatever the tolerances.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from normfold.errors import NormfoldError

# dtype -> (atol, rtol). Integers and bool must match exactly.
DEFAULT_TOLERANCES: dict[str, tuple[float, float]] = {
    "float64": (1e-7, 1e-6),
    "float32": (1e-4, 1e-3),
    "float16": (1e-2, 1e-2),
    "bfloat16": (5e-2, 5e-2),
}
EXACT = (0.0, 0.0)
_PRECISION_ORDER = ["bfloat16", "float16", "float32", "float64"]


def default_tolerance(*dtypes: np.dtype | str) -> tuple[float, float]:
    """(atol, rtol) for comparing arrays of `dtypes`: that of the least precise
    floating dtype among them, exact for integers and bool."""
    names = [np.dtype(d).name if not isinstance(d, str) else d for d in dtypes]
    floats = [n for n in names if n in DEFAULT_TOLERANCES]
    if not floats:
        return EXACT
    return DEFAULT_TOLERANCES[min(floats, key=_PRECISION_ORDER.index)]


def rel_floor(atol: float, rtol: float) -> float:
    """The smallest magnitude relative errors are taken against (module docstring)."""
    return atol / rtol if rtol > 0 else max(atol, 1e-12)


@dataclass
class OutputComparison:
    """Metrics of one candidate output against its reference, over all samples."""

    name: str  # candidate output name
    reference_name: str
    shape: list[int]
    dtype: str
    atol: float
    rtol: float
    elements: int = 0
    max_abs: float = 0.0
    max_rel: float = 0.0
    sum_abs: float = 0.0
    cosine: float = 1.0
    outside: int = 0  # elements outside tolerance
    nonfinite_candidate: int = 0
    nonfinite_reference: int = 0
    problem: str = ""  # e.g. shape mismatch; set when the arrays cannot be compared
    notes: list[str] = field(default_factory=list)

    @property
    def mean_abs(self) -> float:
        """Mean absolute error over all compared elements."""
        return self.sum_abs / self.elements if self.elements else 0.0

    @property
    def outside_share(self) -> float:
        """Share of elements outside tolerance (0..1)."""
        return self.outside / self.elements if self.elements else 0.0

    @property
    def passed(self) -> bool:
        """Within tolerance everywhere, and no NaN/Inf on either side."""
        return (not self.problem and self.outside == 0
                and self.nonfinite_candidate == 0 and self.nonfinite_reference == 0)

    def why(self) -> str:
        """One phrase saying why it failed ('' when it passed)."""
        if self.problem:
            return self.problem
        reasons = []
        if self.nonfinite_candidate:
            reasons.append(f"{self.nonfinite_candidate} NaN/Inf in candidate")
        if self.nonfinite_reference:
            reasons.append(f"{self.nonfinite_reference} NaN/Inf in reference")
        if self.outside:
            reasons.append(f"{self.outside_share:.2%} of elements outside tolerance")
        return ", ".join(reasons)

    def to_dict(self) -> dict:
        """JSON-ready form (NaN and Inf become strings)."""
        out = asdict(self)
        out.pop("sum_abs")
        out.update(mean_abs=self.mean_abs, outside_share=self.outside_share, passed=self.passed)
        return {k: _json_number(v) for k, v in out.items()}


def _json_number(value):
    if isinstance(value, float) and not np.isfinite(value):
        return str(value)
    return value


def compare_arrays(
    candidate: np.ndarray,
    reference: np.ndarray,
    *,
    name: str = "",
    reference_name: str = "",
    atol: float | None = None,
    rtol: float | None = None,
    into: OutputComparison | None = None,
) -> OutputComparison:
    """Compare one candidate array with its reference. With `into`, add this
    sample to an existing comparison (metrics over all samples) and return it."""
    candidate, reference = np.asarray(candidate), np.asarray(reference)
    default_atol, default_rtol = default_tolerance(candidate.dtype, reference.dtype)
    atol = default_atol if atol is None else atol
    rtol = default_rtol if rtol is None else rtol
    result = into or OutputComparison(
        name=name, reference_name=reference_name or name, shape=list(candidate.shape),
        dtype=str(candidate.dtype), atol=atol, rtol=rtol,
    )
    if candidate.dtype != reference.dtype:
        note = f"dtypes differ: candidate {candidate.dtype}, reference {reference.dtype}"
        if note not in result.notes:
            result.notes.append(note)
    if candidate.shape != reference.shape:
        result.problem = f"shape {list(candidate.shape)} != reference shape {list(reference.shape)}"
        return result
    _accumulate(result, candidate.astype(np.float64), reference.astype(np.float64))
    return result


def _accumulate(result: OutputComparison, cand: np.ndarray, ref: np.ndarray) -> None:
    finite_c, finite_r = np.isfinite(cand), np.isfinite(ref)
    result.nonfinite_candidate += int(cand.size - finite_c.sum())
    result.nonfinite_reference += int(ref.size - finite_r.sum())
    both = finite_c & finite_r
    cand_f, ref_f = np.where(both, cand, 0.0), np.where(both, ref, 0.0)
    diff = np.abs(cand_f - ref_f)
    result.elements += int(cand.size)
    if diff.size:
        result.max_abs = max(result.max_abs, float(diff.max()))
        rel = diff / np.maximum(np.abs(ref_f), rel_floor(result.atol, result.rtol))
        result.max_rel = max(result.max_rel, float(rel.max()))
        result.sum_abs += float(diff.sum())
    outside = diff > result.atol + result.rtol * np.abs(ref_f)  # 0 where either side is NaN/Inf
    result.outside += int(outside.sum())
    result.cosine = min(result.cosine, _cosine(cand_f.ravel(), ref_f.ravel()))


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    norm_a, norm_b = float(np.linalg.norm(a)), float(np.linalg.norm(b))
    if norm_a == 0.0 and norm_b == 0.0:
        return 1.0
    if norm_a == 0.0 or norm_b == 0.0:
        return 0.0
    return float(np.dot(a, b) / (norm_a * norm_b))


def match_outputs(candidate: list[str], reference: list[str] | None) -> tuple[list[tuple[str, str]], str]:
    """Pair candidate outputs with reference outputs: by name when both have the
    same set of names, else by position. Returns (pairs, "name" or "position").
    A different number of outputs is an error."""
    if reference is not None and sorted(candidate) == sorted(reference):
        return [(name, name) for name in candidate], "name"
    count = len(reference) if reference is not None else None
    if count is not None and count != len(candidate):
        raise NormfoldError(
            f"the candidate has {len(candidate)} outputs ({', '.join(candidate)}) but the reference has "
            f"{count} ({', '.join(reference)}); they cannot be compared"
        )
    names = reference if reference is not None else [f"output {i}" for i in range(len(candidate))]
    return list(zip(candidate, names)), "position"
