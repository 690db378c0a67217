"""The outcome of `verify`: per-output metrics, pass/fail, JSON for CI (the
terminal and plain-text renderings are `normfold.cli.render`'s)."""

from __future__ import annotations

from dataclasses import dataclass, field

from normfold.verify.compare import OutputComparison
from normfold.verify.configurations import FAIL, ConfigurationResult
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
    configurations: list[ConfigurationResult] = field(default_factory=list)  # `outputs` are the first that ran

    @property
    def passed(self) -> bool:
        """Every output within tolerance and free of NaN/Inf, in every configuration that applies."""
        return all(o.passed for o in self.outputs) and not self.failed_configurations()

    def failed_configurations(self) -> list[ConfigurationResult]:
        """The configurations where the candidate failed to load, run or match."""
        return [c for c in self.configurations if c.status == FAIL]

    def failed_outputs(self) -> list[OutputComparison]:
        """The outputs that failed."""
        return [o for o in self.outputs if not o.passed]

    def verdict(self) -> str:
        """One line: PASS/FAIL and how many outputs."""
        ran = [c.name for c in self.configurations if c.ran]
        where = f" in {', '.join(ran)}" if ran else ""
        if self.passed:
            return f"PASS: all {len(self.outputs)} outputs within tolerance{where}"
        failed = self.failed_outputs()
        parts = [f"{len(failed)} of {len(self.outputs)} outputs differ{' in ' + ran[0] if ran else ''}: "
                 + "; ".join(f"{o.name} ({o.why()})" for o in failed)] if failed else []
        shown = ran[0] if failed else None  # the first configuration that ran is the one `outputs` show
        parts += [c.line() for c in self.failed_configurations() if c.name != shown]
        return "FAIL: " + "; ".join(parts)

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
            "configurations": [c.to_dict() for c in self.configurations],
        }
