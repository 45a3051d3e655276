"""Fixtures shared by the integration tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from models import registry
from models.base import ModelResult, Segment
from node.schema import BINARY_VARIANT, LABELMAP_VARIANT
from testkit.harness import Orthanc, free_port
from tests.unit.encode_helpers import SCT_ANATOMICAL_STRUCTURE, SCT_BODY, box, load_ct_real_20
from workers.outputs import encode_results


@pytest.fixture(scope="module")
def variant_files(tmp_path_factory: pytest.TempPathFactory) -> dict[Path, str]:
    """LABELMAP SEG + SR and their BINARY stand-ins for two disjoint boxes on the real CT."""
    sources = load_ct_real_20()
    shape = (len(sources), int(sources[0].Rows), int(sources[0].Columns))
    result = ModelResult("ct-lung-nodules", "9.9", (
        Segment("Nodule 1", SCT_ANATOMICAL_STRUCTURE, SCT_BODY, box(shape, (2, 100, 100), (6, 130, 140))),
        Segment("Nodule 2", SCT_ANATOMICAL_STRUCTURE, SCT_BODY, box(shape, (8, 300, 300), (12, 330, 340))),
    ))
    from workers.load import volume_from_datasets

    volume, ordered = volume_from_datasets(sources)
    model = registry.load("ct-lung-nodules")
    encoded = encode_results(model, ordered, volume, result, software_version="test")
    out = tmp_path_factory.mktemp("variants")
    files: dict[Path, str] = {}
    for item in encoded:
        if not item.variant:
            continue  # key images and the PDF go to every destination; not the subject here
        path = out / f"{item.dataset.SOPInstanceUID}.dcm"
        item.dataset.save_as(path, enforce_file_format=True)
        files[path] = item.variant
    assert sorted(files.values()) == [BINARY_VARIANT, BINARY_VARIANT, LABELMAP_VARIANT, LABELMAP_VARIANT]
    return files


@pytest.fixture
def orthanc(tmp_path: Path) -> Iterator[Orthanc]:
    """A private Orthanc (DICOM and DICOMweb) for one test."""
    o = Orthanc(tmp_path, node_port=free_port()).start()
    yield o
    o.stop()
