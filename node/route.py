"""Declarative routing: rules match series attributes and name models and destinations. No eval.

A match value is one of:
    scalar        equal (strings compared case-insensitively, numbers numerically)
    list          any of the listed scalars
    {regex: R}    ``re.fullmatch`` (case-insensitive)
    {min, max}    numeric range, inclusive
A multi-valued attribute (ImageType) matches when any of its values does. A missing attribute never
matches. Every series of a ready study is checked against every rule; each (series, model) pair
becomes one job (first matching rule wins for a model; destinations of all matching rules merge).
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from node.catalog import Catalog
from node.config import MatchValue, RangeMatch, RegexMatch, Rule

log = logging.getLogger("node.route")


@dataclass(frozen=True)
class JobSpec:
    series_id: int
    model: str
    rule: str
    destinations: tuple[str, ...]


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


def rule_matches(rule: Rule, attributes: dict[str, Any]) -> bool:
    for key, wanted in rule.match.items():
        if key not in attributes:
            return False
        actual = attributes[key]
        values = actual if isinstance(actual, list) else [actual]
        if not any(_value_matches(v, wanted) for v in values):
            return False
    return True


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
                    specs[key] = JobSpec(series_id, model, specs[key].rule, merged)
                else:
                    specs[key] = JobSpec(series_id, model, rule.name, tuple(rule.send_to))
    return list(specs.values())


class Router:
    """Turns ready studies into jobs in the catalog; returns the new job ids to enqueue."""

    def __init__(self, catalog: Catalog, rules: list[Rule], clock: Callable[[], float]) -> None:
        self.catalog = catalog
        self.rules = rules
        self.clock = clock

    def route_ready(self) -> list[int]:
        new_jobs: list[int] = []
        for study in self.catalog.studies_in_state("ready"):
            series = [
                (s.id, {**json.loads(s.attributes), "NumberOfInstances": s.instance_count})
                for s in self.catalog.series_of_study(study.id)
            ]
            specs = plan_jobs(self.rules, series)
            ids = self.catalog.create_jobs(
                study.id,
                study.generation,
                [(j.series_id, j.model, j.rule, list(j.destinations)) for j in specs],
                self.clock(),
            )
            if specs:
                log.info("study #%d routed: %d job(s) %s", study.id, len(ids),
                         sorted({f"{j.rule}:{j.model}" for j in specs}))
            else:
                log.info("study #%d matched no rule (%d series); recorded as unrouted", study.id, len(series))
            new_jobs.extend(ids)
        return new_jobs
