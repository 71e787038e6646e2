"""Rendering of the demo radiographs: a frontal PA view and a lateral view of one patient."""

from __future__ import annotations

import functools
from typing import Optional

import numpy as np

from cmn.data.demo.findings import Findings


@functools.lru_cache(maxsize=16)
def _gauss_kernel(size: int, sigma_px: float) -> np.ndarray:
    fy, fx = np.fft.fftfreq(size), np.fft.rfftfreq(size)
    return np.exp(-2 * (np.pi * sigma_px) ** 2 * (fy[:, None] ** 2 + fx[None, :] ** 2)).astype(np.float32)


def _blur(img: np.ndarray, sigma_px: float) -> np.ndarray:
    """Gaussian blur (periodic boundary) of a square (H, W) image, float32."""
    k = _gauss_kernel(img.shape[0], sigma_px)
    return np.fft.irfft2(np.fft.rfft2(img) * k, s=img.shape).astype(np.float32)


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * z))


class _Canvas:
    """Body coordinates for one view: X right on the image, Y down, about [-1, 1]."""

    def __init__(self, size: int, rng: np.random.Generator):
        lin = (np.arange(size) + 0.5) / size * 2 - 1
        # float32 halves the memory traffic of the ~100 whole-image operations per view.
        y, x = np.meshgrid(lin.astype(np.float32), lin.astype(np.float32), indexing="ij")  # (H, W) each
        scale = rng.uniform(0.90, 1.04)
        theta = np.deg2rad(rng.uniform(-3, 3))
        dx, dy = rng.uniform(-0.05, 0.05, size=2)
        c, s = np.cos(theta), np.sin(theta)
        self.X = ((c * (x - dx) + s * (y - dy)) / scale).astype(np.float32)  # (H, W)
        self.Y = ((-s * (x - dx) + c * (y - dy)) / scale).astype(np.float32)  # (H, W)
        self.size = size
        self.edge = 2.5 / (size * scale)  # soft edge of about one pixel, in body units
        self.rng = rng

    def ellipse(self, cx, cy, rx, ry) -> np.ndarray:
        """Soft mask (H, W) in [0, 1] of an axis-aligned ellipse."""
        r = np.sqrt(((self.X - cx) / rx) ** 2 + ((self.Y - cy) / ry) ** 2)
        return _sigmoid((1 - r) * min(rx, ry) / self.edge)

    def radius(self, cx, cy, rx, ry) -> np.ndarray:
        return np.sqrt(((self.X - cx) / rx) ** 2 + ((self.Y - cy) / ry) ** 2)

    def below(self, y_line: np.ndarray) -> np.ndarray:
        """Soft mask of pixels below the curve ``Y = y_line`` (an (H, W) array)."""
        return _sigmoid((self.Y - y_line) / self.edge)

    def polyline(self, points, width) -> np.ndarray:
        """Soft mask of a polyline of the given half-width through ``points`` [(X, Y), ...]."""
        dist = np.full(self.X.shape, np.inf)
        for (x0, y0), (x1, y1) in zip(points[:-1], points[1:]):
            vx, vy = x1 - x0, y1 - y0
            t = np.clip(((self.X - x0) * vx + (self.Y - y0) * vy) / (vx * vx + vy * vy), 0, 1)
            dist = np.minimum(dist, np.hypot(self.X - x0 - t * vx, self.Y - y0 - t * vy))
        return _sigmoid((width - dist) / (0.6 * self.edge))

    def box(self, cx, cy, hx, hy) -> np.ndarray:
        """Soft mask of a rounded rectangle with half-sizes (hx, hy)."""
        r = np.maximum(np.abs(self.X - cx) / hx, np.abs(self.Y - cy) / hy)
        return _sigmoid((1 - r) * min(hx, hy) / self.edge)

    def smooth_noise(self, sigma_px: float) -> np.ndarray:
        """Gaussian-filtered white noise (H, W) with unit standard deviation."""
        n = self.rng.standard_normal((self.size, self.size), dtype=np.float32)
        out = _blur(n, sigma_px)
        return out / (out.std() + 1e-8)


def _bezier(p0, p1, p2, n=12):
    t = np.linspace(0, 1, n)[:, None]
    pts = (1 - t) ** 2 * np.array(p0) + 2 * (1 - t) * t * np.array(p1) + t**2 * np.array(p2)
    return [tuple(p) for p in pts]


def _vessels(cv: _Canvas, hx: float, hy: float, sign: float) -> np.ndarray:
    """Vessel-like streaks (H, W) radiating from a hilum at (hx, hy), fading with distance.

    Drawn from an angular profile (a few narrow peaks at random angles) instead of one
    line per vessel: one lookup per pixel, an order of magnitude faster than polylines.
    """
    bins = 720
    phi = np.linspace(-np.pi, np.pi, bins, endpoint=False)
    profile = np.zeros(bins)
    for ang in cv.rng.uniform(-np.pi, np.pi, size=14):
        d = np.angle(np.exp(1j * (phi - ang)))
        profile += np.exp(-((d / 0.035) ** 2))
    dx, dy = cv.X - hx, cv.Y - hy
    rho = np.hypot(dx, dy)
    idx = ((np.arctan2(dy, dx * sign) + np.pi) / (2 * np.pi) * bins).astype(np.int64) % bins
    reach = cv.rng.uniform(0.3, 0.5)
    return profile[idx] * np.exp(-rho / reach) * _sigmoid((rho - 0.05) / 0.02)


def _side_x(side: str) -> float:
    # PA projection: the patient's right is on the image left.
    return -1.0 if side == "right" else 1.0


def _lung_frontal(cv: _Canvas, sign: float, anat: dict) -> tuple[np.ndarray, dict]:
    """Soft lung mask for one side (sign -1: patient's right) and its geometry."""
    cx, cy = sign * anat["lung_cx"], anat["lung_cy"]
    rx, ry = anat["lung_rx"] * (0.94 if sign < 0 else 1.0), anat["lung_ry"]
    # The apex is narrower than the base: squeeze X more towards the top.
    taper = np.clip(0.6 + 0.4 * (cv.Y - cy + ry) / (1.2 * ry), 0.6, 1.0)
    r = (np.abs((cv.X - cx) / (rx * taper)) ** 3 + np.abs((cv.Y - cy) / ry) ** 3) ** (1 / 3)
    body = _sigmoid((1 - r) * rx / cv.edge)
    # Hemidiaphragm dome: highest medially, lowest at the lateral costophrenic angle.
    base = anat["diaphragm_y"] + (0.04 if sign > 0 else 0.0)
    u = np.clip((cv.X - cx) / rx * sign, -1, 1.2)  # -1 medial .. +1 lateral
    dome = base - anat["dome"] * (1 - ((u + 0.25) / 1.25) ** 2)
    mask = body * (1 - cv.below(dome))
    medial = _sigmoid((cv.X * sign - anat["medial_x"]) / cv.edge)
    return mask * medial, {"cx": cx, "cy": cy, "rx": rx, "ry": ry, "r": r, "dome": dome, "base": base}


def _note(regions: Optional[dict], name: str, mask: np.ndarray) -> None:
    """Record where a finding is drawn (``mask`` > 1/2) when the caller asked for regions."""
    if regions is not None:
        regions[name] = regions.get(name, False) | (np.asarray(mask) > 0.5)


def _render_frontal(cv: _Canvas, f: Findings, anat: dict, regions: Optional[dict] = None) -> np.ndarray:
    X, Y = cv.X, cv.Y
    img = np.full(X.shape, 0.04, dtype=np.float32)
    torso = _sigmoid((1 - (np.abs(X / 0.93) ** 3 + np.abs((Y - 0.2) / 1.05) ** 3) ** (1 / 3)) / cv.edge)
    neck = cv.box(0, -0.95, 0.26, 0.2)
    shoulders = cv.ellipse(0, -0.55, 1.0, 0.32)
    soft = np.clip(torso + neck + shoulders, 0, 1)
    img = img * (1 - soft) + 0.46 * soft
    # Humeral heads and clavicles.
    for sign in (-1, 1):
        img += 0.16 * cv.ellipse(sign * 0.86, -0.68, 0.12, 0.13)
        img += 0.14 * cv.polyline([(sign * 0.1, -0.62), (sign * 0.45, -0.7), (sign * 0.78, -0.74)], 0.035)
    img += 0.05 * cv.ellipse(0, 0.7, 0.75, 0.3)  # abdomen is denser than the chest wall

    lungs, geom = [], {}
    for sign, side in ((-1, "right"), (1, "left")):
        m, g = _lung_frontal(cv, sign, anat)
        lungs.append(m)
        geom[side] = g
    lung = np.clip(lungs[0] + lungs[1], 0, 1)

    # Lung markings: vessels fanning out from the hila plus fine texture, fading laterally.
    markings = 0.35 * cv.smooth_noise(1.2)
    for sign in (-1, 1):
        hx, hy = sign * 0.2, -0.02
        markings += 0.6 * _vessels(cv, hx, hy, sign)
        markings += 1.2 * cv.ellipse(hx * 1.05, hy, 0.07, 0.12)
    fade = np.exp(-np.abs(np.abs(X) - 0.2) / 0.45)
    lung_value = anat["lung_dark"] + 0.06 * markings * fade

    # Ribs: posterior arcs, sloping down laterally.
    ax = np.abs(X) - 0.1
    phase = (Y - 0.45 * ax + 0.35 * ax**2 - anat["rib_phase"]) / anat["rib_gap"] + 0.15 * cv.smooth_noise(6)
    ribs = _sigmoid((np.cos(2 * np.pi * phase) - 0.55) * 8) * _sigmoid((Y + 0.8) / 0.03)
    lung_value = lung_value + 0.06 * ribs

    # Pneumothorax: air without markings between the chest wall and the visceral pleura.
    ptx_line = np.zeros_like(img)
    if f.pneumothorax_side:
        g = geom[f.pneumothorax_side]
        top = g["cy"] - g["ry"]
        depth = anat["ptx_depth"] * np.clip((top + 1.1 * g["ry"] - Y) / (1.1 * g["ry"]), 0, 1) ** 0.7
        r_line = 1 - depth
        side_lung = lungs[0 if f.pneumothorax_side == "right" else 1]
        ptx = _sigmoid((g["r"] - r_line) / 0.015) * (depth > 0.01) * side_lung
        ptx_line = np.exp(-(((g["r"] - r_line) / 0.012) ** 2)) * (depth > 0.03) * side_lung
        lung_value = lung_value * (1 - ptx) + (0.02 + 0.03 * ribs) * ptx
        _note(regions, "pneumothorax", np.maximum(ptx, ptx_line))

    img = img * (1 - lung) + lung_value * lung
    img += 0.3 * ptx_line * lung

    # Mediastinum, spine, trachea, aortic knob.
    med = cv.box(0, -0.1, anat["medial_x"] + 0.02, 1.1)
    img = img * (1 - med) + 0.56 * med
    vert = _sigmoid((np.cos(2 * np.pi * (Y / 0.13)) + 0.6) * 4) * cv.box(0, 0, 0.075, 1.2)
    img += 0.10 * vert
    img -= 0.18 * cv.box(0.012 * Y, -0.72, 0.032, 0.4)
    img += 0.10 * cv.ellipse(0.14, -0.33, 0.09, 0.07)

    # Heart: the cardiothoracic ratio sets the width; it grows mostly to the patient's left.
    ctr = anat["ctr"]
    width = ctr * 2 * (anat["lung_cx"] + anat["lung_rx"])
    right_border = -0.14 - 0.25 * (width - 0.66)
    heart = cv.ellipse(right_border + width / 2, anat["heart_cy"], width / 2, 0.2 + 0.15 * width)
    heart *= _sigmoid((anat["diaphragm_y"] + 0.12 - Y) / cv.edge)
    img = img * (1 - heart) + 0.58 * heart
    if f.cardiomegaly:
        _note(regions, "cardiomegaly", heart)

    # Gastric bubble under the left hemidiaphragm, liver density under the right.
    img -= 0.12 * cv.ellipse(0.38, anat["diaphragm_y"] + 0.16, 0.13, 0.06)

    if f.effusion_side:
        sides = ("left", "right") if f.effusion_side == "bilateral" else (f.effusion_side,)
        height = 0.16 if f.effusion_size == "small" else 0.34
        for side in sides:
            g = geom[side]
            lateral = np.clip((X - g["cx"]) * _side_x(side) / g["rx"], -1, 1)
            # Meniscus: fluid climbs the lateral chest wall, hiding the costophrenic angle.
            level = g["base"] - height - 0.12 * (lateral + 1) / 2 * (1 + height)
            fluid = cv.below(level) * lungs[0 if side == "right" else 1]
            img = img * (1 - fluid) + (0.5 + 0.03 * cv.smooth_noise(3)) * fluid
            _note(regions, "effusion", fluid)

    if f.consolidation_side:
        g = geom[f.consolidation_side]
        cx, cy = g["cx"] + _side_x(f.consolidation_side) * 0.05, g["base"] - 0.3
        patch = np.exp(-2 * cv.radius(cx, cy, 0.2, 0.17) ** 2) * np.clip(0.8 + 0.35 * cv.smooth_noise(3.5), 0, 1.5)
        img += 0.26 * patch * lungs[0 if f.consolidation_side == "right" else 1]
        _note(
            regions,
            "consolidation",
            2 * np.exp(-2 * cv.radius(cx, cy, 0.2, 0.17) ** 2) * lungs[0 if f.consolidation_side == "right" else 1],
        )

    if f.nodule_lobe:
        side, level = f.nodule_lobe.split()
        g = geom[side]
        ny = g["cy"] - 0.35 * g["ry"] if level == "upper" else g["cy"] + 0.35 * g["ry"]
        nx = g["cx"] + _side_x(side) * anat["nodule_dx"]
        rad = 0.04 * f.nodule_cm + 0.015
        img += 0.3 * cv.ellipse(nx, ny, rad, rad)
        _note(regions, "nodule", cv.ellipse(nx, ny, rad, rad))

    if f.device == "catheter":
        tip = (-0.1, -0.18)
        path = _bezier((-0.3, -1.05), (-0.16, -0.65), tip, 14)
        img += 0.45 * cv.polyline(path, 0.016)
        _note(regions, "device", cv.polyline(path, 0.016))
    elif f.device == "pacemaker":
        box = (0.55, -0.52)
        img += 0.55 * cv.box(*box, 0.1, 0.065)
        _note(regions, "device", cv.box(*box, 0.1, 0.065))
        for end, bend in (((-0.04, 0.12), (0.2, -0.55)), ((0.16, 0.36), (0.3, -0.3))):
            img += 0.45 * cv.polyline(_bezier(box, bend, end, 14), 0.012)
            _note(regions, "device", cv.polyline(_bezier(box, bend, end, 14), 0.012))
    return img


def _render_lateral(cv: _Canvas, f: Findings, anat: dict, regions: Optional[dict] = None) -> np.ndarray:
    X, Y = cv.X, cv.Y
    img = np.full(X.shape, 0.04, dtype=np.float32)
    body = np.clip(cv.ellipse(0.05, 0.15, 0.8, 1.1) + cv.box(0.05, -0.95, 0.3, 0.2), 0, 1)
    img = img * (1 - body) + 0.48 * body
    img += 0.12 * cv.ellipse(0.1, -0.9, 0.5, 0.18)  # arms and shoulders overlap the apex

    # One lung field (both lungs superimposed); diaphragm slopes down posteriorly.
    lx, ly, lrx, lry = 0.05, -0.05, 0.58, 0.66
    r = cv.radius(lx, ly, lrx, lry)
    field = _sigmoid((1 - r) * lrx / cv.edge)
    dia = anat["diaphragm_y"] + 0.18 * X - 0.08 * (1 - X**2)
    lung = field * (1 - cv.below(dia))
    markings = 0.4 * cv.smooth_noise(1.3) + 0.8 * cv.ellipse(0.05, -0.02, 0.14, 0.14)
    lung_value = anat["lung_dark"] + 0.05 + 0.05 * markings

    if f.pneumothorax_side:
        top = ly - lry
        depth = anat["ptx_depth"] * np.clip((top + 0.6 * lry - Y) / (0.6 * lry), 0, 1)
        ptx = _sigmoid((r - (1 - depth)) / 0.015) * (depth > 0.01)
        lung_value = lung_value * (1 - ptx) + 0.05 * ptx
        img += 0.0
        line = np.exp(-(((r - (1 - depth)) / 0.012) ** 2)) * (depth > 0.03)
        _note(regions, "pneumothorax", np.maximum(ptx, line) * lung)
    else:
        line = 0.0
    img = img * (1 - lung) + lung_value * lung
    img += 0.2 * line * lung

    # Spine (vertebral bodies) posteriorly, sternum anteriorly, trachea.
    spine = cv.box(0.62, 0.1, 0.09, 1.2)
    discs = _sigmoid((np.cos(2 * np.pi * Y / 0.15) + 0.7) * 5)
    img = img * (1 - spine) + (0.55 + 0.12 * discs) * spine
    img += 0.12 * cv.box(-0.64 + 0.05 * Y, 0.0, 0.03, 0.55)
    img -= 0.15 * cv.polyline([(0.0, -1.1), (0.08, -0.25)], 0.04)

    ctr = anat["ctr"]
    grow = (ctr - 0.45) * 1.6
    heart = cv.ellipse(-0.2 + 0.3 * grow, anat["heart_cy"] + 0.02, 0.3 + 0.5 * grow, 0.26 + 0.3 * grow)
    heart *= _sigmoid((dia + 0.1 - Y) / cv.edge)
    img = img * (1 - heart) + 0.56 * heart
    if f.cardiomegaly:
        _note(regions, "cardiomegaly", heart)

    if f.effusion_side:
        both = f.effusion_side == "bilateral"
        height = (0.16 if f.effusion_size == "small" else 0.32) * (1.25 if both else 1.0)
        level = dia - height - 0.25 * np.clip(X, 0, 1)  # fluid collects in the posterior sulcus
        fluid = cv.below(level) * lung * _sigmoid((X - 0.05) / 0.08)
        img = img * (1 - fluid) + 0.5 * fluid
        _note(regions, "effusion", fluid)

    if f.consolidation_side:
        patch = np.exp(-2 * cv.radius(0.35, dia.mean() - 0.3, 0.2, 0.17) ** 2)
        img += 0.22 * patch * np.clip(0.8 + 0.35 * cv.smooth_noise(3.5), 0, 1.5) * lung
        _note(regions, "consolidation", 2 * patch * lung)

    if f.nodule_lobe:
        level = f.nodule_lobe.split()[1]
        ny = -0.35 if level == "upper" else 0.12
        nx = 0.05 if level == "upper" else 0.32
        rad = 0.04 * f.nodule_cm + 0.015
        img += 0.28 * cv.ellipse(nx, ny, rad, rad)
        _note(regions, "nodule", cv.ellipse(nx, ny, rad, rad))

    if f.device == "catheter":
        img += 0.45 * cv.polyline(_bezier((0.1, -1.05), (0.05, -0.6), (-0.05, -0.2), 12), 0.016)
        _note(regions, "device", cv.polyline(_bezier((0.1, -1.05), (0.05, -0.6), (-0.05, -0.2), 12), 0.016))
    elif f.device == "pacemaker":
        box = (-0.5, -0.48)
        img += 0.55 * cv.box(*box, 0.05, 0.08)
        _note(regions, "device", cv.box(*box, 0.05, 0.08))
        for end in ((-0.3, 0.12), (-0.18, 0.38)):
            img += 0.45 * cv.polyline(_bezier(box, (-0.3, -0.4), end, 12), 0.012)
            _note(regions, "device", cv.polyline(_bezier(box, (-0.3, -0.4), end, 12), 0.012))
    return img


def _finish(img: np.ndarray, cv: _Canvas, look: dict) -> np.ndarray:
    """Blur, contrast, gamma and noise of the imaging system; returns uint8 (H, W)."""
    img = _blur(img, 0.6)
    img = np.clip(img * look["contrast"] + look["brightness"], 0, 1) ** look["gamma"]
    img = img + look["noise"] * cv.rng.standard_normal(img.shape)
    return (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)


def _anatomy(f: Findings, rng: np.random.Generator) -> dict:
    ctr = {"": rng.uniform(0.40, 0.47), "mild": rng.uniform(0.56, 0.60), "moderate": rng.uniform(0.64, 0.70)}
    return {
        "lung_cx": rng.uniform(0.4, 0.44),
        "lung_cy": rng.uniform(-0.08, -0.03),
        "lung_rx": rng.uniform(0.29, 0.33),
        "lung_ry": rng.uniform(0.7, 0.75),
        "diaphragm_y": rng.uniform(0.46, 0.54),
        "dome": rng.uniform(0.1, 0.15),
        "medial_x": rng.uniform(0.1, 0.13),
        "lung_dark": rng.uniform(0.12, 0.18),
        "rib_gap": rng.uniform(0.15, 0.18),
        "rib_phase": rng.uniform(0, 0.16),
        "heart_cy": rng.uniform(0.17, 0.23),
        "ctr": ctr[f.cardiomegaly],
        "ptx_depth": rng.uniform(0.3, 0.4),
        "nodule_dx": rng.uniform(-0.06, 0.06),
    }


def render_study(
    f: Findings, size: int, rng: np.random.Generator, regions: Optional[tuple[dict, dict]] = None
) -> tuple[np.ndarray, np.ndarray]:
    """Frontal and lateral uint8 (size, size) images showing the findings ``f``.

    ``regions``: two dicts (frontal, lateral) that receive, per drawn finding of
    :data:`FINDINGS`, a bool (size, size) mask of where it was drawn. Asking for them draws
    the same random numbers and gives the same images.
    """
    anat = _anatomy(f, rng)
    look = {
        "contrast": rng.uniform(0.9, 1.15),
        "brightness": rng.uniform(-0.04, 0.04),
        "gamma": rng.uniform(0.85, 1.15),
        "noise": rng.uniform(0.01, 0.025),
    }
    views = []
    for view, render in enumerate((_render_frontal, _render_lateral)):
        cv = _Canvas(size, rng)
        views.append(_finish(render(cv, f, anat, None if regions is None else regions[view]), cv, look))
    return views[0], views[1]
