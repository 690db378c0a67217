"""The outcome of `verify`: per-output metrics, pass/fail, JSON for CI (the
terminal and plain-text renderings are `normfold.cli.render`'s)."""

from __future__ import annotations

from dataclasses import dataclass, field

from normfold.verify.compare import OutputComparison
from normfold.verify.localize import Localization


@dataclass
class VerifyReport:
    """Candidate vs reference over all samples."""

    candidate: str
    reference: str
    reference_kind: str  # "onnx" or "pytorch"
    provider: str
    inputs: str  # where the inputs came from, e.g. "generated, seed 0"
    samples: int
    matched_by: str  # "name" or "position"
    outputs: list[OutputComparison] = field(default_factory=list)
    localization: Localization | None = None

    @property
    def passed(self) -> bool:
        """Every output within tolerance and free of NaN/Inf."""
        return all(o.passed for o in self.outputs)

    def failed_outputs(self) -> list[OutputComparison]:
        """The outputs that failed."""
        return [o for o in self.outputs if not o.passed]

    def verdict(self) -> str:
        """One line: PASS/FAIL and how many outputs."""
        if self.passed:
            return f"PASS: all {len(self.outputs)} outputs within tolerance"
        failed = self.failed_outputs()
        return (f"FAIL: {len(failed)} of {len(self.outputs)} outputs differ: "
                + "; ".join(f"{o.name} ({o.why()})" for o in failed))

    def to_dict(self) -> dict:
        """JSON-ready form."""
        return {
            "passed": self.passed,
            "candidate": self.candidate,
            "reference": self.reference,
            "reference_kind": self.reference_kind,
            "provider": self.provider,
            "inputs": self.inputs,
            "samples": self.samples,
            "matched_by": self.matched_by,
            "outputs": [o.to_dict() for o in self.outputs],
            "localization": self.localization.to_dict() if self.localization else None,
        }
