"""Declarative routing: rules match series attributes and name models and destinations. No eval.

A match value is one of:
    scalar        equal (strings compared case-insensitively, numbers numerically)
    list          any of the listed scalars
    {regex: R}    ``re.fullmatch`` (case-insensitive)
    {min, max}    numeric range, inclusive
A multi-valued attribute (ImageType) matches when any of its values does. A missing attribute never
matches. Every series of a ready study is checked against every rule; each (series, model) pair
becomes one job (first matching rule wins for a model; destinations of all matching rules merge, and
the job takes the most urgent ``priority`` among them).

With ``priors:`` configured, a job of a registration model whose series has no prior study in the
catalog is created ``awaiting-prior``: :mod:`node.retrieve` fetches the prior from the PACS and then
queues it. Routing decides this once, here; the retriever only acts on that job state.
"""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Callable
from typing import Any

from models import registry
from node.catalog import Catalog, JobSpec
from node.config import MatchValue, RangeMatch, RegexMatch, Rule
from node.dispatch import most_urgent
from node.schema import StudyState

log = logging.getLogger("node.route")



class Hold:
    """What a :data:`FixedPlan` returns for a study that must not be routed yet (still being retrieved):
    it stays ready and is planned again on the next pass."""


HOLD = Hold()
FixedPlan = Callable[[str, list[tuple[int, dict[str, Any]]]], list[JobSpec] | Hold | None]
"""(study UID, series) -> the study's jobs when something other than the rules decides them (a
retrospective batch's study, :meth:`node.batch.BatchRunner.plan_for`); None: the rules decide."""


@functools.cache
def is_pair_model(name: str) -> bool:
    """Whether model ``name`` needs a prior study (family ``registration``; read from its manifest,
    without importing the model)."""
    return registry.manifest(name).family == "registration"


def _scalar_equal(actual: Any, wanted: str | int | float) -> bool:
    if isinstance(wanted, (int, float)) and not isinstance(wanted, bool):
        try:
            return float(actual) == float(wanted)
        except (TypeError, ValueError):
            return False
    return str(actual).strip().casefold() == str(wanted).strip().casefold()


def _value_matches(actual: Any, wanted: MatchValue) -> bool:
    if isinstance(wanted, RegexMatch):
        return re.fullmatch(wanted.regex, str(actual), flags=re.IGNORECASE) is not None
    if isinstance(wanted, RangeMatch):
        try:
            x = float(actual)
        except (TypeError, ValueError):
            return False
        return (wanted.min is None or x >= wanted.min) and (wanted.max is None or x <= wanted.max)
    if isinstance(wanted, list):
        return any(_scalar_equal(actual, w) for w in wanted)
    return _scalar_equal(actual, wanted)


def condition_holds(key: str, wanted: MatchValue, attributes: dict[str, Any]) -> bool:
    """Whether one condition of a rule's ``match:`` holds (the dry run, :mod:`node.rules_check`,
    explains each with this very function)."""
    if key not in attributes:
        return False
    actual = attributes[key]
    values = actual if isinstance(actual, list) else [actual]
    return any(_value_matches(v, wanted) for v in values)


def rule_matches(rule: Rule, attributes: dict[str, Any]) -> bool:
    return all(condition_holds(key, wanted, attributes) for key, wanted in rule.match.items())


def plan_jobs(rules: list[Rule], series: list[tuple[int, dict[str, Any]]]) -> list[JobSpec]:
    """Pure routing: (series id, attributes) pairs -> job specs."""
    specs: dict[tuple[int, str], JobSpec] = {}
    for series_id, attrs in series:
        for rule in rules:
            if not rule_matches(rule, attrs):
                continue
            for model in rule.models:
                key = (series_id, model)
                if key in specs:
                    merged = tuple(dict.fromkeys(specs[key].destinations + tuple(rule.send_to)))
                    specs[key] = specs[key]._replace(destinations=merged,
                                                     priority=most_urgent(specs[key].priority, rule.priority))
                else:
                    specs[key] = JobSpec(series_id, model, rule.name, tuple(rule.send_to), priority=rule.priority)
    return list(specs.values())


class Router:
    """Turns ready studies into jobs in the catalog; returns the new job ids to enqueue."""

    def __init__(self, catalog: Catalog, rules: list[Rule], clock: Callable[[], float], *,
                 priors_from_pacs: bool = False, fixed_plan: FixedPlan | None = None) -> None:
        """``priors_from_pacs``: a ``priors:`` section is configured (jobs may await a prior);
        ``fixed_plan``: studies whose jobs are not the rules' (:data:`FixedPlan`)."""
        self.catalog = catalog
        self.rules = rules
        self.clock = clock
        self.priors_from_pacs = priors_from_pacs
        self.fixed_plan = fixed_plan

    def _awaits_prior(self, study_id: int, spec: JobSpec) -> bool:
        return (self.priors_from_pacs and is_pair_model(spec.model)
                and not self.catalog.has_prior(study_id, spec.series_id))

    def plan(self, study_id: int, series: list[tuple[int, dict[str, Any]]]) -> list[JobSpec]:
        """The jobs routing creates for the study's ``series`` (id, routing attributes); writes nothing
        (also the dry run's plan of a catalog study, :func:`node.rules_check.check_study`)."""
        return [spec._replace(awaits_prior=self._awaits_prior(study_id, spec))
                for spec in plan_jobs(self.rules, series)]

    def route_ready(self) -> list[int]:
        new_jobs: list[int] = []
        for study in self.catalog.studies_in_state(StudyState.READY):
            series = [(s.id, s.routing_attributes) for s in self.catalog.series_of_study(study.id)
                      if s.instance_count]  # a series whose instances were purged (node.lifecycle) has none
            fixed = self.fixed_plan(study.study_uid, series) if self.fixed_plan is not None else None
            if isinstance(fixed, Hold):
                continue
            specs = self.plan(study.id, series) if fixed is None else [
                spec._replace(awaits_prior=self._awaits_prior(study.id, spec)) for spec in fixed]
            ids = self.catalog.create_jobs(study.id, study.generation, specs, self.clock())
            if specs:
                log.info("study #%d routed: %d job(s) %s", study.id, len(ids),
                         sorted({f"{j.rule}:{j.model}" for j in specs}))
            else:
                log.info("study #%d matched no rule (%d series); recorded as unrouted", study.id, len(series))
            new_jobs.extend(ids)
        return new_jobs
