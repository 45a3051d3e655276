"""Routing MR series by sequence (ScanningSequence, SequenceVariant, EchoTime/RepetitionTime ranges,
SeriesDescription regex) and radiographs by ViewPosition, from the attributes the receiver records."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest
from pydantic import ValidationError

from node.config import Rule
from node.receive.scp import series_attributes
from node.route import plan_jobs, rule_matches
from testkit.cxr_phantom import make_cxr_phantom, write_cxr
from testkit.mr_phantom import make_mr_phantom, write_mr_series


def rule(models: list[str], **match: object) -> Rule:
    return Rule.model_validate({"name": "r", "match": match, "models": models, "send_to": []})


@pytest.fixture(scope="module")
def mr_attributes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, object]]:
    out: dict[str, dict[str, object]] = {}
    for weighting in ("T1", "T2"):
        phantom = make_mr_phantom(weighting, shape=(10, 32, 32), seed=1)
        paths = write_mr_series(phantom, tmp_path_factory.mktemp(weighting))
        out[weighting] = series_attributes(pydicom.dcmread(paths[0], stop_before_pixels=True), "MR_ROOM ")
    return out


def test_receiver_records_the_sequence_attributes(mr_attributes: dict[str, dict[str, object]]) -> None:
    t1 = mr_attributes["T1"]
    assert t1["ScanningSequence"] == ["SE"] and t1["SequenceVariant"] == ["NONE"]
    assert t1["EchoTime"] == 12.0 and t1["RepetitionTime"] == 500.0 and t1["MagneticFieldStrength"] == 1.5
    assert t1["SeriesDescription"] == "AX T1 SE" and t1["CallingAETitle"] == "MR_ROOM"


def test_t1_and_t2_rules_select_their_series(mr_attributes: dict[str, dict[str, object]]) -> None:
    t1_rule = rule(["mr-brain-segmentation"], Modality="MR", SeriesDescription={"regex": r".*\bT1\b.*"},
                   ScanningSequence=["SE", "GR"], EchoTime={"max": 30}, RepetitionTime={"max": 1000})
    t2_rule = rule(["mr-brain-segmentation"], Modality="MR", ScanningSequence="SE", EchoTime={"min": 80})
    assert rule_matches(t1_rule, mr_attributes["T1"]) and not rule_matches(t1_rule, mr_attributes["T2"])
    assert rule_matches(t2_rule, mr_attributes["T2"]) and not rule_matches(t2_rule, mr_attributes["T1"])
    assert not rule_matches(rule(["m"], ScanningSequence="IR"), mr_attributes["T1"])
    assert rule_matches(rule(["m"], MagneticFieldStrength={"min": 1.4, "max": 1.6}), mr_attributes["T2"])
    jobs = plan_jobs([t1_rule], [(1, mr_attributes["T1"]), (2, mr_attributes["T2"])])
    assert [(j.series_id, j.model) for j in jobs] == [(1, "mr-brain-segmentation")]


def test_multivalued_scanning_sequence_matches_any_value() -> None:
    attrs = {"Modality": "MR", "ScanningSequence": ["SE", "IR"], "SequenceVariant": ["SK", "SP", "MP"]}
    assert rule_matches(rule(["m"], ScanningSequence="IR", SequenceVariant="MP"), attrs)
    assert not rule_matches(rule(["m"], ScanningSequence="EP"), attrs)


def test_radiograph_view_position(tmp_path: Path) -> None:
    path = write_cxr(make_cxr_phantom(size=300, pixel_mm=1.3, seed=2), tmp_path / "cxr.dcm", view_position="AP")
    attrs = series_attributes(pydicom.dcmread(path, stop_before_pixels=True), "DX_ROOM")
    assert attrs["ViewPosition"] == "AP" and attrs["Modality"] == "DX"
    assert rule_matches(rule(["cxr-lung-fields"], Modality=["CR", "DX"], ViewPosition=["PA", "AP"]), attrs)
    assert not rule_matches(rule(["cxr-lung-fields"], ViewPosition="PA"), attrs)


def test_unknown_attribute_is_still_refused() -> None:
    with pytest.raises(ValidationError, match="cannot match on"):
        rule(["m"], InversionTime={"min": 100})
