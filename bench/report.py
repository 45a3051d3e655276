"""One row of the performance table (issue 15): a measured figure, its reference from the same run,
the ratio and the target. Every benchmark that feeds ``bench.all`` returns a list of these."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Row:
    """One measured figure beside the reference measured in the same run.

    ``higher_is_better``: for rates (instances/s) the ratio is value / reference and the target a
    minimum; for durations (s) the ratio is value / reference and the target a maximum. ``target``
    is the issue's bound on the ratio, or on the value itself when ``target_on_value``."""

    measure: str
    """What was measured, e.g. ``C-STORE ingest, 1 assoc, N=300``."""
    value: float
    unit: str
    """``inst/s``, ``s``, ``MB``..."""
    reference: str = ""
    """What the value is compared with (``storescp``, ``Orthanc``, ``target``); "" when none."""
    ref_value: float | None = None
    target: float | None = None
    """The bound: on the ratio (``x``), or on the value when ``target_on_value``."""
    higher_is_better: bool = True
    target_on_value: bool = False
    note: str = ""
    """Shares of the stages, what stands in the way of a missed target..."""

    @property
    def ratio(self) -> float | None:
        if self.ref_value is None or not self.ref_value:
            return None
        return self.value / self.ref_value

    @property
    def met(self) -> bool | None:
        """Whether the target is met (None: no target)."""
        if self.target is None:
            return None
        figure = self.value if self.target_on_value else self.ratio
        if figure is None:
            return None
        return figure >= self.target if self.higher_is_better else figure <= self.target

    def target_text(self) -> str:
        if self.target is None:
            return ""
        sign = ">=" if self.higher_is_better else "<="
        return f"{sign} {self.target:g} {self.unit}" if self.target_on_value else f"{sign} {self.target:g}x"


def format_table(rows: list[Row]) -> str:
    """The rows as one fixed-width table (notes below it, numbered)."""
    head = f"{'measure':<46} {'value':>10} {'unit':<7} {'reference':<22} {'ref':>9} {'ratio':>6} {'target':>12} met"
    lines = [head, "-" * len(head)]
    notes: list[str] = []
    for r in rows:
        ref = "" if r.ref_value is None else f"{r.ref_value:9.2f}"
        ratio = "" if r.ratio is None else f"{r.ratio:6.2f}"
        met = {None: "", True: "yes", False: "NO"}[r.met]
        mark = ""
        if r.note:
            notes.append(r.note)
            mark = f" [{len(notes)}]"
        lines.append(f"{r.measure:<46} {r.value:10.2f} {r.unit:<7} {r.reference:<22} {ref:>9} {ratio:>6} "
                     f"{r.target_text():>12} {met}{mark}")
    lines.extend(f"[{i}] {n}" for i, n in enumerate(notes, 1))
    return "\n".join(lines)
