"""A 3D lumbar-spine phantom in patient coordinates (LPS, mm), evaluated at arbitrary points.

The spine follows a lordotic curve in the phantom's sagittal plane; every point is mapped to
local coordinates (u: towards patient left, v: towards posterior, from the canal centre line;
w: arc length along the curve, superior positive). Structures are ellipses and ellipsoids in
(u, v, w): vertebral bodies and the 5 discs L1/L2…L5/S1, the spinal canal behind them with two
lateral (subarticular) recesses, neural foramina on each side at each disc, posterior elements,
paraspinal muscle and subcutaneous fat. Each target's latent severity narrows its own structure
near its own disc: canal AP depth (spinal), recess size (subarticular), foramen (foraminal).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from spine_ray.synth.labels import narrowing

# Tissue classes; `render` gives each its intensity per sequence.
AIR, SOFT, FAT, MUSCLE, MARROW, BONE, DISC, CSF, NERVE = range(9)
N_TISSUES = 9
N_LEVELS = 5


@dataclass(frozen=True)
class Phantom:
    """Shape, size, curvature and pose of one study's lumbar spine, and its 25 narrowing factors."""

    disc_s: np.ndarray  # [5] arc length of each disc centre, L1/L2 first (superior, largest)
    disc_height: float
    curvature: float  # lordosis: v offset of the curve = curvature · s²  (1/mm)
    canal_half_u: float
    canal_half_v: float
    recess_r: float
    foramen_u: float
    foramen_r: float
    body_half_u: float
    body_half_v: float
    rotation: np.ndarray  # [3, 3] phantom → patient
    origin: np.ndarray  # [3] patient position of the curve point s = 0
    narrow: np.ndarray  # [5 conditions, 5 levels] remaining width fraction per target

    def to_patient(self, local: np.ndarray) -> np.ndarray:
        """Local (u, v, w) points [..., 3] → patient coordinates [..., 3]."""
        u, v, w = local[..., 0], local[..., 1], local[..., 2]
        cy, cz, ty, tz = self._curve(w)
        # The normal (posterior) direction at s is (ny, nz) = (tz, -ty).
        p = np.stack([u, cy + v * tz, cz - v * ty], axis=-1)
        return p @ self.rotation.T + self.origin

    def _curve(self, s: np.ndarray) -> tuple[np.ndarray, ...]:
        """Curve point (y, z) and unit tangent (ty, tz) at arc length s (parabola, small-angle exact enough)."""
        k = self.curvature
        s2 = s * s
        y = k * s2
        dy = 2 * k * s
        inv = 1 / np.sqrt(1 + dy * dy)
        # z from arc length: z ≈ s for the gentle curves used here, corrected to second order.
        z = s - (2 * k * k / 3) * s2 * s
        return y, z, dy * inv, inv

    def to_local(self, points: np.ndarray) -> np.ndarray:
        """Patient points [..., 3] → local (u, v, w) [..., 3] (one Newton step onto the curve)."""
        p = (points - self.origin) @ self.rotation
        x, y, z = p[..., 0], p[..., 1], p[..., 2]
        cy, cz, ty, tz = self._curve(z)
        s = z + (y - cy) * ty + (z - cz) * tz  # one Newton step: the curve is gentle
        cy, cz, ty, tz = self._curve(s)
        v = (y - cy) * tz - (z - cz) * ty
        return np.stack([x, v, s], axis=-1)

    def disc_point(self, level: int, u: float = 0.0, v: float = 0.0, dw: float = 0.0) -> np.ndarray:
        """Patient point at local offset (u, v, dw) from a disc's canal centre."""
        return self.to_patient(np.array([u, v, self.disc_s[level] + dw]))

    def disc_tangent(self, level: int) -> np.ndarray:
        """Unit superior tangent of the spine at a disc, in patient coordinates."""
        _, _, ty, tz = self._curve(np.asarray(self.disc_s[level]))
        return self.rotation @ np.array([0.0, float(ty), float(tz)])

    def target_points(self) -> dict[tuple[int, int], np.ndarray]:
        """Where each (condition, level) is annotated, in patient coordinates (inside the narrowed structure)."""
        pts = {}
        for lv in range(N_LEVELS):
            pts[(0, lv)] = self.disc_point(lv, v=self.canal_half_v * (1.0 - self.narrow[0][lv]))
            for c, side in ((1, 1.0), (2, -1.0)):
                pts[(c, lv)] = self.disc_point(lv, u=side * self.foramen_u, v=-1.0, dw=4.0)
            for c, side in ((3, 1.0), (4, -1.0)):
                half_u = self.canal_half_u * (0.4 + 0.6 * self.narrow[c][lv])
                pts[(c, lv)] = self.disc_point(lv, u=side * (half_u - 1.0), v=-0.45 * self.canal_half_v)
        return pts

    def tissue(self, points: np.ndarray) -> np.ndarray:
        """Tissue class of each patient point [..., 3] → uint8 [...]."""
        points = np.asarray(points, dtype=np.float32)  # sub-micrometre precision is plenty
        loc = self.to_local(points)
        u, v, w = loc[..., 0], loc[..., 1], loc[..., 2]
        p = (points - self.origin.astype(np.float32)) @ self.rotation.astype(np.float32)
        out = np.full(u.shape, AIR, dtype=np.uint8)
        # Trunk: an ellipse in the phantom's axial plane, fat rim, muscle behind the spine.
        bx, by = (p[..., 0] / 150.0), ((p[..., 1] + 40.0) / 115.0)
        r_body = bx**2 + by**2
        out[r_body < 1.0] = FAT
        out[r_body < 0.80] = SOFT
        out[((u / 45.0) ** 2 + ((v - 45.0) / 38.0) ** 2 < 1.0) & (r_body < 0.80)] = MUSCLE
        s_top, s_bot = self.disc_s[0] + 45.0, self.disc_s[-1] - 60.0
        column = (w < s_top) & (w > s_bot)
        # Nearest disc and the distance to it along the spine.
        dw_all = w[..., None] - self.disc_s.astype(np.float32)
        k = np.argmin(np.abs(dw_all), axis=-1)
        dw = np.take_along_axis(dw_all, k[..., None], axis=-1)[..., 0]
        # Posterior elements: lamina and pedicles around the canal.
        post = column & (np.abs(u) < 24.0) & (v > -2.0) & (v < self.canal_half_v + 16.0)
        out[post] = BONE
        # Vertebral bodies and discs.
        bv0 = -(self.canal_half_v + 2.0 + self.body_half_v)
        body = column & ((u / self.body_half_u) ** 2 + ((v - bv0) / self.body_half_v) ** 2 < 1.0)
        out[body] = MARROW
        out[body & (np.abs(dw) < self.disc_height / 2 + 1.0)] = BONE  # endplates
        out[body & (np.abs(dw) < self.disc_height / 2)] = DISC
        # Neural foramina: fat-filled, with the exiting nerve root in their upper part.
        for c, side in ((1, 1.0), (2, -1.0)):
            g = self.narrow[c][k]
            fr = self.foramen_r * g
            e = (
                ((u - side * self.foramen_u) / 6.0) ** 2
                + ((v + 1.0) / (0.7 * fr + 0.5)) ** 2
                + ((dw - 4.0) / (fr + 0.8)) ** 2
            )
            out[column & (e < 1.0)] = FAT
            root = ((u - side * self.foramen_u) / 7.0) ** 2 + ((v + 1.0) / 1.6) ** 2 + ((dw - 4.0 - 0.4 * fr) / 1.6) ** 2
            out[column & (root < 1.0) & (e < 1.0)] = NERVE
        # Spinal canal: AP depth shrinks near a stenotic disc (disc bulge from the front); each
        # lateral half narrows with its recess (facet overgrowth from the side).
        bump = np.exp(-((dw / 8.0) ** 2))
        gs = 1.0 - (1.0 - self.narrow[0][k]) * bump
        half_v = self.canal_half_v * gs
        centre_v = self.canal_half_v * (1.0 - gs)  # the anterior wall moves back
        g_left = 1.0 - (1.0 - self.narrow[3][k]) * bump
        g_right = 1.0 - (1.0 - self.narrow[4][k]) * bump
        half_u = self.canal_half_u * np.where(u > 0, 0.4 + 0.6 * g_left, 0.4 + 0.6 * g_right)
        canal = ((u / half_u) ** 2 + ((v - centre_v) / half_v) ** 2) < 1.0
        # Lateral recesses: lobes at the canal's anterolateral corners, shrinking with severity.
        for side, gr in ((1.0, g_left), (-1.0, g_right)):
            rr = self.recess_r * gr
            lobe = ((u - side * (half_u - 1.0)) ** 2 + (v + 0.45 * self.canal_half_v) ** 2) < rr**2
            canal |= lobe
        out[canal] = CSF
        # Cauda equina: a few nerve roots in the dorsal canal.
        for du in (-3.0, 0.0, 3.0):
            out[canal & ((u - du) ** 2 + (v - 0.45 * self.canal_half_v) ** 2 < 1.0)] = NERVE
        return out


def random_rotation(rng: np.random.Generator, max_deg: tuple[float, float, float]) -> np.ndarray:
    """A small random rotation about x, y and z (degrees at most as given)."""
    ax, ay, az = (np.deg2rad(rng.uniform(-m, m)) for m in max_deg)
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def sample_phantom(latent: np.ndarray, rng: np.random.Generator) -> Phantom:
    """A random spine whose 25 structures are narrowed according to latent severities [25]."""
    scale = rng.uniform(0.9, 1.12)
    vb = rng.uniform(24.0, 29.0) * scale  # vertebral body height
    dh = rng.uniform(8.0, 11.0) * scale
    step = vb + dh
    # s = 0 at L3/L4 roughly; discs above positive.
    disc_s = np.array([2, 1, 0, -1, -2], dtype=np.float64) * step + rng.uniform(-8, 8)
    origin = np.array([rng.normal(0, 4), rng.normal(0, 6), rng.normal(0, 8)])
    return Phantom(
        disc_s=disc_s,
        disc_height=dh,
        curvature=rng.uniform(0.0006, 0.0016),
        canal_half_u=rng.uniform(10.0, 12.5) * scale,
        canal_half_v=rng.uniform(7.0, 8.5) * scale,
        recess_r=rng.uniform(3.5, 4.5) * scale,
        foramen_u=rng.uniform(19.0, 23.0) * scale,
        foramen_r=rng.uniform(6.0, 7.5) * scale,
        body_half_u=rng.uniform(20.0, 25.0) * scale,
        body_half_v=rng.uniform(14.0, 18.0) * scale,
        rotation=random_rotation(rng, (6.0, 3.0, 4.0)),
        origin=origin,
        narrow=narrowing(np.asarray(latent)).reshape(5, N_LEVELS),
    )
