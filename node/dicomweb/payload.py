"""WADO-RS payloads from spooled files: Accept negotiation, multipart/related bodies, transcoding to an
uncompressed transfer syntax, metadata (DICOM JSON without bulk data), frames, bulk data and
rendered images (PS3.18 8.7, 9.5). Pure functions of a file path; no HTTP, no catalog.
"""

from __future__ import annotations

import io
import math
import re
import secrets
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pydicom
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.pixels import pixel_array
from pydicom.pixels.decoders.base import get_decoder
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from models.errors import InputError, UnreadableInput
from node.dicomweb.attributes import DicomJson

UNCOMPRESSED = (str(ExplicitVRLittleEndian), str(ImplicitVRLittleEndian))
"""The transfer syntaxes a stored object can be transcoded to on request."""
BULK_VRS = frozenset(("OB", "OD", "OF", "OL", "OV", "OW", "UN"))
BULK_THRESHOLD = 1024
"""A binary element larger than this (bytes) is bulk data: a BulkDataURI in metadata."""
PIXEL_DATA = 0x7FE00010
ENCAPSULATED_DOCUMENT = 0x00420011
_CHUNK = 1 << 20


class NotAcceptable(InputError):
    """No representation the client accepts can be produced (HTTP 406)."""


@dataclass(frozen=True)
class MediaRange:
    """One entry of an Accept header: ``type/subtype`` and its parameters (lower-case names)."""

    media_type: str
    params: dict[str, str] = field(default_factory=dict)


def parse_accept(values: Iterable[str]) -> list[MediaRange]:
    """The media ranges of Accept header values (and ``accept`` query parameters), in order; q=0 dropped."""
    out: list[MediaRange] = []
    for value in values:
        for entry in re.findall(r'(?:[^,"]|"[^"]*")+', value):
            parts = [p.strip() for p in re.findall(r'(?:[^;"]|"[^"]*")+', entry)]
            if not parts or not parts[0]:
                continue
            params: dict[str, str] = {}
            for p in parts[1:]:
                name, _, val = p.partition("=")
                params[name.strip().lower()] = val.strip().strip('"')
            if params.get("q", "1").strip() in ("0", "0.0", "0.00", "0.000"):
                continue
            out.append(MediaRange(parts[0].lower(), params))
    return out


def is_compressed(transfer_syntax: str) -> bool:
    """Whether pixel data in this transfer syntax is encapsulated (an unknown one counts as such)."""
    try:
        return bool(UID(transfer_syntax).is_compressed)
    except ValueError:
        return True


def decodable(transfer_syntax: str) -> bool:
    """Whether pixel data in this (compressed) transfer syntax can be decoded here."""
    try:
        return bool(get_decoder(UID(transfer_syntax)).is_available)
    except (NotImplementedError, ValueError):
        return False


def choose_transfer_syntax(accept: list[MediaRange], stored: str) -> str:
    """The transfer syntax to send an instance stored in ``stored`` in: as stored when the client
    takes any (no Accept, ``*/*``, no or ``*`` transfer-syntax), or names ``stored``; else an
    uncompressed one it names (transcoded); else :class:`NotAcceptable`."""
    if not accept:
        return stored
    named: list[str] = []
    for mr in accept:
        if mr.media_type in ("*/*", "multipart/*"):
            return stored
        if mr.media_type == "multipart/related":
            inner = mr.params.get("type", "application/dicom").lower()
            if inner in ("*/*", "application/*"):
                return stored
            if inner != "application/dicom":
                continue
        elif mr.media_type != "application/dicom":
            continue
        ts = mr.params.get("transfer-syntax", "*")
        if ts == "*" or ts == stored:
            return stored
        named.append(ts)
    for ts in named:
        if ts in UNCOMPRESSED and (not is_compressed(stored) or decodable(stored)):
            return ts
    raise NotAcceptable("none of the accepted transfer syntaxes can be produced from the stored one")


def accepts(accept: list[MediaRange], media_type: str, *, multipart: bool) -> bool:
    """Whether ``media_type`` (inside multipart/related when ``multipart``) is acceptable."""
    if not accept:
        return True
    major = media_type.split("/")[0]
    for mr in accept:
        t = mr.media_type
        if multipart and t == "multipart/related":
            t = mr.params.get("type", media_type).lower()
        if t in ("*/*", "multipart/*", media_type, f"{major}/*"):
            return True
    return False


def read_chunks(path: Path) -> Iterator[bytes]:
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            yield chunk


def encode_as(path: Path, transfer_syntax: str) -> bytes:
    """The stored file re-encoded in an uncompressed ``transfer_syntax`` (pixel data decompressed)."""
    try:
        ds = pydicom.dcmread(path)
        if ds.file_meta.TransferSyntaxUID.is_compressed:
            ds.decompress()
        ds.file_meta.TransferSyntaxUID = UID(transfer_syntax)
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
    except (OSError, ValueError, RuntimeError, NotImplementedError, AttributeError) as exc:
        raise UnreadableInput(f"cannot transcode the stored object: {type(exc).__name__}") from exc
    return buf.getvalue()


def new_boundary() -> str:
    return f"dicomnode-{secrets.token_hex(12)}"


def multipart(parts: Iterable[tuple[str, Callable[[], Iterable[bytes]]]], boundary: str) -> Iterator[bytes]:
    """A multipart/related body: each (Content-Type, body producer) one part, produced lazily."""
    for content_type, body in parts:
        yield f"--{boundary}\r\nContent-Type: {content_type}\r\n\r\n".encode()
        yield from body()
        yield b"\r\n"
    yield f"--{boundary}--\r\n".encode()


def multipart_type(inner: str, boundary: str) -> str:
    return f'multipart/related; type="{inner}"; boundary={boundary}'


# ---- metadata -------------------------------------------------------------------------------------
def _strip_nested_bulk(ds: Dataset) -> None:
    """Remove bulk elements inside sequences (only top-level ones get a BulkDataURI)."""
    for elem in ds:
        if elem.VR == "SQ":
            for item in elem.value:
                for inner in list(item):
                    if inner.VR in BULK_VRS and inner.value is not None and len(inner.value) > BULK_THRESHOLD:
                        del item[inner.tag]
                _strip_nested_bulk(item)


def metadata(path: Path, bulk_base: str, transfer_syntax: str) -> DicomJson:
    """The instance as DICOM JSON: top-level bulk data (Pixel Data, an encapsulated document...) as a
    BulkDataURI under ``bulk_base`` (``.../instances/{uid}/bulkdata``), none inline."""
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
    except (OSError, ValueError) as exc:
        raise UnreadableInput(f"cannot read the stored object: {type(exc).__name__}") from exc
    _strip_nested_bulk(ds)
    out: DicomJson = ds.to_json_dict(bulk_data_threshold=BULK_THRESHOLD, suppress_invalid_tags=True,
                                     bulk_data_element_handler=lambda e: f"{bulk_base}/{e.tag:08X}")
    if "Rows" in ds and "BitsAllocated" in ds:
        vr = "OB" if is_compressed(transfer_syntax) or int(ds.BitsAllocated) <= 8 else "OW"
        out[f"{PIXEL_DATA:08X}"] = {"vr": vr, "BulkDataURI": f"{bulk_base}/{PIXEL_DATA:08X}"}
    out["00083002"] = {"vr": "UI", "Value": [transfer_syntax]}  # Available Transfer Syntax UID
    return dict(sorted(out.items()))


def element_bytes(path: Path, tag: int) -> tuple[bytes, str]:
    """The value of a top-level non-pixel bulk element and the document's MIME type (if it is one);
    KeyError when the instance has no such element."""
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    if tag not in ds:
        raise KeyError(tag)
    value = ds[tag].value
    if not isinstance(value, bytes):
        raise KeyError(tag)
    if tag == ENCAPSULATED_DOCUMENT:
        length = int(ds.get("EncapsulatedDocumentLength") or 0)
        if 0 < length <= len(value):
            value = value[:length]  # the even-length padding is not the document's
    return value, str(ds.get("MIMETypeOfEncapsulatedDocument", "") or "")


# ---- frames ---------------------------------------------------------------------------------------
def number_of_frames(path: Path) -> int:
    """Number of Frames of a stored object (1 for a single-frame image, 0 without pixel data)."""
    ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["NumberOfFrames", "Rows"])
    if "Rows" not in ds:
        return 0
    try:
        return max(1, int(ds.get("NumberOfFrames") or 1))
    except (TypeError, ValueError):
        return 1


def frame_bytes(path: Path, frame: int, transfer_syntax: str) -> bytes:
    """Frame ``frame`` (1-based) uncompressed, as Explicit VR Little Endian would hold it."""
    if is_compressed(transfer_syntax) and not decodable(transfer_syntax):
        raise NotAcceptable("the stored transfer syntax cannot be decoded here")
    try:
        ds = Dataset()
        arr = pixel_array(str(path), index=frame - 1, ds_out=ds)
    except (OSError, ValueError, RuntimeError, NotImplementedError, AttributeError, IndexError) as exc:
        raise UnreadableInput(f"cannot decode frame {frame}: {type(exc).__name__}") from exc
    if int(ds.get("BitsAllocated", 8)) == 1:
        return np.packbits(arr.astype(np.uint8).ravel(), bitorder="little").tobytes()
    return np.ascontiguousarray(arr).astype(arr.dtype.newbyteorder("<"), copy=False).tobytes()


def pixel_data_bytes(path: Path, transfer_syntax: str) -> bytes:
    """The whole Pixel Data uncompressed, as Explicit VR Little Endian holds it (bulk data): the
    stored value itself when it is native, else every frame decoded (1-bit frames packed contiguously)."""
    if not is_compressed(transfer_syntax):
        value = pydicom.dcmread(path).get("PixelData")
        if not isinstance(value, bytes):
            raise UnreadableInput("no native Pixel Data")
        return value
    if not decodable(transfer_syntax):
        raise NotAcceptable("the stored transfer syntax cannot be decoded here")
    try:
        ds = Dataset()
        arr = pixel_array(str(path), ds_out=ds)
    except (OSError, ValueError, RuntimeError, NotImplementedError, AttributeError) as exc:
        raise UnreadableInput(f"cannot decode the pixel data: {type(exc).__name__}") from exc
    if int(ds.get("BitsAllocated", 8)) == 1:
        return np.packbits(arr.astype(np.uint8).ravel(), bitorder="little").tobytes()
    return np.ascontiguousarray(arr).astype(arr.dtype.newbyteorder("<"), copy=False).tobytes()


# ---- rendered -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Window:
    center: float
    width: float
    function: str = "LINEAR"


def parse_window(value: str | None) -> Window | None:
    """``window=center,width[,linear|linear-exact|sigmoid]`` (PS3.18 8.3.5.1.4)."""
    if not value:
        return None
    parts = [p.strip() for p in value.split(",")]
    try:
        center, width = float(parts[0]), float(parts[1])
    except (IndexError, ValueError):
        raise InputError("window must be center,width[,function]") from None
    function = (parts[2] if len(parts) > 2 else "linear").upper().replace("-", "_")
    if function not in ("LINEAR", "LINEAR_EXACT", "SIGMOID") or width <= 0:
        raise InputError("window function must be linear, linear-exact or sigmoid, with a positive width")
    return Window(center, width, function)


def parse_viewport(value: str | None) -> tuple[int, int] | None:
    """``viewport=width,height`` (further source-region values are not supported and ignored)."""
    if not value:
        return None
    parts = [p.strip() for p in value.split(",")]
    try:
        w, h = int(parts[0]), int(parts[1])
    except (IndexError, ValueError):
        raise InputError("viewport must be width,height") from None
    if not (0 < w <= 8192 and 0 < h <= 8192):
        raise InputError("viewport width and height must be 1 to 8192")
    return w, h


def _first(value: Any) -> float | None:
    if value is None or value == "":
        return None
    try:
        return float(value[0]) if isinstance(value, list | tuple | pydicom.multival.MultiValue) else float(value)
    except (TypeError, ValueError, IndexError):
        return None


def _frame_value(ds: Dataset, frame: int, sequence: str, keyword: str) -> Any:
    """``keyword`` of the image, else of its per-frame or shared functional group ``sequence``."""
    if keyword in ds:
        return ds.get(keyword)
    for groups, index in (("PerFrameFunctionalGroupsSequence", frame - 1), ("SharedFunctionalGroupsSequence", 0)):
        seq = ds.get(groups)
        if seq is not None and len(seq) > index:
            inner = seq[index].get(sequence)
            if inner and keyword in inner[0]:
                return inner[0].get(keyword)
    return None


def voi(values: npt.NDArray[np.float64], window: Window) -> npt.NDArray[np.uint8]:
    """The VOI LUT function of PS3.3 C.11.2.1.2 onto 0..255."""
    c, w = window.center, window.width
    if window.function == "SIGMOID":
        out = 255.0 / (1.0 + np.exp(-4.0 * (values - c) / w))
    elif window.function == "LINEAR_EXACT":
        out = ((values - c) / w + 0.5) * 255.0
    else:  # LINEAR, piecewise: at or below the bottom edge black, above the top edge white
        ramp = ((values - (c - 0.5)) / max(w - 1.0, 1e-6) + 0.5) * 255.0
        low, high = c - 0.5 - (w - 1.0) / 2.0, c - 0.5 + (w - 1.0) / 2.0
        out = np.where(values <= low, 0.0, np.where(values > high, 255.0, ramp))
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def render(path: Path, frame: int, media_type: str, transfer_syntax: str, *, window: Window | None = None,
           viewport: tuple[int, int] | None = None, quality: int = 90) -> bytes:
    """Frame ``frame`` (1-based) as an 8-bit ``image/jpeg`` or ``image/png``: Modality LUT (rescale),
    then the requested window, else the image's (Window Center/Width), else its min..max; MONOCHROME1
    inverted; colour images as they are; fitted into ``viewport`` keeping the aspect ratio."""
    if is_compressed(transfer_syntax) and not decodable(transfer_syntax):
        raise NotAcceptable("the stored transfer syntax cannot be decoded here")
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        arr = pixel_array(str(path), index=frame - 1)
    except (OSError, ValueError, RuntimeError, NotImplementedError, AttributeError, IndexError) as exc:
        raise UnreadableInput(f"cannot decode frame {frame}: {type(exc).__name__}") from exc
    if int(ds.get("SamplesPerPixel", 1)) > 1:
        bits = int(ds.get("BitsStored") or ds.get("BitsAllocated") or 8)
        rgb = arr.astype(np.float64) * (255.0 / (2**bits - 1)) if bits > 8 else arr
        image = Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8))
    else:
        values = arr.astype(np.float64)
        slope = _first(_frame_value(ds, frame, "PixelValueTransformationSequence", "RescaleSlope"))
        intercept = _first(_frame_value(ds, frame, "PixelValueTransformationSequence", "RescaleIntercept"))
        values = values * (1.0 if slope is None else slope) + (intercept or 0.0)
        if window is None:
            center = _first(_frame_value(ds, frame, "FrameVOILUTSequence", "WindowCenter"))
            width = _first(_frame_value(ds, frame, "FrameVOILUTSequence", "WindowWidth"))
            function = str(_frame_value(ds, frame, "FrameVOILUTSequence", "VOILUTFunction") or "LINEAR")
            if center is not None and width is not None and width > 0:
                window = Window(center, width, function if function in ("LINEAR_EXACT", "SIGMOID") else "LINEAR")
            else:
                lo, hi = float(values.min()), float(values.max())
                window = Window((lo + hi) / 2.0, max(hi - lo, 1.0), "LINEAR_EXACT")
        grey = voi(values, window)
        if str(ds.get("PhotometricInterpretation", "")) == "MONOCHROME1":
            grey = 255 - grey
        image = Image.fromarray(grey)
    if viewport is not None:
        scale = min(viewport[0] / image.width, viewport[1] / image.height)
        size = (max(1, math.floor(image.width * scale)), max(1, math.floor(image.height * scale)))
        image = image.resize(size, Image.Resampling.BILINEAR)
    buf = io.BytesIO()
    if media_type == "image/png":
        image.save(buf, format="PNG")
    else:
        image.save(buf, format="JPEG", quality=max(1, min(quality, 100)))
    return buf.getvalue()
