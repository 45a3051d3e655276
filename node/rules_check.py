"""The rule dry run: which rules a study's series match, which conditions failed and why, and which
jobs and destinations routing would create. Nothing is written: no job, no spool file, no catalog row.

The verdicts come from routing's own code (:func:`node.route.condition_holds`, :func:`node.route.plan_jobs`
and, for a catalog study, :meth:`node.route.Router.plan` with its awaiting-prior decision), and files
are read with the receiver's own extraction (:func:`node.receive.scp.series_attributes`), so the dry
run cannot drift from what the node does. This module only adds the words.

The API (the CLI's ``dicom-node rules test`` and ``POST /api/v1/rules/test`` call it):

    check_paths(settings, paths, *, calling_ae=None, catalog=None) -> RuleReport   files and directories
    check_files(settings, files, *, calling_ae=None, catalog=None) -> RuleReport   (path, display name) pairs
    check_study(settings, catalog, study_id) -> RuleReport                         a study in the catalog
    check_target(settings, target, *, catalog=None, calling_ae=None) -> RuleReport a path, else a study id
    RuleReport.to_dict()        JSON-able (``--json``, the API's body)
    render_text(report)         plain-text lines for a terminal (no colour, no printing here)

Raises :class:`UnknownStudy` (an :class:`models.errors.InputError`) for a study id the catalog lacks
and :class:`models.errors.InputError` for a path that does not exist. Routing attributes (Modality,
SeriesDescription, ...: :data:`node.config.MATCHABLE_ATTRIBUTES`, never patient name or ID) are
returned to the caller and never logged.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydicom
from pydantic import BaseModel, ConfigDict, Field
from pydicom.errors import InvalidDicomError

from models import registry
from models.errors import InputError
from node.catalog import Catalog, JobSpec
from node.config import MatchValue, RangeMatch, RegexMatch, Rule, Settings
from node.conformance import STORAGE_SOP_CLASSES
from node.receive.scp import pixel_data_problem, series_attributes
from node.route import Router, condition_holds, is_pair_model, plan_jobs
from node.schema import StudyState
from node.spool import is_valid_uid

__all__ = [
    "ConditionCheck",
    "ModelCheck",
    "PlannedJob",
    "RuleCheck",
    "RuleReport",
    "SeriesCheck",
    "SkippedFile",
    "UnknownStudy",
    "check_files",
    "check_paths",
    "check_study",
    "check_target",
    "explain_condition",
    "render_text",
]


class UnknownStudy(InputError):
    """The study id is not in the catalog."""


class _Out(BaseModel):
    model_config = ConfigDict(frozen=True)


class ConditionCheck(_Out):
    """One condition of a rule's ``match:`` against one series."""

    attribute: str
    wanted: str = Field(description="the condition in words, e.g. \"'CT'\", \"one of 'CT', 'MR'\", \"at most 3.0\"")
    actual: Any = Field(None, description="the series' value (a list for ImageType); null when missing")
    held: bool
    reason: str = Field(description="why it held or failed, e.g. \"Modality is 'MR', rule wants 'CT'\"")


class RuleCheck(_Out):
    """One rule against one series."""

    rule: str
    matched: bool
    conditions: list[ConditionCheck]
    models: list[str]
    send_to: list[str]


class SeriesCheck(_Out):
    """One series: its routing attributes and every rule's verdict."""

    key: str = Field(description="catalog series id (#N) or the Series Instance UID of files")
    label: str
    study: str = Field(description="catalog study id (#N) or the Study Instance UID of files")
    instances: int
    attributes: dict[str, Any] = Field(description="the routing attributes rules match on")
    rules: list[RuleCheck]
    notes: list[str] = Field(default_factory=list)


class PlannedJob(_Out):
    """A job routing would create (one per series and model)."""

    series: str = Field(description="the series' key")
    model: str
    rule: str = Field(description="the first matching rule naming the model")
    destinations: list[str] = Field(description="merged from every matching rule naming the model")
    awaits_prior: bool | None = Field(description="created awaiting a prior from the PACS; null: not known "
                                                  "for files (depends on the catalog's earlier studies)")
    notes: list[str] = Field(default_factory=list, description="why it may still give no result")


class ModelCheck(_Out):
    """A model a planned job names, from its manifest (no model code imported)."""

    name: str
    known: bool
    family: str | None = None
    modalities: list[str] = Field(default_factory=list)
    min_slices: int | None = None
    queue: str | None = None
    missing_modules: list[str] = Field(default_factory=list, description="not installed on this host")


class SkippedFile(_Out):
    """A file that was not considered, and why (the node would refuse it, or it is not DICOM)."""

    path: str
    reason: str


class RuleReport(_Out):
    """The dry run's answer (``to_dict()`` is the API's JSON)."""

    source: str = Field(description="files | study")
    study_id: int | None = None
    study_state: str | None = None
    rules: int = Field(description="how many rules are configured")
    series: list[SeriesCheck]
    jobs: list[PlannedJob]
    models: list[ModelCheck]
    skipped: list[SkippedFile] = Field(default_factory=list)
    notes: list[str] = Field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able (lists, strings, numbers, booleans, null)."""
        return self.model_dump(mode="json")


_Row = tuple[str, str, str, dict[str, Any], list[str]]
"""A series for the core: key, label, study, routing attributes, notes."""


# ---- the words ---------------------------------------------------------------------------------
def _show(value: Any) -> str:
    if isinstance(value, list):
        return "\\".join(str(v) for v in value)
    return repr(value) if isinstance(value, str) else str(value)


def describe_wanted(wanted: MatchValue) -> str:
    """A condition's value in words."""
    if isinstance(wanted, RegexMatch):
        return f"matching /{wanted.regex}/"
    if isinstance(wanted, RangeMatch):
        if wanted.min is not None and wanted.max is not None:
            return f"between {wanted.min} and {wanted.max}"
        return f"at least {wanted.min}" if wanted.min is not None else f"at most {wanted.max}"
    if isinstance(wanted, list):
        return "one of " + ", ".join(_show(w) for w in wanted)
    return _show(wanted)


def _is_number(value: Any) -> bool:
    try:
        float(value)
    except (TypeError, ValueError):
        return False
    return not isinstance(value, bool)


def _why_not(key: str, value: Any, wanted: MatchValue) -> str:
    """Why one (single) value fails the condition."""
    if isinstance(wanted, RegexMatch):
        return f"{key} {_show(value)} does not match /{wanted.regex}/ (the whole value must match, any case)"
    numeric = isinstance(wanted, RangeMatch) or (isinstance(wanted, (int, float)) and not isinstance(wanted, bool))
    if numeric and not _is_number(value):
        return f"{key} is {_show(value)}, not a number; rule wants {describe_wanted(wanted)}"
    if isinstance(wanted, RangeMatch):
        if wanted.min is not None and float(value) < wanted.min:
            return f"{key} {_show(value)} is below min {wanted.min}"
        return f"{key} {_show(value)} is above max {wanted.max}"
    return f"{key} is {_show(value)}, rule wants {describe_wanted(wanted)}"


def explain_condition(key: str, wanted: MatchValue, attributes: dict[str, Any]) -> ConditionCheck:
    """Whether one condition holds (routing's own test) and why, in words."""
    held = condition_holds(key, wanted, attributes)
    what = describe_wanted(wanted)
    if key not in attributes:
        why = f"{key} is missing" + (" (files have no sender: give the calling AE title to test it)"
                                     if key == "CallingAETitle" else "")
        return ConditionCheck(attribute=key, wanted=what, actual=None, held=False, reason=why)
    actual = attributes[key]
    if isinstance(actual, list):  # multi-valued (ImageType): any value may match
        if held:
            reason = f"{key} {_show(actual)} has a value {what}"
        else:
            reason = f"none of {key}'s values {_show(actual)} is {what}"
    elif held:
        reason = f"{key} is {_show(actual)}" + ("" if what == _show(actual) else f" (rule wants {what})")
    else:
        reason = _why_not(key, actual, wanted)
    return ConditionCheck(attribute=key, wanted=what, actual=actual, held=held, reason=reason)


def _rule_check(rule: Rule, attributes: dict[str, Any]) -> RuleCheck:
    conditions = [explain_condition(k, w, attributes) for k, w in rule.match.items()]
    return RuleCheck(rule=rule.name, matched=all(c.held for c in conditions), conditions=conditions,
                     models=list(rule.models), send_to=list(rule.send_to))


def _model_check(settings: Settings, name: str) -> ModelCheck:
    try:
        manifest = registry.manifest(name)
    except registry.UnknownModelError:
        return ModelCheck(name=name, known=False)
    return ModelCheck(name=name, known=True, family=manifest.family, modalities=list(manifest.modalities),
                      min_slices=manifest.min_slices, queue=settings.model_settings(name).queue,
                      missing_modules=registry.missing_modules(name))


def _job_notes(model: ModelCheck, attributes: dict[str, Any], paused: set[str], destinations: Iterable[str],
               settings: Settings) -> list[str]:
    """Why a planned job may still give no result (the model's own limits, its install, paused sends)."""
    if not model.known:
        return [f"{model.name} is not a registered model (known: {', '.join(registry.available())})"]
    notes: list[str] = []
    modality = str(attributes.get("Modality") or "")
    if modality.upper() not in model.modalities:
        notes.append(f"{model.name} takes {', '.join(model.modalities)} only; this series is "
                     f"{modality or 'without Modality'}: the job would end skipped as unsuitable")
    count = attributes.get("NumberOfInstances")  # one instance may be multi-frame: not judged
    if model.min_slices is not None and isinstance(count, int) and 1 < count < model.min_slices:
        notes.append(f"{model.name} needs at least {model.min_slices} slices; this series has {count} instances")
    if model.missing_modules:
        extra = registry.spec(model.name).extra
        notes.append(f"{model.name} needs {', '.join(model.missing_modules)}"
                     + (f" (extra '{extra}')" if extra else "")
                     + f", not installed on this host: only a worker elsewhere serving queue '{model.queue}' "
                     "can run it")
    if model.family == "registration" and settings.priors is None:
        notes.append(f"{model.name} needs a prior study of the same patient in the catalog (no priors: section "
                     "to fetch one from the PACS)")
    notes.extend(f"destination '{d}' is paused: its results wait until it is resumed"
                 for d in destinations if d in paused)
    return notes


_Plan = Callable[[list[tuple[int, dict[str, Any]]]], list[tuple[JobSpec, bool | None]]]
"""(series index, routing attributes) pairs -> job specs, each with its awaiting-prior verdict."""


def _report(settings: Settings, series: Sequence[_Row], plan: _Plan, *, paused: set[str], source: str,
            notes: list[str], skipped: Sequence[SkippedFile] = (), study_id: int | None = None,
            study_state: str | None = None) -> RuleReport:
    """The pure core: ``series`` as (key, label, study, routing attributes, notes); ``plan`` turns
    (index, attributes) pairs into job specs with their awaiting-prior verdict."""
    checks = [SeriesCheck(key=key, label=label, study=study, instances=int(attrs.get("NumberOfInstances") or 0),
                          attributes=attrs, rules=[_rule_check(r, attrs) for r in settings.rules], notes=notes)
              for key, label, study, attrs, notes in series]
    specs = plan([(i, s[3]) for i, s in enumerate(series)])
    models = {name: _model_check(settings, name) for name in dict.fromkeys(spec.model for spec, _ in specs)}
    jobs = [PlannedJob(series=series[spec.series_id][0], model=spec.model, rule=spec.rule,
                       destinations=list(spec.destinations), awaits_prior=awaits,
                       notes=_job_notes(models[spec.model], series[spec.series_id][3], paused, spec.destinations,
                                        settings))
            for spec, awaits in specs]
    notes = list(notes)
    if not settings.rules:
        notes.append("no rules are configured: nothing is ever routed")
    elif series and not jobs:
        notes.append("no rule matches any series: the study would be recorded as unrouted")
    return RuleReport(source=source, study_id=study_id, study_state=study_state, rules=len(settings.rules),
                      series=checks, jobs=jobs, models=list(models.values()), skipped=list(skipped), notes=notes)


def _paused(catalog: Catalog | None) -> set[str]:
    return catalog.paused_destinations() if catalog is not None else set()


# ---- inputs ------------------------------------------------------------------------------------
@dataclass
class _FileSeries:
    """The instances of one series among the files, as the receiver would record them."""

    study_uid: str
    series_uid: str
    attributes: dict[str, Any]
    """Of the first instance (the receiver records the first instance's)."""
    number: str
    where: str
    sop_uids: set[str] = field(default_factory=set)
    varying: set[str] = field(default_factory=set)


def _read(path: Path, calling_ae: str | None) -> tuple[Any, dict[str, Any]] | str:
    """(dataset, routing attributes) of one file, or why the node would not take it (the receiver's
    parser and checks: :meth:`node.receive.scp.Receiver.receive_file`)."""
    try:
        ds = pydicom.dcmread(path, force=False)
        transfer_syntax = str(ds.file_meta.TransferSyntaxUID)
        attributes = series_attributes(ds, calling_ae or "")
        problem = pixel_data_problem(ds, transfer_syntax)
    except InvalidDicomError:
        return "not a DICOM file (no DICM preamble)"
    except OSError as exc:
        return f"cannot be read: {exc.strerror or type(exc).__name__}"
    except (Exception, RecursionError) as exc:  # anything the parser throws
        return f"cannot be parsed ({type(exc).__name__}): the node would refuse it"
    if not calling_ae:
        attributes.pop("CallingAETitle", None)
    sop_class = str(ds.get("SOPClassUID", ""))
    if sop_class not in STORAGE_SOP_CLASSES:
        name = pydicom.uid.UID(sop_class).name if sop_class else "none"
        return f"SOP class {sop_class or '(none)'} ({name}) is not one the node accepts"
    if not all(is_valid_uid(ds.get(k)) for k in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")):
        return "missing or invalid Study/Series/SOP Instance UID: the node would refuse it"
    if problem:
        return f"the node would refuse it: {problem}"
    return ds, attributes


def _read_series(files: Sequence[tuple[Path, str]], calling_ae: str | None
                 ) -> tuple[list[_FileSeries], list[SkippedFile]]:
    found: dict[str, _FileSeries] = {}
    skipped: list[SkippedFile] = []
    for path, name in files:
        read = _read(path, calling_ae)
        if isinstance(read, str):
            skipped.append(SkippedFile(path=name, reason=read))
            continue
        ds, attributes = read
        uid = str(ds.SeriesInstanceUID)
        s = found.get(uid)
        if s is None:
            s = found[uid] = _FileSeries(str(ds.StudyInstanceUID), uid, attributes, str(ds.get("SeriesNumber", "")),
                                         str(Path(name).parent))
        elif attributes != s.attributes:
            s.varying |= {k for k in attributes.keys() | s.attributes.keys()
                          if attributes.get(k) != s.attributes.get(k)}
        s.sop_uids.add(str(ds.SOPInstanceUID))  # a duplicate instance is stored once
    return list(found.values()), skipped


def _file_row(s: _FileSeries) -> _Row:
    count = len(s.sop_uids)
    modality = s.attributes.get("Modality") or "no modality"
    label = f"series {s.number or '?'} ({modality}, {count} instance{'s' * (count != 1)})"
    if s.where not in ("", "."):
        label += f" in {s.where}"
    differ = "differs" if len(s.varying) == 1 else "differ"
    notes = [f"{', '.join(sorted(s.varying))} {differ} between instances: the node records the first "
             "instance it receives"] if s.varying else []
    return s.series_uid, label, s.study_uid, {**s.attributes, "NumberOfInstances": count}, notes


def _files_plan(settings: Settings) -> _Plan:
    def plan(series: list[tuple[int, dict[str, Any]]]) -> list[tuple[JobSpec, bool | None]]:
        out: list[tuple[JobSpec, bool | None]] = []
        for spec in plan_jobs(settings.rules, series):
            try:
                pair = is_pair_model(spec.model)
            except registry.UnknownModelError:
                pair = False
            # with priors: configured, a pair model's job awaits a prior unless the catalog holds one
            out.append((spec, None if pair and settings.priors is not None else False))
        return out
    return plan


def check_files(settings: Settings, files: Sequence[tuple[Path, str]], *, calling_ae: str | None = None,
                catalog: Catalog | None = None) -> RuleReport:
    """Dry-run the rules on DICOM files, given as (path, name shown in the report); instances are
    grouped by series as the receiver would record them. ``calling_ae``: the sender to assume
    (``CallingAETitle``; None: missing). ``catalog``: only to note paused destinations."""
    found, skipped = _read_series(files, calling_ae)
    notes = [] if found else ["no DICOM instance the node would take: nothing to route"]
    return _report(settings, [_file_row(s) for s in found], _files_plan(settings), paused=_paused(catalog),
                   source="files", skipped=skipped, notes=notes)


def _walk(paths: Sequence[Path]) -> list[tuple[Path, str]]:
    files: list[tuple[Path, str]] = []
    for root in paths:
        if root.is_dir():
            files.extend((p, str(p.relative_to(root.parent))) for p in sorted(root.rglob("*")) if p.is_file())
        elif root.exists():
            files.append((root, root.name))
        else:
            raise InputError(f"{root}: no such file or directory")
    return files


def check_paths(settings: Settings, paths: Sequence[Path], *, calling_ae: str | None = None,
                catalog: Catalog | None = None) -> RuleReport:
    """Dry-run the rules on DICOM files and directories (walked recursively; files that are not DICOM
    or that the node would refuse are listed in ``skipped`` with the reason)."""
    return check_files(settings, _walk([Path(p) for p in paths]), calling_ae=calling_ae, catalog=catalog)


_STATE_NOTES = {
    StudyState.RECEIVING: "the study is still receiving: it is routed after its quiet period",
    StudyState.PRIOR: "the study was fetched as a prior for another study: it is never routed itself",
    StudyState.ROUTED: "the study is already routed: these are the jobs routing would create now "
                       "(a rerun routes it again)",
    StudyState.UNROUTED: "the study was recorded as unrouted: these are the jobs routing would create now "
                         "(a rerun routes it again)",
}


def check_study(settings: Settings, catalog: Catalog, study_id: int) -> RuleReport:
    """Dry-run the rules on a catalog study's series (their recorded routing attributes), planned by
    the router itself (awaiting-prior decided as routing would, from the catalog)."""
    study = catalog.get_study(study_id)
    if study is None:
        raise UnknownStudy(f"no study #{study_id} in the catalog")
    rows = catalog.series_of_study(study_id)
    router = Router(catalog, settings.rules, lambda: 0.0, priors_from_pacs=settings.priors is not None)

    def plan(series: list[tuple[int, dict[str, Any]]]) -> list[tuple[JobSpec, bool | None]]:
        by_index = [(rows[i].id, attrs) for i, attrs in series]
        index = {rows[i].id: i for i, _ in series}
        try:
            specs = router.plan(study_id, by_index)
        except registry.UnknownModelError:  # settings not checked against the registry
            specs = plan_jobs(settings.rules, by_index)
        return [(s._replace(series_id=index[s.series_id]), s.awaits_prior) for s in specs]

    series: list[_Row] = [
        (f"#{s.id}", f"series #{s.id} ({s.modality or 'no modality'}, {s.instance_count} instances)", f"#{study_id}",
         s.routing_attributes, []) for s in rows]
    notes = [n for st, n in _STATE_NOTES.items() if study.state == st]
    if not rows:
        notes.append("the study has no received series")
    return _report(settings, series, plan, paused=_paused(catalog), source="study", study_id=study_id,
                   study_state=str(study.state), notes=notes)


def check_target(settings: Settings, target: str, *, catalog: Catalog | None = None,
                 calling_ae: str | None = None) -> RuleReport:
    """``dicom-node rules test TARGET``: an existing file or directory, else a catalog study id
    (``123`` or ``#123``; needs ``catalog``)."""
    path = Path(target)
    if path.exists():
        return check_paths(settings, [path], calling_ae=calling_ae, catalog=catalog)
    digits = target.removeprefix("#")
    if digits.isdigit():
        if catalog is None:
            raise InputError(f"{target}: a study id needs the node's catalog")
        return check_study(settings, catalog, int(digits))
    raise InputError(f"{target}: no such file or directory, and not a study id")


# ---- plain text --------------------------------------------------------------------------------
def render_text(report: RuleReport) -> list[str]:
    """The report as lines for a terminal: per series the rules (matched or the failed conditions),
    then the jobs and destinations, the models' limits, skipped files and notes."""
    lines: list[str] = []
    for s in report.series:
        lines.append(f"{s.label}  [{s.key}]")
        shown = ", ".join(f"{k}={_show(v)}" for k, v in s.attributes.items())
        lines.append(f"  attributes: {shown}")
        lines.extend(f"  note: {n}" for n in s.notes)
        for r in s.rules:
            if r.matched:
                lines.append(f"  MATCH    {r.rule} -> {', '.join(r.models)}"
                             + (f" to {', '.join(r.send_to)}" if r.send_to else " (no destination)"))
            else:
                failed = [c.reason for c in r.conditions if not c.held]
                lines.append(f"  no match {r.rule}: " + "; ".join(failed))
    lines.append(f"jobs ({len(report.jobs)}):" if report.jobs else "jobs: none would be created")
    labels = {s.key: s.label for s in report.series}
    for j in report.jobs:
        prior = {True: ", awaits a prior", None: ", may await a prior", False: ""}[j.awaits_prior]
        dest = ", ".join(j.destinations) or "no destination"
        lines.append(f"  {labels.get(j.series, j.series)}: {j.model} (rule {j.rule}) -> {dest}{prior}")
        lines.extend(f"    ! {n}" for n in j.notes)
    for m in report.models:
        if m.known:
            lines.append(f"model {m.name}: {m.family}, takes {', '.join(m.modalities)}, "
                         f"at least {m.min_slices} slices, queue {m.queue}")
    if report.skipped:
        lines.append(f"skipped ({len(report.skipped)}):")
        lines.extend(f"  {f.path}: {f.reason}" for f in report.skipped)
    lines.extend(f"note: {n}" for n in report.notes)
    return lines
