from node.config import RangeMatch, RegexMatch, Rule
from node.route import plan_jobs, rule_matches


def rule(**match: object) -> Rule:
    return Rule.model_validate({"name": "r", "match": match, "models": ["m"], "send_to": []})


def test_scalar_is_case_insensitive_equal() -> None:
    assert rule_matches(rule(Modality="ct"), {"Modality": "CT"})
    assert not rule_matches(rule(Modality="CT"), {"Modality": "MR"})


def test_missing_attribute_never_matches() -> None:
    assert not rule_matches(rule(BodyPartExamined="CHEST"), {"Modality": "CT"})


def test_list_regex_range_and_multivalue() -> None:
    attrs = {"Modality": "CT", "SeriesDescription": "Thorax 1.0 B31f", "SliceThickness": 1.0,
             "ImageType": ["ORIGINAL", "PRIMARY", "AXIAL"], "NumberOfInstances": 120}
    assert rule_matches(rule(Modality=["MR", "CT"]), attrs)
    assert rule_matches(rule(SeriesDescription={"regex": "thorax.*"}), attrs)
    assert not rule_matches(rule(SeriesDescription={"regex": "lung"}), attrs)  # fullmatch, not search
    assert rule_matches(rule(SliceThickness={"max": 1.5}, NumberOfInstances={"min": 50}), attrs)
    assert not rule_matches(rule(NumberOfInstances={"min": 200}), attrs)
    assert rule_matches(rule(ImageType="AXIAL"), attrs)
    assert not rule_matches(rule(ImageType="LOCALIZER"), attrs)
    assert isinstance(rule(SliceThickness={"min": 1}).match["SliceThickness"], RangeMatch)
    assert isinstance(rule(SeriesDescription={"regex": "x"}).match["SeriesDescription"], RegexMatch)


def test_numeric_value_does_not_match_text() -> None:
    assert not rule_matches(rule(SliceThickness=1), {"SliceThickness": "thin"})


def test_plan_jobs_merges_destinations_per_series_and_model() -> None:
    rules = [
        Rule.model_validate({"name": "a", "match": {"Modality": "CT"}, "models": ["seg"], "send_to": ["p1"]}),
        Rule.model_validate({"name": "b", "match": {"Modality": "CT"}, "models": ["seg", "det"],
                             "send_to": ["p2"]}),
        Rule.model_validate({"name": "c", "match": {"Modality": "MR"}, "models": ["mr"], "send_to": ["p1"]}),
    ]
    jobs = plan_jobs(rules, [(1, {"Modality": "CT"}), (2, {"Modality": "SR"})])
    by_model = {j.model: j for j in jobs}
    assert set(by_model) == {"seg", "det"}
    assert by_model["seg"].destinations == ("p1", "p2") and by_model["seg"].rule == "a"
    assert all(j.series_id == 1 for j in jobs)
    assert plan_jobs(rules, [(3, {"Modality": "US"})]) == []
