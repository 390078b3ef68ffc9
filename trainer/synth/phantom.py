"""A 3D chest CT phantom in Hounsfield units, with lung and nodule masks (numpy/scipy only).

Geometry follows DICOM patient coordinates (LPS) with an axial orientation of
``[1, 0, 0, 0, 1, 0]``: array axis 2 (columns) runs to the patient's left (+x), axis 1 (rows)
runs posterior (+y), and axis 0 (slices) runs superior (+z). Image row 0 is therefore anterior
and the patient's left is on the image's right (the radiological convention).

The anatomy is analytic: every structure is an ellipse, ellipsoid or tube described in
millimetres, so the phantom looks the same whatever the pixel spacing. Axial cross-sections are
rasterised one slice at a time (bounded memory); vessels and nodules are 3D objects rasterised
inside their bounding boxes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

#: Hounsfield values of the tissues.
HU_AIR, HU_FAT, HU_SOFT, HU_BLOOD, HU_LIVER = -1000.0, -100.0, 40.0, 45.0, 55.0
HU_LUNG, HU_BONE, HU_CORTEX, HU_DISC, HU_GGO = -850.0, 700.0, 1200.0, 80.0, -500.0
HU_NODULE = 30.0


@dataclass(frozen=True)
class Geometry:
    """The voxel grid: ``rows`` x ``columns`` pixels of ``pixel_spacing`` mm, ``slices`` slices
    ``slice_spacing`` mm apart, slice 0 at height ``z0`` mm (patient z, LPS)."""

    rows: int
    columns: int
    slices: int
    pixel_spacing: float
    slice_spacing: float
    z0: float

    def x_mm(self) -> np.ndarray:
        """Patient x (mm) of each column, centred on the image."""
        return (np.arange(self.columns) - (self.columns - 1) / 2) * self.pixel_spacing

    def y_mm(self) -> np.ndarray:
        """Patient y (mm) of each row, centred on the image."""
        return (np.arange(self.rows) - (self.rows - 1) / 2) * self.pixel_spacing

    def z_mm(self) -> np.ndarray:
        """Patient z (mm) of each slice."""
        return self.z0 + np.arange(self.slices) * self.slice_spacing


@dataclass(frozen=True)
class Nodule:
    """One nodule: centre in voxels (z, y, x), equivalent-sphere diameter, kind, semi-axes (mm)."""

    center_voxel: tuple[float, float, float]
    diameter_mm: float
    kind: str  # "solid" | "part-solid"
    semi_axes_mm: tuple[float, float, float]


@dataclass(frozen=True)
class Phantom:
    """The phantom volume (z, y, x) in HU (int16), its masks (uint8) and nodules.

    ``nodule_labels`` holds 1 + the index of the nodule each voxel belongs to (0 elsewhere).
    """

    geometry: Geometry
    hu: np.ndarray
    lung_mask: np.ndarray
    nodule_labels: np.ndarray
    nodules: tuple[Nodule, ...]

    @property
    def nodule_mask(self) -> np.ndarray:
        """uint8 mask, 1 inside any nodule."""
        return (self.nodule_labels > 0).astype(np.uint8)


@dataclass(frozen=True)
class Anatomy:
    """Random anatomical parameters of one patient (all in mm)."""

    body_a: float  # body outline semi-axes (x, y)
    body_b: float
    fat: float  # subcutaneous fat thickness
    rib_a: float  # ellipse on which the ribs lie
    rib_b: float
    lung_x: float  # lung centres at (+-lung_x, lung_y)
    lung_y: float
    lung_a: float
    lung_b: float
    med_half: float  # half width of the mediastinum
    lung_height: float  # lungs span patient z in [0, lung_height]
    heart_x: float
    heart_y: float
    heart_a: float
    heart_b: float
    spine_y: float
    spine_r: float
    rib_pitch: float
    rib_phase: float


def random_anatomy(rng: np.random.Generator, fov_mm: float) -> Anatomy:
    """Draw a patient whose body fits a field of view of ``fov_mm``."""
    body_a = fov_mm / 2 * rng.uniform(0.80, 0.93)
    body_b = body_a * rng.uniform(0.62, 0.78)
    fat = body_b * rng.uniform(0.06, 0.16)
    rib_a = (body_a - fat) - body_a * rng.uniform(0.08, 0.12)
    rib_b = (body_b - fat) - body_b * rng.uniform(0.08, 0.12)
    med_half = rib_a * rng.uniform(0.10, 0.14)
    lung_a = (rib_a - 0.04 * rib_a - med_half) / 2
    lung_y = -0.02 * rib_b
    lung_b = rib_b * 0.94 - abs(lung_y)
    return Anatomy(
        body_a=body_a, body_b=body_b, fat=fat, rib_a=rib_a, rib_b=rib_b,
        lung_x=med_half + lung_a, lung_y=lung_y, lung_a=lung_a, lung_b=lung_b,
        med_half=med_half, lung_height=rng.uniform(220.0, 280.0),
        heart_x=rib_a * rng.uniform(0.08, 0.16), heart_y=-rib_b * rng.uniform(0.15, 0.3),
        heart_a=rib_a * rng.uniform(0.36, 0.44), heart_b=rib_b * rng.uniform(0.45, 0.55),
        spine_y=rib_b * 0.62, spine_r=rib_b * rng.uniform(0.15, 0.19),
        rib_pitch=rng.uniform(24.0, 30.0), rib_phase=rng.uniform(0.0, 30.0))


def _profile(hn: np.ndarray) -> np.ndarray:
    """Lung cross-section scale against normalised height (0 = base, 1 = apex)."""
    base = np.sqrt(np.clip(1 - ((hn - 0.35) / 0.65) ** 2, 0, None))
    return np.where((hn < 0) | (hn > 1), 0.0, np.where(hn < 0.35, 1.0, base))


def _heart_scale(hn: np.ndarray | float) -> np.ndarray:
    """Heart cross-section scale against normalised height: an ellipsoid on the diaphragm."""
    return np.sqrt(np.clip(1 - ((np.asarray(hn) - 0.25) / 0.32) ** 2, 0, None))


def lung_region(x: np.ndarray, y: np.ndarray, z: np.ndarray, a: Anatomy) -> np.ndarray:
    """True where (x, y, z) mm (broadcastable arrays) lies in a lung."""
    hn = z / a.lung_height
    s = _profile(hn)
    inside = np.zeros(np.broadcast_shapes(np.shape(x), np.shape(y), np.shape(z)), dtype=bool)
    for side in (-1.0, 1.0):
        u = (x - side * a.lung_x) / np.maximum(a.lung_a * s, 1e-6)
        v = (y - a.lung_y) / np.maximum(a.lung_b * s, 1e-6)
        inside |= u * u + v * v < 1
    # the diaphragm dome rises into the base; the heart sits on it
    dome = a.lung_a * 1.6 * np.sqrt(np.clip(1 - hn / 0.3, 0, None))
    for side in (-1.0, 1.0):
        d = (((x - side * a.lung_x) / (dome + 1e-6)) ** 2
             + ((y - a.lung_y) / (dome * 0.9 + 1e-6)) ** 2)
        inside &= d >= 1
    hs = _heart_scale(hn) + 1e-6
    heart = ((x - a.heart_x) / (a.heart_a * hs)) ** 2 + ((y - a.heart_y) / (a.heart_b * hs)) ** 2
    inside &= heart >= 1
    inside &= np.abs(x) > a.med_half + 0 * y
    spine = (x / (a.spine_r * 1.8)) ** 2 + ((y - a.spine_y) / (a.spine_r * 1.6)) ** 2 < 1
    return inside & ~spine


def _ellipse(x: np.ndarray, y: np.ndarray, cx: float, cy: float, ra: float,
             rb: float) -> np.ndarray:
    """Squared normalised radius of an axis-aligned ellipse (< 1 inside)."""
    return ((x - cx) / ra) ** 2 + ((y - cy) / rb) ** 2


def axial_slice(x: np.ndarray, y: np.ndarray, z: float,
                a: Anatomy) -> tuple[np.ndarray, np.ndarray]:
    """HU image (float32) and lung mask of the axial slice at height ``z`` mm.

    ``x`` is a (1, columns) and ``y`` a (rows, 1) array of mm coordinates.
    """
    hn = z / a.lung_height
    breath = 1.0 + 0.03 * np.sin(hn * 3.0)
    img = np.full(np.broadcast_shapes(x.shape, y.shape), HU_AIR, dtype=np.float32)
    body = _ellipse(x, y, 0, 0, a.body_a * breath, a.body_b * breath)
    inner = _ellipse(x, y, 0, 0, a.body_a * breath - a.fat, a.body_b * breath - a.fat)
    img[body < 1] = HU_FAT
    img[inner < 1] = HU_SOFT
    lung = lung_region(x, y, np.float64(z), a) & (inner < 1)
    img[lung] = HU_LUNG
    img += np.where(lung, 25.0 * (y / a.rib_b), 0.0).astype(np.float32)  # dependent density
    dome = 0.3 * a.lung_height
    if z < dome:  # liver under the right dome
        liver = _ellipse(x, y, -a.lung_x * 0.6, a.lung_y, a.lung_a * 1.9, a.lung_b * 0.95) < 1
        liver &= ~lung
        img[liver & (inner < 1)] = HU_LIVER
    hs = float(_heart_scale(hn))
    if hs > 0.05:
        heart = _ellipse(x, y, a.heart_x, a.heart_y, a.heart_a * 0.8 * hs, a.heart_b * 0.8 * hs)
        img[heart < 1] = HU_BLOOD
    aorta_y = a.spine_y - a.spine_r * 1.9
    img[_ellipse(x, y, a.spine_r * 1.1, aorta_y, a.spine_r * 0.75, a.spine_r * 0.75) < 1] = HU_BLOOD
    if hn > 0.6:  # trachea
        trachea = _ellipse(x, y, 0, aorta_y - a.spine_r * 0.3, a.spine_r * 0.6, a.spine_r * 0.55)
        img[trachea < 1] = HU_AIR
    # spine: vertebral bodies and discs, canal, posterior elements
    disc = (z % 32.0) < 7.0
    vb = _ellipse(x, y, 0, a.spine_y, a.spine_r * 1.1, a.spine_r)
    cortex_w = 1.5 / a.spine_r  # 1.5 mm cortical shell
    if disc:
        img[vb < 1] = HU_DISC
    else:
        img[vb < 1] = HU_CORTEX
        img[vb < (1 - cortex_w * 1.4) ** 2] = HU_BONE
    canal_y = a.spine_y + a.spine_r * 1.55
    post = _ellipse(x, y, 0, canal_y + a.spine_r * 0.2, a.spine_r * 1.2, a.spine_r * 0.9)
    img[(post < 1) & ~disc] = HU_CORTEX
    img[_ellipse(x, y, 0, canal_y, a.spine_r * 0.5, a.spine_r * 0.45) < 1] = 10.0  # CSF
    # sternum
    img[_ellipse(x, y, 0, -(a.rib_b + 4), a.spine_r * 0.9, a.spine_r * 0.35) < 1] = HU_BONE
    # ribs: oblique bands around the rib ellipse, lower anteriorly
    r = np.sqrt(_ellipse(x, y, 0, 0, a.rib_a, a.rib_b))
    radial = (r - 1.0) * np.sqrt(a.rib_a * a.rib_b) - 4.0
    phase = np.mod(z - a.rib_phase - 35.0 * (y / a.rib_b), a.rib_pitch)
    dz = np.minimum(phase, a.rib_pitch - phase)
    rib = (radial / 4.5) ** 2 + (dz / 6.0) ** 2
    rib_ok = (y / a.rib_b > -0.7) & (inner < 1)
    img[(rib < 1) & rib_ok] = HU_CORTEX
    img[(rib < 0.45) & rib_ok] = HU_BONE
    return img, lung & (img < -500)


def _rotate(d: np.ndarray, rng: np.random.Generator, angle: float) -> np.ndarray:
    """``d`` turned by ``angle`` radians about a random perpendicular axis."""
    p = np.cross(d, rng.normal(size=3))
    p /= np.linalg.norm(p) + 1e-12
    out = d * np.cos(angle) + np.cross(p, d) * np.sin(angle)
    return out / np.linalg.norm(out)


def vessel_tree(rng: np.random.Generator, a: Anatomy,
                inside: Callable[[np.ndarray], bool]) -> list[tuple[np.ndarray, np.ndarray, float]]:
    """Branching pulmonary vessels as (start mm, end mm, radius mm) segments from each hilum.

    ``inside(point)`` tells whether a point (x, y, z mm) is in a lung; a branch that leaves the
    lung ends there.
    """
    segments: list[tuple[np.ndarray, np.ndarray, float]] = []
    for side in (-1.0, 1.0):
        hilum = np.array([side * (a.med_half + 0.1 * a.lung_a), a.lung_y, 0.55 * a.lung_height])
        stack = []
        for k in range(9):
            angle = 2 * np.pi * k / 9 + rng.uniform(-0.2, 0.2)
            d = np.array([side * (0.5 + 0.4 * abs(np.cos(angle))), 0.5 * np.sin(angle),
                          1.2 * np.cos(angle)])
            stack.append((hilum, d / np.linalg.norm(d), 4.0, 0))
        while stack:
            p, d, radius, depth = stack.pop()
            q = p + d * (rng.uniform(8.0, 16.0) * (radius / 3.0) ** 0.5 + 5.0)
            segments.append((p, q, radius))
            if radius < 0.6 or depth >= 9 or (depth > 0 and not inside(q)):
                continue
            for sign in (-1.0, 1.0):
                child = _rotate(d, rng, sign * rng.uniform(0.25, 0.55))
                stack.append((q, child, radius * rng.uniform(0.68, 0.82), depth + 1))
    return segments


def _box(g: Geometry, lo: np.ndarray, hi: np.ndarray) -> tuple[slice, slice, slice] | None:
    """Voxel slices (z, y, x) covering the mm box [lo, hi] (x, y, z), or None if outside."""
    x0 = (g.columns - 1) / 2
    y0 = (g.rows - 1) / 2
    lo_v = [(lo[2] - g.z0) / g.slice_spacing, lo[1] / g.pixel_spacing + y0,
            lo[0] / g.pixel_spacing + x0]
    hi_v = [(hi[2] - g.z0) / g.slice_spacing, hi[1] / g.pixel_spacing + y0,
            hi[0] / g.pixel_spacing + x0]
    out = []
    for lo_i, hi_i, n in zip(lo_v, hi_v, (g.slices, g.rows, g.columns), strict=True):
        a, b = max(int(np.floor(lo_i)), 0), min(int(np.ceil(hi_i)) + 1, n)
        if a >= b:
            return None
        out.append(slice(a, b))
    return out[0], out[1], out[2]


def _coords(g: Geometry, box: tuple[slice, slice, slice]) -> tuple[np.ndarray, ...]:
    """Broadcastable (z, y, x) mm coordinates of a voxel box."""
    z = g.z_mm()[box[0]][:, None, None]
    y = g.y_mm()[box[1]][None, :, None]
    x = g.x_mm()[box[2]][None, None, :]
    return z, y, x


def draw_vessels(hu: np.ndarray, lung: np.ndarray, g: Geometry,
                 segments: list[tuple[np.ndarray, np.ndarray, float]]) -> None:
    """Paint vessel segments (soft tissue) into ``hu`` where ``lung`` is set (in place)."""
    for p, q, radius in segments:
        box = _box(g, np.minimum(p, q) - radius, np.maximum(p, q) + radius)
        if box is None:
            continue
        z, y, x = _coords(g, box)
        d = q - p
        t = ((x - p[0]) * d[0] + (y - p[1]) * d[1] + (z - p[2]) * d[2]) / float(d @ d)
        t = np.clip(t, 0.0, 1.0)
        dist2 = (x - p[0] - t * d[0]) ** 2 + (y - p[1] - t * d[1]) ** 2 + (z - p[2] - t * d[2]) ** 2
        hit = (dist2 < radius * radius) & lung[box]
        hu[box][hit] = HU_SOFT


def nodule_diameter(rng: np.random.Generator) -> float:
    """A nodule diameter in [3, 30] mm, biased so most are >= 6 mm."""
    if rng.random() < 0.15:
        return float(rng.uniform(3.0, 6.0))
    return float(np.exp(rng.uniform(np.log(6.0), np.log(30.0))))


def place_nodules(hu: np.ndarray, lung: np.ndarray, g: Geometry, rng: np.random.Generator,
                  count: int) -> tuple[np.ndarray, tuple[Nodule, ...]]:
    """Put up to ``count`` nodules wholly inside the lungs (in place on ``hu``).

    A nodule that does not fit after a few tries is shrunk; one that still does not fit is
    dropped. Returns the nodule label volume (1 + index) and the nodules placed.
    """
    labels = np.zeros(hu.shape, dtype=np.uint8)
    nodules: list[Nodule] = []
    candidates = np.flatnonzero(lung)
    if candidates.size == 0:
        return labels, ()
    for _ in range(count):
        diameter = nodule_diameter(rng)
        kind = "part-solid" if rng.random() < 0.3 else "solid"
        for attempt in range(60):
            if attempt and attempt % 15 == 0:
                diameter = max(3.0, diameter * 0.7)
            ratios = rng.uniform(0.8, 1.25, size=3)
            ratios /= np.cbrt(ratios.prod())
            semi = diameter / 2 * ratios  # (x, y, z)
            zc, yc, xc = np.unravel_index(candidates[rng.integers(candidates.size)], hu.shape)
            centre = np.array([g.x_mm()[xc], g.y_mm()[yc], g.z_mm()[zc]])
            centre += rng.uniform(-0.5, 0.5, 3) * np.array(
                [g.pixel_spacing, g.pixel_spacing, g.slice_spacing])
            box = _box(g, centre - semi, centre + semi)
            if box is None:
                continue
            z, y, x = _coords(g, box)
            r2 = (((x - centre[0]) / semi[0]) ** 2 + ((y - centre[1]) / semi[1]) ** 2
                  + ((z - centre[2]) / semi[2]) ** 2)
            inside = r2 < 1
            if not inside.any() or not lung[box][inside].all() or labels[box][inside].any():
                continue
            labels[box][inside] = len(nodules) + 1
            values = np.full(r2.shape, HU_NODULE, dtype=np.float32)
            if kind == "part-solid":
                core = rng.uniform(0.35, 0.6)
                values = np.where(r2 < core * core, HU_NODULE, HU_GGO).astype(np.float32)
            hu[box][inside] = values[inside]
            voxel = ((centre[2] - g.z0) / g.slice_spacing,
                     centre[1] / g.pixel_spacing + (g.rows - 1) / 2,
                     centre[0] / g.pixel_spacing + (g.columns - 1) / 2)
            nodules.append(Nodule(
                center_voxel=tuple(round(float(v), 2) for v in voxel),  # type: ignore[arg-type]
                diameter_mm=round(diameter, 2), kind=kind,
                semi_axes_mm=tuple(round(float(v), 2) for v in semi)))  # type: ignore[arg-type]
            break
    return labels, tuple(nodules)


def make_phantom(rng: np.random.Generator, g: Geometry, a: Anatomy, n_nodules: int,
                 noise_hu: float) -> Phantom:
    """Build the phantom: anatomy, vessels, nodules, partial-volume blur and scanner noise.

    The noise is gaussian, slightly correlated in-plane, with standard deviation ``noise_hu``.
    """
    x = g.x_mm().astype(np.float32)[None, :]
    y = g.y_mm().astype(np.float32)[:, None]
    hu = np.empty((g.slices, g.rows, g.columns), dtype=np.float32)
    lung = np.empty(hu.shape, dtype=bool)
    for i, z in enumerate(g.z_mm()):
        hu[i], lung[i] = axial_slice(x, y, float(z), a)

    def inside(p: np.ndarray) -> bool:
        box = _box(g, p, p)
        if box is None:  # outside the scanned volume: ask the analytic anatomy
            return bool(lung_region(p[0], p[1], p[2], a))
        return bool(lung[box[0].start, box[1].start, box[2].start])

    draw_vessels(hu, lung, g, vessel_tree(rng, a, inside))
    labels, nodules = place_nodules(hu, lung, g, rng, n_nodules)
    sigma_px = 0.6 * 0.7 / g.pixel_spacing  # ~0.4 mm of in-plane blur whatever the grid
    ndimage.gaussian_filter(hu, sigma=(0, sigma_px, sigma_px), output=hu, truncate=3.0)
    noise = rng.standard_normal(hu.shape, dtype=np.float32)
    ndimage.gaussian_filter(noise, sigma=(0, 0.7, 0.7), output=noise, truncate=3.0)
    noise *= np.float32(noise_hu / 0.40)  # a 0.7 px gaussian leaves ~0.40 of the unit std
    hu += noise
    np.clip(hu, -1024, 3071, out=hu)
    return Phantom(geometry=g, hu=np.rint(hu).astype(np.int16), lung_mask=lung.astype(np.uint8),
                   nodule_labels=labels, nodules=nodules)
