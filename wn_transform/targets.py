"""What discovery hands downstream: the weights to reparameterize, and those it skipped."""

from __future__ import annotations

from dataclasses import dataclass

from .norm import UnitLayout

__all__ = ["Skipped", "Target", "split_qualname"]


def split_qualname(qualname: str) -> tuple[str, str]:
    """``"encoder.fc.weight"`` -> ``("encoder.fc", "weight")``; ``"w"`` -> ``("", "w")``."""
    module, _, name = qualname.rpartition(".")
    return module, name


@dataclass(frozen=True)
class Target:
    """A weight that reaches a linear/conv op: ``<module>.<name>``, its op and unit layout."""

    module: str
    name: str
    kind: str  # "linear" | "conv" | "conv_transpose" | "matmul"
    shape: tuple[int, ...]
    layout: UnitLayout
    found_by: str  # "symbolic_trace" | "torch.export" | "recorded" | "module walk"
    uses: int = 1  # how many op calls read it in one forward (calls on slices of its units, q and k/v, as one)
    # Every op that reads it (and its layer's bias) ran as the layer's own module call, with no
    # torch composite around the layer that reads them directly: the op's output is the layer's.
    own_call: bool = False

    @property
    def qualname(self) -> str:
        return f"{self.module}.{self.name}" if self.module else self.name

    def to_dict(self) -> dict:
        return {
            "name": self.qualname, "kind": self.kind, "shape": list(self.shape), "dim": self.layout.dim,
            "groups": self.layout.groups, "found_by": self.found_by, "uses": self.uses,
        }


@dataclass(frozen=True)
class Skipped:
    """A weight that was left as it is, and why."""

    qualname: str
    reason: str

    def to_dict(self) -> dict:
        return {"name": self.qualname, "reason": self.reason}
