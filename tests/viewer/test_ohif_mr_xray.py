"""OHIF shows the MR and chest radiograph SEGs: the node's results for an MR head study (T1 and T2
series; the T1 one analysed) and a DX chest radiograph, opened from Orthanc in OHIF 3.12 (headless
Chromium), with the segment names in the panel and the overlay drawn in colour on the image.
Screenshots ohif-mr-seg.png and ohif-xray-seg.png go to ``$ARTIFACTS_DIR`` (else build/artifacts/).
Uses the fixtures' pieces of tests/e2e/test_mr_xray.py and the viewer helpers of tests/viewer/test_ohif.py.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
import pytest

from testkit.harness import storescu, wait_for
from tests.e2e.test_mr_xray import CXR, MR, inputs, results_of, start_stack
from tests.viewer.test_ohif import Chest, _appears, _check_seg, _hue_fractions, _image, _open_study, _run_viewer

pytestmark = [pytest.mark.e2e, pytest.mark.viewer, pytest.mark.timeout(300)]


@dataclass(frozen=True)
class Studies:
    mr: Chest
    xray: Chest


@pytest.fixture(scope="module")
def studies(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Studies]:
    tmp_path = tmp_path_factory.mktemp("viewer-mr-xray")
    for stack in start_stack(tmp_path):
        push, _, t1_files, _, cxr_file = inputs(tmp_path)
        mr_uid = str(pydicom.dcmread(t1_files[0], stop_before_pixels=True).StudyInstanceUID)
        dx_uid = str(pydicom.dcmread(cxr_file, stop_before_pixels=True).StudyInstanceUID)
        t0 = time.monotonic()
        for port in (stack.orthanc.dicom_port, stack.node_port):  # the PACS holds the images too
            out = storescu(port, push, "-R")
            assert out.returncode == 0, out.stderr
        orthanc = stack.orthanc
        try:
            wait_for(lambda: results_of(orthanc, mr_uid, MR) and results_of(orthanc, dx_uid, CXR),  # noqa: B023
                     180, interval=0.5, what="the MR and DX results in Orthanc")
        except TimeoutError:
            print(stack.logs()[-5000:])
            raise
        seconds = time.monotonic() - t0
        yield Studies(Chest(stack, mr_uid, seconds), Chest(stack, dx_uid, seconds))


def _driver(description: str, names: list[str], screenshot: str) -> Any:
    def drive(page: Any, url: str, out_dir: Path, console: list[str]) -> None:
        viewport = _open_study(page, url)
        skip_tour = page.get_by_text("Skip all", exact=True)  # the guided tour may come late under load
        if _appears(skip_tour, 5):
            skip_tour.click()
        baseline = _hue_fractions(_image(viewport))
        _check_seg(page, viewport, baseline, out_dir, console, screenshot=screenshot, description=description,
                   names=names, colours=2)

    return drive


def test_ohif_shows_the_mr_seg(studies: Studies) -> None:
    _run_viewer(studies.mr, _driver(f"AI SEG {MR}", ["Head", "Brain"], "ohif-mr-seg.png"), "ohif-mr")


def test_ohif_shows_the_xray_seg(studies: Studies) -> None:
    _run_viewer(studies.xray, _driver(f"AI SEG {CXR}", ["Right Lung", "Left Lung"], "ohif-xray-seg.png"),
                "ohif-xray")
