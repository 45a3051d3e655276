"""WADO-RS payloads (node.dicomweb.payload): Accept negotiation, frames and rendering of small files."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from models.errors import InputError
from node.dicomweb.payload import (
    NotAcceptable,
    Window,
    choose_transfer_syntax,
    frame_bytes,
    multipart,
    number_of_frames,
    parse_accept,
    parse_viewport,
    parse_window,
    render,
    voi,
)
from tests.dsfactory import ct_slice

J2K, EXPLICIT, IMPLICIT = "1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2"


def test_parse_accept() -> None:
    [a, b] = parse_accept([f'multipart/related; type="application/dicom"; transfer-syntax={EXPLICIT}, */*;q=0.5'])
    assert a.media_type == "multipart/related" and a.params == {"type": "application/dicom",
                                                                "transfer-syntax": EXPLICIT}
    assert b.media_type == "*/*"
    assert parse_accept(["image/png;q=0, image/jpeg"])[0].media_type == "image/jpeg"


@pytest.mark.parametrize("accept, stored, chosen", [
    ([], J2K, J2K),
    (['multipart/related; type="application/dicom"'], J2K, J2K),
    (['multipart/related; type="application/dicom"; transfer-syntax=*'], J2K, J2K),
    ([f'multipart/related; type="application/dicom"; transfer-syntax={J2K}'], J2K, J2K),
    ([f'multipart/related; type="application/dicom"; transfer-syntax={EXPLICIT}'], J2K, EXPLICIT),
    ([f'multipart/related; type="application/dicom"; transfer-syntax={IMPLICIT}'], EXPLICIT, IMPLICIT),
    ([f"application/dicom; transfer-syntax={EXPLICIT}", f"application/dicom; transfer-syntax={J2K}"], J2K, J2K),
    (["*/*"], J2K, J2K),
])
def test_transfer_syntax_negotiation(accept: list[str], stored: str, chosen: str) -> None:
    assert choose_transfer_syntax(parse_accept(accept), stored) == chosen


@pytest.mark.parametrize("accept", [
    'multipart/related; type="application/dicom"; transfer-syntax=1.2.840.10008.1.2.4.50',
    "application/json",
])
def test_transfer_syntax_not_acceptable(accept: str) -> None:
    with pytest.raises(NotAcceptable):
        choose_transfer_syntax(parse_accept([accept]), J2K)


def test_multipart_body() -> None:
    body = b"".join(multipart([("application/dicom", lambda: [b"AB", b"C"]), ("application/dicom", lambda: [b""])],
                              "XX"))
    assert body == (b"--XX\r\nContent-Type: application/dicom\r\n\r\nABC\r\n"
                    b"--XX\r\nContent-Type: application/dicom\r\n\r\n\r\n--XX--\r\n")


def test_window_and_viewport_parameters() -> None:
    assert parse_window("40,400") == Window(40.0, 400.0, "LINEAR")
    assert parse_window("40,400,linear-exact") == Window(40.0, 400.0, "LINEAR_EXACT")
    assert parse_viewport("256,128") == (256, 128) and parse_window(None) is None
    for bad in ("40", "a,b", "40,0", "40,400,cubic"):
        with pytest.raises(InputError):
            parse_window(bad)
    with pytest.raises(InputError):
        parse_viewport("0,10")


def test_linear_voi_function() -> None:
    out = voi(np.array([-1000.0, -161.0, 40.0, 240.0, 3000.0]), Window(40.0, 400.0))
    assert out[0] == 0 and out[-1] == 255 and out[1] == 0 and 126 <= out[2] <= 129 and out[3] == 255


def _image(tmp_path: Path, photometric: str = "MONOCHROME2", frames: int = 1) -> Path:
    ds = ct_slice("1.2.3", "1.2.3.1", "1.2.3.1.1", rows=4, cols=8)
    ds.PhotometricInterpretation = photometric
    pixels = np.arange(frames * 32, dtype=np.int16).reshape(frames, 4, 8)
    ds.PixelData = pixels.tobytes()
    if frames > 1:
        ds.NumberOfFrames = frames
    ds.RescaleSlope, ds.RescaleIntercept = 2, -10
    path = tmp_path / "i.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def _grey(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)))


def test_rendered_min_max_window_and_monochrome1(tmp_path: Path) -> None:
    mono2 = _grey(render(_image(tmp_path), 1, "image/png", EXPLICIT))
    assert mono2.shape == (4, 8) and mono2[0, 0] == 0 and mono2[-1, -1] == 255
    assert np.all(np.diff(mono2.ravel().astype(int)) >= 0)  # rescale keeps the order
    mono1 = _grey(render(_image(tmp_path, "MONOCHROME1"), 1, "image/png", EXPLICIT))
    assert np.array_equal(mono1, 255 - mono2)
    # rescaled values are 2 * p - 10: a window at 20 (p = 15) of width 1 thresholds there
    step = _grey(render(_image(tmp_path), 1, "image/png", EXPLICIT, window=Window(20.5, 1.0)))
    assert set(np.unique(step)) == {0, 255} and step.ravel()[15] == 0 and step.ravel()[16] == 255
    fitted = Image.open(io.BytesIO(render(_image(tmp_path), 1, "image/jpeg", EXPLICIT, viewport=(4, 4))))
    assert fitted.format == "JPEG" and fitted.size == (4, 2)


def test_frames_of_a_multi_frame_image(tmp_path: Path) -> None:
    path = _image(tmp_path, frames=3)
    assert number_of_frames(path) == 3
    second = np.frombuffer(frame_bytes(path, 2, EXPLICIT), dtype="<i2").reshape(4, 8)
    assert np.array_equal(second, np.arange(32, 64).reshape(4, 8))
    assert _grey(render(path, 3, "image/png", EXPLICIT)).shape == (4, 8)
