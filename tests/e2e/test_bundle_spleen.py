"""End to end with a real MONAI model-zoo bundle run unchanged: storescu -> dicom-node -> worker -> Orthanc.

``tests/data/bundles/spleen_ct_segmentation`` holds the model zoo's spleen configs as published. The
test gives the bundle randomly initialised weights of its own ``network_def`` (built through the safe
resolver, saved as ``models/model.pt``), defines the site model ``spleen-ct`` in the configuration
(labels from the bundle's channel_def, coded from the shipped SNOMED CT table), and pushes a small
oblique-free but flipped CT phantom. The worker runs the bundle's Orientation/Spacing/
ScaleIntensityRange, its SlidingWindowInferer (roi 96^3) and its postprocessing with Invertd back
to the source grid. The output is noise; what is checked is the SEG's geometry (frame of reference,
one frame per source slice at that slice's position), its segment label and codes, and dciodvfy.
"""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest

pytest.importorskip("torch")
pytest.importorskip("monai")

from testkit.dicom import write_ct_series
from testkit.harness import (
    Orthanc,
    dciodvfy,
    free_port,
    node_config,
    start_node_process,
    stop_process,
    storescu,
    wait_for,
)
from testkit.phantom import make_ct_phantom
from workers.encode.series import series_description

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

ROOT = Path(__file__).resolve().parents[2]
SPLEEN = ROOT / "tests" / "data" / "bundles" / "spleen_ct_segmentation"
MODEL = "spleen-ct"


def bundle_with_random_weights(dest: Path) -> Path:
    """A copy of the spleen bundle with random weights of its network_def in models/model.pt."""
    import torch

    from models.bundle import BundleConfig

    shutil.copytree(SPLEEN, dest)
    torch.manual_seed(13)
    network = BundleConfig.read(dest).network()
    (dest / "models").mkdir(exist_ok=True)
    torch.save(network.state_dict(), dest / "models" / "model.pt")
    return dest


def test_spleen_bundle_runs_unchanged_and_its_seg_reaches_the_pacs(tmp_path: Path) -> None:
    bundle = bundle_with_random_weights(tmp_path / "site-bundles" / "spleen_ct_segmentation")
    # 16 slices of 64 x 64 at 3 x 3 x 4 mm: 128 x 128 x 32 voxels on the bundle's 1.5/1.5/2 mm grid
    phantom = make_ct_phantom(n_slices=16, rows=64, cols=64, pixel_mm=3.0, slice_mm=4.0, seed=7, nodules=0)
    files = write_ct_series(phantom, tmp_path / "ct", uid_seed="spleen-e2e", flip_cols=True, reverse_slices=True,
                            series_description="Abdomen CT")
    sources = {str(d.SOPInstanceUID): d for d in (pydicom.dcmread(f) for f in files)}
    study_uid = str(next(iter(sources.values())).StudyInstanceUID)

    node_port = free_port()
    orthanc = Orthanc(tmp_path, node_port=node_port).start()
    proc = None
    try:
        cfg = node_config(tmp_path, node_port=node_port, orthanc=orthanc, models=(MODEL,), overrides={
            "models": {MODEL: {"family": "segmentation", "bundle": str(bundle), "modality": "CT", "device": "cpu"}},
        })
        proc = start_node_process(cfg, "run", "node.log", port=node_port)
        assert storescu(node_port, tmp_path / "ct").returncode == 0
        wanted = {series_description("SEG", MODEL), series_description("SR", MODEL)}

        def arrived() -> dict[str, list[str]] | None:
            found = {str(s["MainDicomTags"].get("SeriesDescription", "")): list(s["Instances"])
                     for s in orthanc.series_of_study(study_uid)}
            return found if wanted <= set(found) else None

        try:
            found = wait_for(arrived, 180, interval=0.5, what="the spleen SEG and SR in Orthanc")
        except TimeoutError:
            print((tmp_path / "node.log").read_text(errors="replace")[-6000:])
            raise
        seg_bytes = orthanc.get_bytes(f"/instances/{found[series_description('SEG', MODEL)][0]}/file")
        sr_bytes = orthanc.get_bytes(f"/instances/{found[series_description('SR', MODEL)][0]}/file")
        log = (tmp_path / "node.log").read_text(errors="replace")
    finally:
        if proc is not None:
            stop_process(proc)
        orthanc.stop()

    assert f"model {MODEL} " in log and str(bundle) in log
    for name, data in (("seg.dcm", seg_bytes), ("sr.dcm", sr_bytes)):
        (tmp_path / name).write_bytes(data)
        errors, _ = dciodvfy(tmp_path / name)
        assert errors == [], (name, errors)

    seg = hd.seg.Segmentation.from_dataset(pydicom.dcmread(io.BytesIO(seg_bytes)))
    first = next(iter(sources.values()))
    assert seg.FrameOfReferenceUID == first.FrameOfReferenceUID
    assert (seg.Rows, seg.Columns) == (first.Rows, first.Columns)
    # labels and codes from metadata.json's channel_def and the SNOMED CT table
    [number] = seg.get_segment_numbers()
    desc = seg.get_segment_description(number)
    assert desc.segment_label == "Spleen"
    assert (desc.segmented_property_type.value, desc.segmented_property_type.scheme_designator) == ("78961009", "SCT")
    assert desc.segmented_property_category.value == "123037004"
    # every frame lies on a source slice, at that slice's position and orientation (Invertd: source grid)
    for frame in seg.PerFrameFunctionalGroupsSequence:
        ref = frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        src = sources[str(ref)]
        ipp = np.asarray(frame.PlanePositionSequence[0].ImagePositionPatient, dtype=float)
        assert np.allclose(ipp, np.asarray(src.ImagePositionPatient, dtype=float), atol=1e-3)
    iop = seg.SharedFunctionalGroupsSequence[0].PlaneOrientationSequence[0].ImageOrientationPatient
    assert np.allclose(np.asarray(iop, dtype=float), np.asarray(first.ImageOrientationPatient, dtype=float), atol=1e-4)
    pixels = seg.get_pixels_by_source_instance(source_sop_instance_uids=list(sources), segment_numbers=[number],
                                              combine_segments=False, assert_missing_frames_are_empty=True)
    assert pixels.shape == (len(sources), first.Rows, first.Columns, 1)
    fraction = float((pixels > 0).mean())
    print(f"spleen-ct (random weights): {fraction:.1%} of the voxels labelled spleen")
    assert 0.0 < fraction < 1.0
