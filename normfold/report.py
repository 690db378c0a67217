"""What a pass changed and what it left alone, and why.

Every pass returns a `PassReport`; the CLI prints it as a table or as JSON.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field

# why a pass left a node it was told to exclude (a rewrite rolled back by the output check)
EXCLUDED = "excluded: its rewrite was rolled back (see the output check)"


@dataclass
class Change:
    """One rewrite: node `node` (an `op`) became part of / was replaced by `into`."""

    node: str
    op: str
    into: str  # what it became, e.g. "Conv", "Mul+Add", "com.normfold.GroupNorm"
    how: str = ""  # e.g. "backward", "forward", "7 nodes"
    graph: str = ""  # name of the (sub)graph holding the node


@dataclass
class Skip:
    """A candidate left as it was, with the reason."""

    node: str
    op: str
    reason: str
    graph: str = ""


@dataclass
class PassReport:
    """The outcome of one pass over a model (including its subgraphs)."""

    name: str
    changes: list[Change] = field(default_factory=list)
    skipped: list[Skip] = field(default_factory=list)

    def changed(self, node: str, op: str, into: str, how: str = "", graph: str = "") -> None:
        """Record a rewrite."""
        self.changes.append(Change(node, op, into, how, graph))

    def skip(self, node: str, op: str, reason: str, graph: str = "") -> None:
        """Record a candidate left alone, with the reason."""
        self.skipped.append(Skip(node, op, reason, graph))

    def counts(self) -> dict[str, int]:
        """Number of changes per 'into/how' kind, e.g. {'Conv (backward)': 3}."""
        return dict(Counter(f"{c.into} ({c.how})" if c.how else c.into for c in self.changes))

    def skip_reasons(self) -> dict[str, int]:
        """Number of skipped candidates per reason."""
        return dict(Counter(s.reason for s in self.skipped))

    def to_dict(self) -> dict:
        """JSON-ready form."""
        return {
            "pass": self.name,
            "changed": len(self.changes),
            "skipped": len(self.skipped),
            "by_kind": self.counts(),
            "skip_reasons": self.skip_reasons(),
            "changes": [asdict(c) for c in self.changes],
            "skips": [asdict(s) for s in self.skipped],
        }
