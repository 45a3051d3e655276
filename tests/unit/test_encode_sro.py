"""Spatial Registration encoder: round trip through bytes, direction of the matrix, references, UIDs, dciodvfy."""

from __future__ import annotations

import copy
import dataclasses
import time
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pydicom
import pytest

from models.base import ModelResult, Registration, Volume
from models.ct_registration import CtRegistration
from testkit.dicom import write_ct_series
from testkit.phantom import make_ct_phantom
from tests.unit.encode_helpers import load_ct_real_20, read_bytes, run_dciodvfy, write_bytes
from workers.encode.series import series_description, series_number
from workers.encode.sro import (
    CONTENT_LABEL,
    SPATIAL_REGISTRATION_STORAGE,
    build_spatial_registration,
    matrix_type,
    prior_to_current_matrix,
)
from workers.encode.uids import input_fingerprint, result_uids
from workers.load import load_series

SOFTWARE_VERSION = "0.1.0-test"
MODEL, VERSION = "test-registration", "1.0.0"
SHIFT = (5.0, -4.0, 6.0)  # z: two 3 mm slices
ANGLE = 4.0
Series = tuple[Volume, list[pydicom.Dataset]]


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Series, Series]:
    """Small current and prior phantom series (other study, other Frame of Reference), loaded as the worker does."""
    root = tmp_path_factory.mktemp("sro")
    small = {"n_slices": 40, "rows": 96, "cols": 96, "pixel_mm": 2.5, "slice_mm": 3.0, "seed": 141, "nodules": 0}
    current = make_ct_phantom(**small)  # type: ignore[arg-type]
    prior = make_ct_phantom(**small, shift_mm=SHIFT, rotation_deg=ANGLE, noise_seed=9141)  # type: ignore[arg-type]
    cur = load_series(write_ct_series(current, root / "current", study_uid="2.25.1001", uid_seed="c"))
    pri = load_series(write_ct_series(prior, root / "prior", study_uid="2.25.1002", uid_seed="p"))
    return cur, pri


def rotation(axis: tuple[float, float, float], degrees: float) -> npt.NDArray[np.float64]:
    """3x3 rotation about ``axis`` (Rodrigues)."""
    k = np.asarray(axis, dtype=np.float64) / np.linalg.norm(axis)
    kx = np.array([[0.0, -k[2], k[1]], [k[2], 0.0, -k[0]], [-k[1], k[0], 0.0]])
    a = np.deg2rad(degrees)
    return np.eye(3) + np.sin(a) * kx + (1.0 - np.cos(a)) * kx @ kx


def homogeneous(a: npt.NDArray[np.float64], t: tuple[float, float, float]) -> npt.NDArray[np.float64]:
    out = np.eye(4)
    out[:3, :3] = a
    out[:3, 3] = t
    return out


RIGID_T = homogeneous(rotation((1.0, 2.0, 3.0), 7.0), (12.5, -30.25, 7.0))
AFFINE_T = homogeneous(rotation((0.0, 0.0, 1.0), 3.0) @ np.diag([1.08, 1.08, 0.97]) + [[0, 0.02, 0], [0] * 3, [0] * 3],
                       (-4.0, 2.0, 9.5))


def result_with(transform: npt.NDArray[np.float64], prior: Series, prior_frame: str | None = None) -> ModelResult:
    """A result with a constructed registration (prior frame: the prior series' unless given)."""
    frame = prior[0].frame_of_reference_uid if prior_frame is None else prior_frame
    reg = Registration(transform=transform, residual_mm=0.8, metric_value=-0.6,
                       resampled=np.zeros((1, 1, 1), dtype=np.float32), prior_frame_of_reference_uid=frame)
    return ModelResult(model_name=MODEL, model_version=VERSION, registration=reg)


def encode(current: Series, prior: Series, result: ModelResult) -> pydicom.Dataset:
    """Build, write to Part 10 bytes and read back."""
    ds = build_spatial_registration(current[1], prior[1], result, software_version=SOFTWARE_VERSION)
    return read_bytes(write_bytes(ds))


def item_for(ds: pydicom.Dataset, frame: str) -> pydicom.Dataset:
    items = [i for i in ds.RegistrationSequence if i.FrameOfReferenceUID == frame]
    assert len(items) == 1, f"one Registration Sequence item for {frame}"
    return items[0]


def matrix_of(item: pydicom.Dataset) -> tuple[npt.NDArray[np.float64], str]:
    """The item's single matrix (row-major) and its type."""
    (registration,) = item.MatrixRegistrationSequence
    (m,) = registration.MatrixSequence
    values = np.array([float(v) for v in m.FrameOfReferenceTransformationMatrix], dtype=np.float64)
    return values.reshape(4, 4), str(m.FrameOfReferenceTransformationMatrixType)


def apply(m: npt.NDArray[np.float64], pts: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    return pts @ m[:3, :3].T + m[:3, 3]


def grid_points(volume: Volume) -> npt.NDArray[np.float64]:
    """LPS centres of a coarse voxel grid spanning ``volume`` (corners included)."""
    n, rows, cols = volume.voxels.shape
    i, j, k = np.meshgrid(np.linspace(0, cols - 1, 5), np.linspace(0, rows - 1, 5), np.linspace(0, n - 1, 5))
    return volume.to_patient(np.stack([i.ravel(), j.ravel(), k.ravel()], axis=1))


@pytest.mark.parametrize(("transform", "expected_type"), [(RIGID_T, "RIGID"), (AFFINE_T, "AFFINE")])
def test_matrix_maps_prior_into_current(
    pair: tuple[Series, Series], transform: npt.NDArray[np.float64], expected_type: str
) -> None:
    current, prior = pair
    ds = encode(current, prior, result_with(transform, prior))
    m, kind = matrix_of(item_for(ds, prior[0].frame_of_reference_uid))
    assert kind == expected_type
    assert np.abs(m @ transform - np.eye(4)).max() <= 1e-6
    assert m[3].tolist() == [0.0, 0.0, 0.0, 1.0]
    # Prior points go where the registration says they are in the current frame: T @ (M @ p) = p.
    p_prior = grid_points(prior[0])
    p_current = apply(m, p_prior)
    assert np.abs(apply(transform, p_current) - p_prior).max() <= 1e-6
    # The registered frame (this object's) is the current one, with an identity item.
    assert ds.FrameOfReferenceUID == current[0].frame_of_reference_uid
    identity, identity_type = matrix_of(item_for(ds, current[0].frame_of_reference_uid))
    assert identity_type == "RIGID" and np.array_equal(identity, np.eye(4))
    assert [i.FrameOfReferenceUID for i in ds.RegistrationSequence] == [
        current[0].frame_of_reference_uid, prior[0].frame_of_reference_uid]


def test_attributes(pair: tuple[Series, Series]) -> None:
    current, prior = pair
    ds = encode(current, prior, result_with(RIGID_T, prior))
    src = current[1][0]
    assert ds.SOPClassUID == SPATIAL_REGISTRATION_STORAGE == ds.file_meta.MediaStorageSOPClassUID
    assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    assert ds.Modality == "REG"
    assert (ds.SeriesNumber, ds.SeriesDescription) == (series_number("SRO"), series_description("SRO", MODEL))
    for keyword in ("PatientName", "PatientID", "StudyInstanceUID", "StudyID", "AccessionNumber", "StudyDate"):
        assert ds[keyword].value == src[keyword].value, keyword
    assert (ds.Manufacturer, ds.ManufacturerModelName, ds.SoftwareVersions) == (
        "dicom-ai-node", MODEL, SOFTWARE_VERSION)
    assert (ds.InstanceNumber, ds.ContentLabel) == (1, CONTENT_LABEL)
    assert ds.ContentDate and ds.ContentTime
    assert ds.BodyPartExamined == "CHEST" and "Laterality" not in ds
    prior_item = item_for(ds, prior[0].frame_of_reference_uid).MatrixRegistrationSequence[0]
    assert prior_item.FrameOfReferenceTransformationComment == f"{MODEL} {VERSION}, residual 0.80 mm"
    code = prior_item.RegistrationTypeCodeSequence[0]
    assert (code.CodeValue, code.CodingSchemeDesignator) == ("125024", "DCM")
    code = item_for(ds, current[0].frame_of_reference_uid).MatrixRegistrationSequence[0].RegistrationTypeCodeSequence[0]
    assert (code.CodeValue, code.CodingSchemeDesignator) == ("125021", "DCM")


def _references(seq: pydicom.Sequence) -> list[tuple[str, str]]:
    return [(str(r.ReferencedSOPClassUID), str(r.ReferencedSOPInstanceUID)) for r in seq]


def test_references_complete(pair: tuple[Series, Series]) -> None:
    current, prior = pair
    ds = encode(current, prior, result_with(RIGID_T, prior))
    expected = {role: [(str(d.SOPClassUID), str(d.SOPInstanceUID)) for d in s[1]] for role, s in
                (("current", current), ("prior", prior))}
    assert len(expected["current"]) == len(expected["prior"]) == 40
    for role, series in (("current", current), ("prior", prior)):
        item = item_for(ds, series[0].frame_of_reference_uid)
        assert _references(item.ReferencedImageSequence) == expected[role]
    # Common Instance Reference: the current series in this study, the prior one in its own study.
    (this_series,) = ds.ReferencedSeriesSequence
    assert this_series.SeriesInstanceUID == current[1][0].SeriesInstanceUID
    assert _references(this_series.ReferencedInstanceSequence) == expected["current"]
    (other,) = ds.StudiesContainingOtherReferencedInstancesSequence
    assert other.StudyInstanceUID == prior[1][0].StudyInstanceUID != ds.StudyInstanceUID
    (prior_series,) = other.ReferencedSeriesSequence
    assert prior_series.SeriesInstanceUID == prior[1][0].SeriesInstanceUID
    assert _references(prior_series.ReferencedInstanceSequence) == expected["prior"]


def test_prior_in_the_same_study(pair: tuple[Series, Series]) -> None:
    current, prior = pair
    same_study = [copy.deepcopy(d) for d in prior[1]]
    for d in same_study:
        d.StudyInstanceUID = current[1][0].StudyInstanceUID
    ds = encode(current, (prior[0], same_study), result_with(RIGID_T, prior))
    assert [s.SeriesInstanceUID for s in ds.ReferencedSeriesSequence] == [
        current[1][0].SeriesInstanceUID, prior[1][0].SeriesInstanceUID]
    assert "StudiesContainingOtherReferencedInstancesSequence" not in ds


def test_uids_deterministic(pair: tuple[Series, Series]) -> None:
    current, prior = pair
    result = result_with(RIGID_T, prior)
    a = build_spatial_registration(current[1], prior[1], result, software_version=SOFTWARE_VERSION)
    b = build_spatial_registration(current[1], prior[1], result, software_version=SOFTWARE_VERSION)
    expected = result_uids(
        str(current[1][0].SeriesInstanceUID), MODEL, VERSION, "SRO",
        input_fingerprint(str(d.SOPInstanceUID) for d in (*current[1], *prior[1])),
    )
    assert (a.SeriesInstanceUID, a.SOPInstanceUID) == (b.SeriesInstanceUID, b.SOPInstanceUID)
    assert (a.SeriesInstanceUID, a.SOPInstanceUID) == (expected.series_uid, expected.sop_instance_uid)
    # Another prior input (one slice fewer): a new instance in the same series; another version: a new series.
    fewer = build_spatial_registration(current[1], prior[1][:-1], result, software_version=SOFTWARE_VERSION)
    assert fewer.SeriesInstanceUID == a.SeriesInstanceUID and fewer.SOPInstanceUID != a.SOPInstanceUID
    newer = build_spatial_registration(current[1], prior[1], dataclasses.replace(result, model_version="1.1.0"),
                                       software_version=SOFTWARE_VERSION)
    assert newer.SeriesInstanceUID != a.SeriesInstanceUID


@pytest.mark.parametrize(
    ("a", "expected"),
    [
        (np.eye(3), "RIGID"),
        (rotation((0.3, -1.0, 0.2), 33.0), "RIGID"),
        (rotation((0.0, 0.0, 1.0), 10.0) * (1.0 + 2e-5), "RIGID"),  # within the tolerance
        (rotation((0.0, 0.0, 1.0), 10.0) * 1.001, "AFFINE"),  # uniform scaling
        (np.diag([1.0, 1.0, -1.0]), "AFFINE"),  # orthonormal but a reflection, not a rotation
        (np.array([[1.0, 0.01, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]), "AFFINE"),  # shear
    ],
)
def test_matrix_type(a: npt.NDArray[np.float64], expected: str) -> None:
    assert matrix_type(homogeneous(a, (1.0, 2.0, 3.0))) == expected


@pytest.mark.parametrize(
    ("transform", "message"),
    [
        (np.full((4, 4), np.nan), "non-finite"),
        (np.vstack([np.eye(4)[:3], [0.0, 0.0, 0.1, 1.0]]), "not affine"),
        (np.diag([1.0, 1.0, 0.0, 1.0]), "singular"),
    ],
)
def test_bad_transforms(pair: tuple[Series, Series], transform: npt.NDArray[np.float64], message: str) -> None:
    current, prior = pair
    with pytest.raises(ValueError, match=message):
        build_spatial_registration(current[1], prior[1], result_with(transform, prior), software_version="x")
    with pytest.raises(ValueError, match=message):
        prior_to_current_matrix(transform)


def _with(datasets: list[pydicom.Dataset], index: int, **attributes: object) -> list[pydicom.Dataset]:
    """A copy of ``datasets`` where ``datasets[index]`` has ``attributes`` (None: deleted)."""
    out = list(datasets)
    out[index] = copy.deepcopy(datasets[index])
    for keyword, value in attributes.items():
        if value is None:
            delattr(out[index], keyword)
        else:
            setattr(out[index], keyword, value)
    return out


def test_invalid_inputs(pair: tuple[Series, Series]) -> None:
    (cvol, cur), (pvol, pri) = pair
    ok = result_with(RIGID_T, (pvol, pri))

    def fails(message: str, current: list[pydicom.Dataset] = cur, prior: list[pydicom.Dataset] = pri,
              result: ModelResult = ok) -> None:
        with pytest.raises(ValueError, match=message):
            build_spatial_registration(current, prior, result, software_version="x")

    fails("no registration", result=ModelResult(MODEL, VERSION))
    fails("no prior Frame of Reference", result=result_with(RIGID_T, (pvol, pri), prior_frame=""))
    fails("is not the prior images'", result=result_with(RIGID_T, (pvol, pri), prior_frame="1.2.3"))
    fails("share one Frame of Reference",
          prior=[_with([d], 0, FrameOfReferenceUID=cvol.frame_of_reference_uid)[0] for d in pri],
          result=result_with(RIGID_T, (pvol, pri), prior_frame=cvol.frame_of_reference_uid))
    fails("prior images without FrameOfReferenceUID", prior=_with(pri, 3, FrameOfReferenceUID=None))
    fails("current images have 2 different SeriesInstanceUID", current=_with(cur, 5, SeriesInstanceUID="1.2.3"))
    fails("current images have 2 different FrameOfReferenceUID", current=_with(cur, 0, FrameOfReferenceUID="1.2.4"))
    fails("no current images", current=[])
    fails("duplicate SOP Instance UIDs among the prior", prior=[*pri, pri[0]])
    fails("in both the current and the prior", prior=_with(pri, 0, SOPInstanceUID=cur[0].SOPInstanceUID))
    fails("another patient", prior=_with(pri, 0, PatientID="SOMEONE-ELSE"))


def test_dciodvfy_no_errors(pair: tuple[Series, Series], tmp_path: Path) -> None:
    current, prior = pair
    for name, transform in (("rigid", RIGID_T), ("affine", AFFINE_T)):
        ds = build_spatial_registration(current[1], prior[1], result_with(transform, prior),
                                        software_version=SOFTWARE_VERSION)
        errors, warnings = run_dciodvfy(write_bytes(ds), tmp_path, f"sro-{name}.dcm")
        assert errors == [] and warnings == []


def test_dciodvfy_real_ct(tmp_path: Path) -> None:
    """The real CT (Body Part Examined PARTIALBODY, no Laterality) against a copy of itself as prior."""
    current = load_ct_real_20()
    prior = []
    for d in current:
        p = copy.deepcopy(d)
        p.StudyInstanceUID, p.SeriesInstanceUID = "2.25.77", "2.25.78"
        p.SOPInstanceUID = p.SOPInstanceUID + ".1"
        p.FrameOfReferenceUID = "2.25.79"
        prior.append(p)
    reg = Registration(transform=RIGID_T, residual_mm=1.0, metric_value=-0.5,
                       resampled=np.zeros((1, 1, 1), dtype=np.float32), prior_frame_of_reference_uid="2.25.79")
    ds = build_spatial_registration(current, prior, ModelResult(MODEL, VERSION, registration=reg),
                                    software_version=SOFTWARE_VERSION)
    assert "Laterality" in ds and not ds.Laterality  # body part not known to be unpaired: empty (unknown)
    errors, warnings = run_dciodvfy(write_bytes(ds), tmp_path, "sro-real.dcm")
    assert errors == []
    # Both come from the source's Body Part Examined: a non-standard term, hence laterality unknown.
    assert len(warnings) == 2
    assert any("Unrecognized defined term = <PARTIALBODY>" in w for w in warnings)
    assert any("Laterality" in w and "only permitted to be empty when actually unknown" in w for w in warnings)


def test_real_registration(pair: tuple[Series, Series], tmp_path: Path) -> None:
    """ct-registration on the phantom pair: the stored matrix takes prior points to their current positions."""
    current, prior = pair
    t0 = time.perf_counter()
    result = CtRegistration().run_pair(current[0], prior[0])
    seconds = time.perf_counter() - t0
    assert result.registration is not None
    ds = encode(current, prior, result)
    m, kind = matrix_of(item_for(ds, prior[0].frame_of_reference_uid))
    assert kind == matrix_type(prior_to_current_matrix(result.registration.transform))
    assert np.abs(m @ result.registration.transform - np.eye(4)).max() <= 1e-6
    # Known motion: the prior's anatomy is the current's rotated by ANGLE about z, then shifted by SHIFT.
    c, s = np.cos(np.deg2rad(ANGLE)), np.sin(np.deg2rad(ANGLE))
    truth = homogeneous(np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]]), SHIFT)  # current -> prior
    body = np.argwhere(current[0].voxels[::4, ::8, ::8] > -500) * np.array([4, 8, 8])
    p_current = current[0].to_patient(body[:, ::-1].astype(np.float64))
    errors = np.linalg.norm(apply(m, apply(truth, p_current)) - p_current, axis=1)
    print(f"{kind}; prior -> current error mean {errors.mean():.2f} mm, max {errors.max():.2f} mm; {seconds:.1f} s; "
          f"residual {result.registration.residual_mm:.2f} mm")
    assert errors.mean() <= 2.0 and errors.max() <= 3.0
    dciodvfy_errors, _ = run_dciodvfy(write_bytes(ds), tmp_path, "sro-model.dcm")
    assert dciodvfy_errors == []
