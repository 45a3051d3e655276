"""``dl-ct-registration``: learned rigid registration of a prior CT onto the current one.

A small MONAI ``Regressor`` (3-D CNN) looks at the current scan and the warped prior on a common
axis-aligned LPS grid centred on the current scan and predicts a rigid correction (3 angles, 3 shifts).
The bundle declares that grid as ordinary MONAI items, which the model builds through the safe resolver
(:mod:`models.bundle`) and uses: ``preprocessing``'s ``ScaleIntensityRanged`` maps HU to the network's
input, ``Spacingd``'s (isotropic) ``pixdim`` is the working spacing, ``ResizeWithPadOrCropd``'s
``spatial_size`` the grid size, and the ``inferer`` (SimpleInferer) runs the network. The rigid
parameterisation (``angle_scale_deg``, ``shift_scale_mm``), ``iterations`` and ``body_hu`` stay in the
``dicom_node`` block; a bundle without items (or a TorchScript file) takes ``spacing_mm``, ``grid`` and
``hu_window`` from there. Pipeline of :meth:`DlCtRegistration.run_pair`:

1. Both scans are area-averaged to about the working spacing in their own array layout; the start
   transform aligns the centres of mass of their bodies (HU > ``body_hu``).
2. ``iterations`` times: the prior is resampled onto the grid through the current transform with
   ``monai.networks.layers.AffineTransform``; the inferer runs the network, which predicts a
   correction ``D`` about the grid centre; ``T <- T @ D``.
3. The prior is resampled onto the full current grid (``Registration.resampled``; -1024 HU
   outside the prior's field of view).

``Registration.transform`` maps current LPS to prior LPS. ``residual_mm`` is the RMS distance
from the current body surface to the resampled prior's (largest component above ``body_hu``
after an in-plane opening that cuts a thin table off, on the working grid, where both scans
have data); ``metric_value`` is the normalised cross-correlation of the two working images
(in [-1, 1], higher is better).
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import torch
from monai.networks.layers import AffineTransform
from pydantic import Field
from scipy import ndimage as ndi

from models.base import ModelResult, Registration, UnsuitableInput, Volume
from models.dl.core import DlModel, Params
from models.dl.items import GridPipeline, grid_pipeline, transforms_by_name
from models.dl.runtime import hu_to_unit, resample, tensor
from models.errors import BundleError

FILL_HU = -1024.0

# (i, j, k, 1) <-> (k, j, i, 1): array-order index vectors for the affines below
_SWAP = np.array([[0, 0, 1, 0], [0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 1]], dtype=np.float64)


class RegParams(Params):
    """``dicom_node`` parameters of a registration bundle: the rigid parameterisation, ``iterations`` and
    ``body_hu``. ``spacing_mm``, ``grid`` and ``hu_window`` are the legacy form, used only by a bundle or
    TorchScript file without ``preprocessing``/``inferer`` items."""

    spacing_mm: float = Field(4.5, gt=0)
    grid: tuple[int, int, int] = (80, 80, 80)
    hu_window: tuple[float, float] = (-1000.0, 1000.0)
    iterations: int = Field(3, ge=1, le=10)
    angle_scale_deg: float = 10.0
    shift_scale_mm: float = 30.0
    body_hu: float = -500.0


def array_affine(affine: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """``Volume.affine`` ((i, j, k, 1) -> LPS) as an array-order affine ((k, j, i, 1) -> LPS)."""
    return affine @ _SWAP


def grid_affine(centre: npt.ArrayLike, shape: tuple[int, int, int], spacing: float) -> npt.NDArray[np.float64]:
    """Array-order affine of an axis-aligned grid (axes z, y, x) of ``shape`` centred on ``centre`` (LPS)."""
    c = np.asarray(centre, dtype=np.float64)
    m = np.zeros((4, 4))
    m[3, 3] = 1.0
    for a in range(3):
        world = 2 - a
        m[world, a] = spacing
        m[world, 3] = c[world] - (shape[a] - 1) / 2 * spacing
    return m


def downsample(volume: Volume, spacing_mm: float) -> tuple[torch.Tensor, npt.NDArray[np.float64]]:
    """HU area-averaged to about ``spacing_mm`` (1, 1, D, H, W) in array layout, and its array-order affine."""
    b = array_affine(volume.affine)
    norms = np.linalg.norm(b[:3, :3], axis=0)
    shape = volume.voxels.shape
    target = [max(1, min(n, round(n * s / spacing_mm))) for n, s in zip(shape, norms, strict=True)]
    x = tensor(volume.voxels)[None, None]
    x = resample(x, target)
    f = np.asarray(shape, dtype=np.float64) / np.asarray(target, dtype=np.float64)
    d = np.eye(4)
    d[:3, :3] = np.diag(f)
    d[:3, 3] = 0.5 * f - 0.5
    return x.contiguous(), b @ d


def rigid_from_params(
    p: torch.Tensor, centre: torch.Tensor, angle_scale_deg: float, shift_scale_mm: float
) -> torch.Tensor:
    """Network outputs (B, 6) -> (B, 4, 4) rigid transforms (``Rz Ry Rx`` about ``centre``, then shift)."""
    ang = p[:, :3] * (angle_scale_deg * np.pi / 180.0)
    cx, cy, cz = torch.cos(ang).unbind(1)
    sx, sy, sz = torch.sin(ang).unbind(1)
    one, zero = torch.ones_like(cx), torch.zeros_like(cx)
    rx = torch.stack([one, zero, zero, zero, cx, -sx, zero, sx, cx], 1).view(-1, 3, 3)
    ry = torch.stack([cy, zero, sy, zero, one, zero, -sy, zero, cy], 1).view(-1, 3, 3)
    rz = torch.stack([cz, -sz, zero, sz, cz, zero, zero, zero, one], 1).view(-1, 3, 3)
    r = rz @ ry @ rx
    c = centre.to(p.dtype).expand(p.shape[0], 3)
    t = c - (r @ c[:, :, None])[:, :, 0] + p[:, 3:] * shift_scale_mm
    out = torch.zeros(p.shape[0], 4, 4, dtype=p.dtype, device=p.device)
    out[:, :3, :3] = r
    out[:, :3, 3] = t
    out[:, 3, 3] = 1.0
    return out


def warp(
    src: torch.Tensor, src_affine: torch.Tensor, transform: torch.Tensor, grid_aff: torch.Tensor, shape: tuple[int, ...]
) -> torch.Tensor:
    """Pull ``src`` (B, C, ...) onto a grid: out(x) = src(transform @ grid(x)); affines are array-order, (B, 4, 4)."""
    theta = torch.linalg.inv(src_affine) @ transform @ grid_aff
    at = AffineTransform(spatial_size=shape, normalized=False, mode="bilinear", padding_mode="zeros")
    out = at(src, theta.float())
    assert isinstance(out, torch.Tensor)
    return out


class DlCtRegistration(DlModel[RegParams]):
    """The ``dl-ct-registration`` pair model (see the module docstring); stateless between calls."""

    PACKAGE = "dl_ct_registration"
    PARAMS = RegParams
    BATCH_SIZE = 1

    def setup(self) -> None:
        cfg = self.bundle_config()
        p = self.params
        self.grid: tuple[int, int, int] = p.grid
        if cfg is None or "preprocessing" not in cfg or "inferer" not in cfg:
            window = p.hu_window
            self.pipeline = GridPipeline(lambda t: hu_to_unit(t, window), (p.spacing_mm,) * 3, _call, "dicom_node")
        else:
            self.pipeline = grid_pipeline(cfg, window=p.hu_window, spacing_mm=(p.spacing_mm,) * 3, roi_size=p.grid,
                                          overlap=0.0, batch_size=self.batch_size)
            crop = transforms_by_name(cfg.preprocessing()).get("ResizeWithPadOrCropd")
            if crop is None:
                raise BundleError(f"{cfg.where('preprocessing')}: a ResizeWithPadOrCropd transform (the working "
                                  "grid's size) is required")
            size = [int(n) for n in crop.padder.cropper.roi_size]
            if len(size) != 3 or min(size) < 1:
                raise BundleError(f"{cfg.where('preprocessing')}: ResizeWithPadOrCropd spatial_size must be three "
                                  f"positive sizes, got {size}")
            self.grid = (size[0], size[1], size[2])
        if len(set(self.pipeline.spacing_mm)) != 1:
            raise BundleError(f"{self.loaded.source}: the working spacing must be isotropic, got "
                              f"{list(self.pipeline.spacing_mm)}")
        self.spacing_mm = self.pipeline.spacing_mm[0]
        self.expect_output(torch.zeros(1, 2, *self.grid), 6)

    def run(self, volume: Volume) -> ModelResult:
        """A registration needs a prior: always raises :class:`UnsuitableInput` (use :meth:`run_pair`)."""
        self.check(volume)
        raise UnsuitableInput(f"{self.manifest.name} registers two series; call run_pair(current, prior)")

    def run_pair(self, current: Volume, prior: Volume) -> ModelResult:
        """Register ``prior`` onto ``current``; the result belongs to the current series."""
        self.check(current)
        self.check(prior)
        transform, ncc, residual = self.register(current, prior)
        resampled = resample_to(prior, current, transform, device=self.device)
        reg = Registration(
            transform=transform,
            residual_mm=residual,
            metric_value=ncc,
            resampled=resampled,
            prior_frame_of_reference_uid=prior.frame_of_reference_uid,
        )
        notes = (self.note(), f"NCC {ncc:.3f}, body-surface RMS distance {residual:.1f} mm")
        return ModelResult(self.manifest.name, self.manifest.version, notes=notes, registration=reg)

    def register(self, current: Volume, prior: Volume) -> tuple[npt.NDArray[np.float64], float, float]:
        """The current -> prior LPS transform (4x4), the NCC and the surface RMS distance (mm)."""
        p, sp, grid, to_input = self.params, self.spacing_mm, self.grid, self.pipeline.to_input
        cur, cur_aff = downsample(current, sp)
        pri, pri_aff = downsample(prior, sp)
        centre = current.to_patient((np.asarray(current.voxels.shape[::-1], dtype=np.float64) - 1) / 2)
        g_aff = grid_affine(centre, grid, sp)
        t = np.eye(4)
        t[:3, 3] = _body_centre(pri, pri_aff, p.body_hu) - _body_centre(cur, cur_aff, p.body_hu)
        dev = self.device
        as_t = lambda a: torch.as_tensor(a, dtype=torch.float64, device=dev)[None]  # noqa: E731
        fixed = warp(to_input(cur).to(dev), as_t(cur_aff), as_t(np.eye(4)), as_t(g_aff), grid)
        fixed_cov = warp(torch.ones_like(cur).to(dev), as_t(cur_aff), as_t(np.eye(4)), as_t(g_aff), grid) > 0.99
        moving_src = to_input(pri).to(dev)
        centre_t = torch.as_tensor(centre, dtype=torch.float64, device=dev)
        transform = as_t(t)
        with torch.no_grad():
            for _ in range(p.iterations):
                moving = warp(moving_src, as_t(pri_aff), transform, as_t(g_aff), grid)
                with self.autocast():
                    out = self.pipeline.inferer(torch.cat([fixed, moving], dim=1), self.network)
                delta = rigid_from_params(out.double(), centre_t, p.angle_scale_deg, p.shift_scale_mm)
                transform = transform @ delta
            moving = warp(moving_src, as_t(pri_aff), transform, as_t(g_aff), grid)
            covered = warp(torch.ones_like(moving_src), as_t(pri_aff), transform, as_t(g_aff), grid) > 0.99
            covered &= fixed_cov
        f, m, cov = fixed[0, 0].cpu().numpy(), moving[0, 0].cpu().numpy(), covered[0, 0].cpu().numpy()
        threshold = float(to_input(torch.tensor([p.body_hu]))[0])
        return (
            transform[0].cpu().numpy().astype(np.float64),
            _ncc(f[cov], m[cov]),
            _surface_rms(f > threshold, m > threshold, cov, sp),
        )


def _call(inputs: torch.Tensor, network: torch.nn.Module) -> torch.Tensor:
    """The legacy inferer: one forward pass."""
    out = network(inputs)
    assert isinstance(out, torch.Tensor)
    return out


def _body_centre(x: torch.Tensor, aff: npt.NDArray[np.float64], body_hu: float) -> npt.NDArray[np.float64]:
    body = (x[0, 0] > body_hu).numpy()
    if not body.any():
        return aff[:3, :3] @ ((np.asarray(body.shape) - 1) / 2) + aff[:3, 3]
    return aff[:3, :3] @ np.asarray(ndi.center_of_mass(body)) + aff[:3, 3]


def _ncc(a: npt.NDArray[np.float32], b: npt.NDArray[np.float32]) -> float:
    if a.size < 2:
        return 0.0
    a0, b0 = a - a.mean(), b - b.mean()
    denom = float(np.sqrt((a0 * a0).sum() * (b0 * b0).sum()))
    return float((a0 * b0).sum() / denom) if denom > 0 else 0.0


def _surface_rms(
    fixed: npt.NDArray[np.bool_], moving: npt.NDArray[np.bool_], covered: npt.NDArray[np.bool_], spacing: float
) -> float:
    """RMS distance (mm) from the fixed mask's surface to the moving mask's, where both scans have data.

    Surfaces are taken inside ``covered`` (eroded), so the ends of a field of view are no surface.
    """
    inner = ndi.binary_erosion(covered, iterations=2)
    fixed, moving = _body(fixed & covered), _body(moving & covered)
    f_surf = (fixed & ~ndi.binary_erosion(fixed)) & inner
    m_surf = (moving & ~ndi.binary_erosion(moving)) & ndi.binary_erosion(covered)
    if not f_surf.any() or not m_surf.any():
        return float("nan")
    dist = ndi.distance_transform_edt(~m_surf, sampling=spacing)
    return float(np.sqrt(np.mean(np.asarray(dist)[f_surf] ** 2)))


def _body(mask: npt.NDArray[np.bool_]) -> npt.NDArray[np.bool_]:
    """The largest component after an in-plane opening (which cuts a thin table off the body)."""
    cross = np.zeros((3, 3, 3), dtype=bool)
    cross[1] = ndi.generate_binary_structure(2, 1)
    mask = ndi.binary_opening(mask, structure=cross)
    lab, n = ndi.label(mask)
    if n <= 1:
        return mask
    sizes = np.bincount(lab.ravel())
    sizes[0] = 0
    return np.asarray(lab == int(np.argmax(sizes)))


def resample_to(
    prior: Volume, current: Volume, transform: npt.NDArray[np.float64], *, device: torch.device, chunk: int = 16
) -> npt.NDArray[np.float32]:
    """``prior`` resampled (trilinear) onto ``current``'s grid through ``transform`` (current -> prior LPS)."""
    src = torch.from_numpy(np.ascontiguousarray(prior.voxels, dtype=np.float32) - FILL_HU)[None, None].to(device)
    src_aff = torch.as_tensor(array_affine(prior.affine), dtype=torch.float64, device=device)[None]
    tr = torch.as_tensor(transform, dtype=torch.float64, device=device)[None]
    cur_aff = array_affine(current.affine)
    k, j, i = current.voxels.shape
    out = np.empty((k, j, i), dtype=np.float32)
    # Slabs of ``chunk`` slices; a last slab of one slice joins the previous one (a unit-size grid
    # axis is a special case of affine_grid that torch warns about).
    starts = list(range(0, k, chunk))
    if len(starts) > 1 and k - starts[-1] == 1:
        starts.pop()
    with torch.no_grad():
        for n, k0 in enumerate(starts):
            k1 = starts[n + 1] if n + 1 < len(starts) else k
            shift = np.eye(4)
            shift[0, 3] = k0
            g = torch.as_tensor(cur_aff @ shift, dtype=torch.float64, device=device)[None]
            slab = warp(src, src_aff, tr, g, (k1 - k0, j, i))
            out[k0:k1] = slab[0, 0].cpu().numpy() + FILL_HU
    return out
