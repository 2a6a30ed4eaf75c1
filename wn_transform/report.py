"""What ``apply_weight_norm`` did: the weights it reparameterized, those it skipped, and why."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from .data_init import InitNotes
from .errors import few
from .targets import Skipped, Target

__all__ = ["WeightNormReport"]


@dataclass
class WeightNormReport:
    """The plan or the result of :func:`~wn_transform.apply_weight_norm`.

    ``converted``: the weights reparameterized (name, op kind, shape, unit axis, the
    discovery step that found them); ``skipped``: the weights left alone, with the reason;
    ``found_by``: the step of the tracing ladder that succeeded (``trace_failures`` says why
    the steps above it failed); ``init``: ``"data"`` or ``"preserve"``; ``notes``: what the
    data-dependent init could not do (constant units, layers the batch never reached);
    ``options``: the options of the call that differ from their defaults (``init_scale``,
    ``exact_init``, ``resample``, ``exp_scale``, ``mean_only_bn``, ``existing``), so that the
    report says how the weights were made; ``planned``: a plan's (:func:`~wn_transform.plan_weight_norm`),
    what an apply would do.
    """

    converted: list[Target]
    skipped: list[Skipped]
    found_by: str
    init: str
    trace_failures: dict[str, str] = field(default_factory=dict)
    notes: InitNotes | None = None
    mean_only_bn: list[str] = field(default_factory=list)  # layers given a mean-only batch norm
    mean_only_bn_missing: list[str] = field(default_factory=list)  # weights whose op output is not their layer's alone
    zero_units: dict[str, int] = field(default_factory=dict)  # all-zero units given g = 0 and a direction
    options: dict[str, Any] = field(default_factory=dict)  # the call's options that differ from their defaults
    planned: bool = False  # plan_weight_norm's: what apply would do, nothing done

    def table(self) -> str:
        """A plain-text table, one row per weight."""
        rows = [("weight", "op", "shape", "unit axis", "found by / reason")]
        for t in self.converted:
            axis = f"dim {t.layout.dim}" + (f", {t.layout.groups} groups" if t.layout.groups > 1 else "")
            rows.append((t.qualname, t.kind, "x".join(map(str, t.shape)), axis, t.found_by))
        for s in self.skipped:
            rows.append((s.qualname, "skipped", "", "", s.reason))
        widths = [max(len(row[i]) for row in rows) for i in range(4)]
        lines = ["  ".join(cell.ljust(w) for cell, w in zip(row[:4], widths)) + "  " + row[4] for row in rows]
        lines.insert(1, "-" * len(lines[0]))
        done = "would be reparameterized" if self.planned else "reparameterized"
        summary = f"{len(self.converted)} weights {done}, {len(self.skipped)} skipped; traced by {self.found_by}; init={self.init}"
        if self.options:
            summary += " (" + ", ".join(f"{name}={value!r}" for name, value in self.options.items()) + ")"
        lines.append(summary)
        lines.extend(f"  {step} failed: {why}" for step, why in self.trace_failures.items())
        if self.mean_only_bn:
            lines.append(f"  mean-only batch norm behind {len(self.mean_only_bn)} layers")
        for name, count in self.zero_units.items():
            lines.append(f"  {name}: {count} units all zero (zero-initialized or pruned): g = 0 and v a random direction, "
                         "so w stays 0 and they can train (freeze or mask them to keep them at 0)")
        for name in self.mean_only_bn_missing:
            lines.append(f"  {name}: no mean-only batch norm (the trace does not show its op running as the layer's "
                         "own call alone: other code runs it or reads its parameters, its class overrides forward, "
                         "it runs more than once per forward, it is frozen, or no trace); its bias stays")
        if self.notes is not None:
            notes = self.notes
            left_as_it_was = {*notes.recurrent_kept, *notes.frozen, *notes.unreached, *notes.unseen,
                              *notes.split_unfollowed}
            for t in self.converted:
                if t.uses > 1 and t.qualname not in left_as_it_was:  # the pass hands out v until the first op reading it has calibrated the layer
                    first = ("first call on data from the batch (the calls before it, on a constant or the model's "
                             "own tensors alone, passed over: DoRA's torch.eye, a recurrent state from zeros)"
                             if t.qualname in notes.passed_over else "first call that had rows")
                    lines.append(f"  {t.qualname}: read by {t.uses} op calls in one forward (a shared layer); the data init "
                                 f"standardized the output of its {first}, the others follow from it")
            for name, count in self.notes.constant_units.items():
                lines.append(f"  {name}: {count} units constant on the batch (sigma ~ 0); their scale is s, not s/sigma")
            for name, count in self.notes.nearly_constant_units.items():
                lines.append(f"  {name}: {count} units nearly constant on the batch (sigma < 1e-3 of their |mean| plus their neighbours' scale): "
                             "standardized only to within float rounding (a larger or more varied batch helps)")
            for name in self.notes.unreached:
                lines.append(f"  {name}: not reached by any row of the sample batch (the init pass runs the model in eval mode: "
                             "dropout off, no `if self.training` branch such as an auxiliary head); kept its scale")
            for name, count in self.notes.unreached_units.items():
                lines.append(f"  {name}: {count} of its units (pieces its weight was split into that no op used on the "
                             "batch) not calibrated; they kept their scale, the other pieces were standardized")
            for name in self.notes.split_unfollowed:
                lines.append(f"  {name}: its weight is split into pieces in a way the init pass does not follow (a split "
                             "of a transposed or reshaped view, of a grouped weight, or of a layer behind a mean-only "
                             "batch norm); not calibrated, kept its scale")
            for name in self.notes.unseen:
                lines.append(f"  {name}: its weight was read in the init pass, but no op the pass can see used it: an op "
                             "it cannot follow did (a TorchScript function, an op run from C++), or the forward only "
                             "tested it (`is not None`) and the layer did not run; not calibrated, kept its scale")
            for name in self.notes.frozen:
                lines.append(f"  {name}: frozen (requires_grad=False): not calibrated, it computes what it did")
            for name in self.notes.bias_not_set:
                lines.append(f"  {name}: its bias is not a trained parameter of its own (computed, frozen, or shared with "
                             "another layer); only g was set")
            if self.notes.no_bias:
                lines.append(f"  {len(self.notes.no_bias)} layers whose op adds no bias: the init set their std, their mean is "
                             f"the batch's; a bias added by a later op is not set ({few(self.notes.no_bias)})")
            if self.notes.recurrent_kept:
                lines.append(f"  {len(self.notes.recurrent_kept)} hidden-to-hidden weights kept their scale "
                             "(the data init standardizes the input projections of recurrent layers)")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()

    def to_dict(self) -> dict:
        notes = None if self.notes is None else asdict(self.notes)  # every field, a new one too
        return {
            "converted": [t.to_dict() for t in self.converted], "skipped": [s.to_dict() for s in self.skipped],
            "found_by": self.found_by, "init": self.init, "trace_failures": self.trace_failures, "notes": notes,
            "mean_only_bn": self.mean_only_bn, "mean_only_bn_missing": self.mean_only_bn_missing,
            "zero_units": self.zero_units, "options": self.options, "planned": self.planned,
        }
