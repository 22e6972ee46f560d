"""The `realistic` lumbar spine: anatomy in patient millimetres, narrowed by the mechanisms that cause stenosis.

Same local frame as `phantom.Phantom` (u: towards patient left, v: posterior from the canal
centre line, w: along the spine, superior positive), but the curve bends harder below the
lumbosacral disc (the sacrum) and the column runs from the lower thoracic spine to the coccyx.
Sizes are drawn around published normal ranges (docs/synth.md cites them). Each of the 25
latent severities drives the mechanisms that narrow its structure, through `severity_fraction`:

- spinal canal: posterior disc bulge (from the front) and ligamentum flavum thickening (from
  behind) take the dural sac's AP diameter from ~13 mm towards ~3 mm; facet overgrowth takes
  some of its width; the cauda equina roots keep their size, so they crowd and the CSF between
  them disappears as the sac shrinks (the central-canal grading of Lee et al. 2011);
- lateral recess: the superior articular process advances on the traversing root, recess depth
  ~6 mm → ~1 mm (stenotic below ~3 mm, Ciric 1980; Bartynski & Lin 2003);
- neural foramen: the perineural fat around the exiting root is lost first transversely, then
  vertically, then the root is flattened (foraminal grading of Lee et al. 2010); disc height
  falls with it.
A few studies carry a degenerative slip at L4/L5 and, independently, a transitional segment.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from spine_ray.synth.phantom import N_LEVELS, random_rotation

# Tissue classes of the realistic phantom; `render.REALISTIC_CONTRAST` gives their intensities.
(AIR, SOFT, FAT, MUSCLE, MARROW, CORTEX, NUCLEUS, ANNULUS, CSF, NERVE, LIGAMENT, JOINT, BOWEL, VESSEL) = range(14)
N_TISSUES = 14
TEXTURED = (SOFT, FAT, MUSCLE, MARROW, BOWEL)
THORACIC_ABOVE = 3  # discs drawn above L1/L2 (T10/T11 … T12/L1)
SACRAL_BELOW = 4  # rudimentary sacral discs drawn below the lumbosacral one
TRANSITIONAL = ("none", "lumbarised_s1", "sacralised_l5")


def severity_fraction(latent: np.ndarray) -> np.ndarray:
    """Remaining fraction (1 → 0) of a structure's normal size: ≈0.66 at the Moderate threshold, ≈0.18 at Severe."""
    return 1.0 / (1.0 + np.exp(2.2 * (np.asarray(latent, dtype=np.float64) - 0.3)))


@dataclass(frozen=True)
class Spine:
    """One study's spine, trunk and the per-disc narrowing; every array is over all drawn discs, top first."""

    disc_s: np.ndarray  # [D] w of each disc centre
    disc_h: np.ndarray  # [D] disc height (mm)
    labelled: np.ndarray  # [D] index into the 5 labelled discs, -1 for the others
    body_u: np.ndarray  # [D] half-width of the body above each disc
    body_v: np.ndarray  # [D] half-depth of the body above each disc
    bulge: np.ndarray  # [D] posterior disc bulge beyond the body margin (mm)
    sac_lost: np.ndarray  # [D] dural-sac AP lost to bulge + ligamentum flavum (mm)
    sac_width: np.ndarray  # [D, 2] fraction of the sac's half-width kept, left / right
    recess: np.ndarray  # [D, 2] lateral recess depth (mm), left / right
    fat_t: np.ndarray  # [D, 2] transverse perineural fat margin in the foramen (mm, < 0 squeezes the root)
    fat_v: np.ndarray  # [D, 2] vertical perineural fat margin (mm)
    hydration: np.ndarray  # [D] nucleus T2 brightness, 1 healthy → 0 dark
    slip: np.ndarray  # [D] anterior slip of everything above this disc (mm)
    sac_half_u: float
    sac_half_v: float
    foramen_u: float
    curvature: float
    sacral_bend: float
    s_sacrum: float  # w of the lumbosacral junction, below which the curve bends harder
    back: float  # v of the skin of the back
    trunk_u: float
    trunk_v: float
    subcut: float  # subcutaneous fat thickness (mm)
    waves: np.ndarray  # [K, 4] texture plane waves (kx, ky, kz, phase) in patient mm
    rotation: np.ndarray
    origin: np.ndarray
    transitional: str

    # --- the frame -----------------------------------------------------------------------
    def _curve(self, s: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Curve point (y, z) and unit tangent (ty, tz) at parameter s (z = s)."""
        m = np.minimum(s - self.s_sacrum, 0.0)
        y = self.curvature * s * s + self.sacral_bend * m * m
        dy = 2 * self.curvature * s + 2 * self.sacral_bend * m
        inv = 1 / np.sqrt(1 + dy * dy)
        return y, s, dy * inv, inv

    def to_patient(self, local: np.ndarray) -> np.ndarray:
        """Local (u, v, w) points [..., 3] → patient coordinates [..., 3]."""
        u, v, w = local[..., 0], local[..., 1], local[..., 2]
        cy, cz, ty, tz = self._curve(w)
        p = np.stack([u, cy + v * tz, cz - v * ty], axis=-1)
        return p @ self.rotation.T + self.origin

    def to_local(self, points: np.ndarray) -> np.ndarray:
        """Patient points [..., 3] → local (u, v, w) [..., 3] (Newton steps onto the curve)."""
        p = (points - self.origin) @ self.rotation
        x, y, z = p[..., 0], p[..., 1], p[..., 2]
        s = z
        for _ in range(3):  # the sacral bend needs more than one step
            cy, cz, ty, tz = self._curve(s)
            s = s + ((y - cy) * ty + (z - cz) * tz) * tz
        cy, cz, ty, tz = self._curve(s)
        v = (y - cy) * tz - (z - cz) * ty
        return np.stack([x, v, s], axis=-1)

    def _lumbar(self, level: int) -> int:
        return int(np.flatnonzero(self.labelled == level)[0])

    def disc_point(self, level: int, u: float = 0.0, v: float = 0.0, dw: float = 0.0) -> np.ndarray:
        """Patient point at local offset (u, v, dw) from a labelled disc's canal centre."""
        return self.to_patient(np.array([u, v, self.disc_s[self._lumbar(level)] + dw]))

    def disc_tangent(self, level: int) -> np.ndarray:
        """Unit superior tangent of the spine at a labelled disc, in patient coordinates."""
        _, _, ty, tz = self._curve(np.asarray(self.disc_s[self._lumbar(level)]))
        return self.rotation @ np.array([0.0, float(ty), float(tz)])

    def target_points(self) -> dict[tuple[int, int], np.ndarray]:
        """Where a reader marks each (condition, level): the narrowest point of its structure."""
        pts = {}
        for lv in range(N_LEVELS):
            d = self._lumbar(lv)
            a, b = self._sac_walls(d)
            pts[(0, lv)] = self.disc_point(lv, v=(a + b) / 2)
            for c, side in ((1, 1.0), (2, -1.0)):
                pts[(c, lv)] = self.disc_point(lv, u=side * self.foramen_u, v=-self.sac_half_v + 3.0, dw=self.disc_h[d] / 2 + 4.0)
            for c, j in ((3, 0), (4, 1)):
                side = 1.0 if j == 0 else -1.0
                su = self.sac_half_u * self.sac_width[d, j]
                pts[(c, lv)] = self.disc_point(lv, u=side * (su + 1.0), v=a + self.recess[d, j] / 2)
        return pts

    def _sac_walls(self, d: int | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Anterior and posterior wall (v) of the dural sac at disc d's level."""
        lost = self.sac_lost[d]
        return -self.sac_half_v + 0.55 * lost, self.sac_half_v - 0.45 * lost

    def texture(self, points: np.ndarray, coarse: bool = False) -> np.ndarray:
        """Band-limited 3D texture, about [-1, 1], at patient points [..., 3]: fine (marrow, muscle) or coarse (bowel)."""
        k = self.waves[8:] if coarse else self.waves[:8]
        k = k.astype(np.float32)
        phase = points.astype(np.float32) @ k[:, :3].T + k[:, 3]
        return np.cos(phase).mean(axis=-1) * np.float32(np.sqrt(2.0))

    # --- the tissues -----------------------------------------------------------------------
    def sample(self, points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Tissue class uint8 [...] and intensity modulation float32 [...] (texture, disc hydration) at patient points."""
        points = np.asarray(points, dtype=np.float64)
        loc = self.to_local(points).astype(np.float32)
        u, v, w = loc[..., 0], loc[..., 1], loc[..., 2]
        au = np.abs(u)
        out = np.full(u.shape, AIR, dtype=np.uint8)
        # Trunk in the phantom's straight frame (the back follows the lordosis only partly):
        # skin, subcutaneous fat, retroperitoneal and mesenteric fat with bowel loops and gas.
        p = ((points - self.origin) @ self.rotation).astype(np.float32)
        cy = self._curve(p[..., 2])[0].astype(np.float32)
        yt = p[..., 1] - 0.5 * cy
        vc = self.back - self.trunk_v
        r_trunk = (p[..., 0] / self.trunk_u) ** 2 + ((yt - vc) / self.trunk_v) ** 2
        ri = (p[..., 0] / (self.trunk_u - self.subcut)) ** 2 + ((yt - vc) / (self.trunk_v - self.subcut * 0.8)) ** 2
        out[r_trunk < 1.0] = FAT
        out[(ri < 1.0) & (ri > 0.93)] = MUSCLE  # abdominal wall
        coarse = np.zeros(u.shape, np.float32)
        inner = ri < 0.93
        coarse[inner] = self.texture(points[inner], coarse=True)  # only the abdomen uses it
        front = -self.sac_half_v - 2 * float(self.body_v.mean()) - 4.0
        retro = (u / 48.0) ** 2 + ((v - front + 2.0) / 14.0) ** 2 < 1.0
        out[ri < 0.93] = SOFT  # flanks: kidneys, colon, liver
        out[(ri < 0.93) & retro] = FAT
        abdomen = (ri < 0.93) & ~retro & (v < front + 20.0 - 30.0 * (u / 70.0) ** 2)
        out[abdomen & (coarse > -0.55)] = BOWEL
        out[abdomen & (np.abs(coarse - 0.2) < 0.12)] = SOFT  # bowel walls
        out[abdomen & (coarse > 0.8)] = AIR
        # Muscles: erector spinae / multifidus behind, psoas beside the bodies (growing caudally).
        depth = (self.back - self.subcut - self.sac_half_v - 6.0) / 2
        back_m = ((au - 28.0) / 30.0) ** 2 + ((v - (self.sac_half_v + 6.0 + depth)) / depth) ** 2 < 1.0
        out[back_m & (ri < 0.97)] = MUSCLE
        psoas_r = np.clip(6.0 + 0.1 * (self.disc_s[THORACIC_ABOVE] + 20.0 - w), 3.0, 17.0)
        psoas = ((au - 30.0 - 0.4 * psoas_r) / psoas_r) ** 2 + ((v + self.sac_half_v + 16.0) / (0.85 * psoas_r)) ** 2 < 1.0
        out[psoas & (ri < 0.93) & (w > self.s_sacrum - 10.0)] = MUSCLE
        # Great vessels: aorta left of the midline above its bifurcation at L4, IVC right.
        bif = self.disc_s[THORACIC_ABOVE + 3] + 12.0
        bodyfront = -self.sac_half_v - 1.0 - 2 * self.body_v.max()
        out[((u - 14.0) ** 2 + (v - bodyfront + 11.0) ** 2 < 81.0) & (w > bif)] = VESSEL
        out[(((u + 18.0) / 11.0) ** 2 + ((v - bodyfront + 9.0) / 7.0) ** 2 < 1.0) & (w > bif - 10.0)] = VESSEL
        for side in (1.0, -1.0):
            out[((u - side * 22.0) ** 2 + (v - bodyfront + 6.0) ** 2 < 36.0) & (w <= bif) & (w > self.s_sacrum - 30.0)] = VESSEL
        # The spine itself, only where it can be: a box around the column (cheap masks).
        box = (au < 60.0) & (v > bodyfront - 4.0) & (v < self.sac_half_v + 55.0) & (w > self.disc_s[-1] - 40.0)
        if box.any():
            idx = np.flatnonzero(box.ravel())
            sub, mod_sub = self._column(u.ravel()[idx], v.ravel()[idx], w.ravel()[idx], out.ravel()[idx])
            flat = out.ravel()
            flat[idx] = sub
            out = flat.reshape(u.shape)
        else:
            mod_sub = np.zeros(0, np.float32)
        mod = np.zeros(u.shape, np.float32)
        textured = np.isin(out, TEXTURED)
        mod[textured] = self.texture(points[textured])
        if box.any():
            m = mod.ravel()
            hydrated = out.ravel()[idx] == NUCLEUS
            m[idx[hydrated]] = mod_sub[hydrated]
            mod = m.reshape(u.shape)
        return out, mod

    def _column(self, u: np.ndarray, v: np.ndarray, w: np.ndarray, out: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Tissues of the vertebral column at local points [N] (painted over the trunk's `out`)."""
        out = out.copy()
        p = self._column_points(u, v, w)
        walls = self._canal_walls(p)
        # Each part is painted over the ones before it where they overlap, so the order matters.
        body = self._paint_bodies(p, out)
        disc, bulge = self._paint_discs(p, out)
        lf = self._paint_posterior_elements(p, walls, out)
        facet = self._paint_facets(p, walls, out)
        self._paint_foramina(p, out, bulge)
        sac = self._paint_canal(p, walls, out, body | disc | facet | lf)
        # Sacrum: fused segments, bone out to the alae.
        au, v, w, pw, sv = p.au, p.v, p.w, p.pw, p.sv
        ala = p.sacral & (au < 48.0) & (v > pw - 2 * float(self.body_v[-1]) + 6.0) & (v < sv + 12.0) & ~sac & (w > self.disc_s[-1] - 20.0)
        out[ala & ~body & ~disc] = MARROW
        mod = np.where(out == NUCLEUS, self.hydration[p.k], 0.0).astype(np.float32)
        return out, mod

    def _column_points(self, u: np.ndarray, v: np.ndarray, w: np.ndarray) -> _ColumnPoints:
        """Each point's nearest disc, its offset from it, and the body beside it (v moved by any slip above)."""
        au = np.abs(u)
        side = (u < 0).astype(np.intp)  # 0 = left (u > 0), 1 = right
        k = np.argmin(np.abs(w[:, None] - self.disc_s[None, :].astype(np.float32)), axis=1)
        dw = w - self.disc_s[k].astype(np.float32)
        # A slipped vertebra carries everything above its disc forwards.
        shift = (self.slip[None, :] / (1.0 + np.exp(-(w[:, None] - self.disc_s[None, :]) / 1.5))).sum(axis=1)
        v = v + shift.astype(np.float32)
        dh = self.disc_h[k].astype(np.float32)
        half = dh / 2
        above = dw > 0
        bu = np.where(above, self.body_u[k], self.body_u[np.minimum(k + 1, len(self.disc_s) - 1)]).astype(np.float32)
        bv = np.where(above, self.body_v[k], self.body_v[np.minimum(k + 1, len(self.disc_s) - 1)]).astype(np.float32)
        sv, su = np.float32(self.sac_half_v), np.float32(self.sac_half_u)
        pw = -sv - 1.0  # posterior wall of the bodies: 1 mm of anterior epidural space
        sacral = w < self.s_sacrum - 2.0
        bc = pw - bv + 2.0
        return _ColumnPoints(
            u=u, v=v, w=w, au=au, side=side, k=k, dw=dw, half=half,
            bu=bu, bv=bv, bc=bc, sv=sv, su=su, pw=pw, sacral=sacral,
        )

    def _canal_walls(self, p: _ColumnPoints) -> _CanalWalls:
        """The dural sac's walls and width and the superior articular processes' front at each point."""
        a, b = self._sac_walls(p.k)
        a = np.where(np.abs(p.dw) < p.half + 2.0, a, -p.sv).astype(np.float32)
        lf_zone = (p.dw > -p.half - 3.0) & (p.dw < p.half + 9.0)  # interlaminar window: ligamentum flavum, facets
        b = np.where(lf_zone, b, p.sv).astype(np.float32)
        recess = np.where(p.side == 0, self.recess[p.k, 0], self.recess[p.k, 1]).astype(np.float32)
        keep = np.where(p.side == 0, self.sac_width[p.k, 0], self.sac_width[p.k, 1]).astype(np.float32)
        su_eff = p.su * np.where(lf_zone, keep, 1.0).astype(np.float32)
        return _CanalWalls(a=a, b=b, lf_zone=lf_zone, su_eff=su_eff, sap_front=a + recess)

    def _paint_bodies(self, p: _ColumnPoints, out: np.ndarray) -> np.ndarray:
        """Paint the vertebral bodies (flat-backed ellipses: marrow, cortical rim, endplates) into `out`; returns their mask."""
        u, v, dw, half, bu, bv, bc, pw = p.u, p.v, p.dw, p.half, p.bu, p.bv, p.bc, p.pw
        rb = (u / bu) ** 2 + ((v - bc) / bv) ** 2
        body = (rb < 1.0) & (v < pw)
        body &= p.w > self.disc_s[-1] - 25.0
        out[body] = MARROW
        rim = body & ((rb > (1.0 - 2.4 / bv) ** 2) | (v > pw - 1.2) | (np.abs(dw) < half + 1.1))
        out[rim] = CORTEX
        return body

    def _paint_discs(self, p: _ColumnPoints, out: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Paint the biconvex discs (annulus, nucleus) into `out`; returns their mask and posterior bulge (mm)."""
        u, v, au, dw, half, bu, bv, bc, su, pw = p.u, p.v, p.au, p.dw, p.half, p.bu, p.bv, p.bc, p.su, p.pw
        rd = (u / (bu + 1.0)) ** 2 + ((v - bc) / (bv + 1.0)) ** 2
        bulge = self.bulge[p.k].astype(np.float32) * np.clip(1.0 - (au / (su + 6.0)) ** 4, 0.0, 1.0)
        in_disc_w = np.abs(dw) < half * (1.0 - 0.2 * np.minimum(rd, 1.0)) + 0.3
        disc = in_disc_w & (((rd < 1.0) & (v < pw)) | ((v >= pw - 0.1) & (v < pw + bulge) & (au < su + 8.0)))
        out[disc] = ANNULUS
        nuc = disc & (rd < 0.3) & (np.abs(dw) < 0.6 * half)
        out[nuc] = NUCLEUS
        return disc, bulge

    def _paint_posterior_elements(self, p: _ColumnPoints, walls: _CanalWalls, out: np.ndarray) -> np.ndarray:
        """Paint the laminae, spines, ligaments, pedicles and transverse processes into `out`; returns the flavum's mask."""
        v, au, dw, half, sv, su, pw, sacral = p.v, p.au, p.dw, p.half, p.sv, p.su, p.pw, p.sacral
        b, lf_zone = walls.b, walls.lf_zone
        fat_pad = 2.0 * (1.0 - self.sac_lost[p.k] / (2 * sv)).astype(np.float32)
        lamina_front = sv + 3.5 + 0.35 * au
        lamina = (~lf_zone) & (v > lamina_front) & (v < lamina_front + 7.0) & (au < su + 14.0)
        spinous = (au < 3.5) & (v > sv + 6.0) & (v < sv + 38.0) & (dw > half + 2.0) & (dw < half + 17.0)
        out[(lamina | spinous) & ~sacral] = MARROW
        out[((lamina & (v > lamina_front + 5.5)) | (spinous & (au > 2.3))) & ~sacral] = CORTEX
        out[(au < 1.2) & (v > sv + 8.0) & (v < sv + 38.0) & ~spinous & ~sacral] = LIGAMENT
        lf = lf_zone & (v > b + fat_pad + 0.35 * au) & (v < lamina_front + 1.5) & (au < su + 7.0)
        out[lf & ~sacral] = LIGAMENT
        # Pedicles (upper part of each body) and transverse processes.
        ped = (dw < -half - 2.5) & (dw > -half - 13.0) & (v > pw - 3.0) & (v < sv + 5.0)
        out[ped & (au > su - 1.0) & (au < su + 9.0) & ~sacral] = MARROW
        tp = (dw < -half - 4.0) & (dw > -half - 12.0) & (au >= su + 13.0) & (au < su + 34.0) & (np.abs(v - sv) < 3.5)
        out[tp & ~sacral] = CORTEX
        return lf

    def _paint_facets(self, p: _ColumnPoints, walls: _CanalWalls, out: np.ndarray) -> np.ndarray:
        """Paint the facets (superior articular process in front, inferior behind) into `out`; returns their mask."""
        v, au, su, sacral = p.v, p.au, p.su, p.sacral
        lf_zone, su_eff, sap_front = walls.lf_zone, walls.su_eff, walls.sap_front
        facet = lf_zone & (au > su_eff - 1.0) & (au < su + 15.0) & (v > sap_front) & (v < sap_front + 14.0)
        out[facet & ~sacral] = MARROW
        joint = facet & (np.abs((au - su - 5.0) - 0.8 * (v - sap_front - 6.0)) < 0.7)
        out[joint & ~sacral] = JOINT
        return facet

    def _paint_foramina(self, p: _ColumnPoints, out: np.ndarray, bulge: np.ndarray) -> None:
        """Paint the foramina into `out`: perineural fat around the exiting root, which fills the foramen as it shrinks."""
        v, au, dw, half, sv, pw, sacral, k = p.v, p.au, p.dw, p.half, p.sv, p.pw, p.sacral, p.k
        ft = np.where(p.side == 0, self.fat_t[k, 0], self.fat_t[k, 1]).astype(np.float32)
        fv = np.where(p.side == 0, self.fat_v[k, 0], self.fat_v[k, 1]).astype(np.float32)
        root_r = 2.4
        fu = np.float32(self.foramen_u)
        fc_v, fc_w = -sv + 3.0, half + 4.0
        lat = np.abs(au - fu) < 6.0
        # The foramen's walls: pedicles above and below, the articular processes behind, the
        # disc in front at its lower end; only the foramen itself holds fat.
        arch = lat & (v > pw - 0.5) & (v < sv + 6.0) & (dw > -half - 14.0) & (dw < half + 20.0)
        out[arch & ~sacral] = MARROW
        out[arch & ~sacral & (np.abs(dw) < half + 0.3) & (v < pw + 1.0 + 0.5 * bulge)] = ANNULUS
        fz = ((v - fc_v) / np.maximum(root_r + ft, 0.8)) ** 2 + ((dw - fc_w) / (root_r + fv + 3.0)) ** 2 < 1.0
        out[lat & fz & ~sacral] = FAT
        squash = np.clip((root_r + ft) / root_r, 0.35, 1.0)
        root = ((v - fc_v) / (root_r * squash)) ** 2 + ((dw - fc_w) / root_r) ** 2 < 1.0
        out[lat & fz & root & ~sacral] = NERVE

    def _paint_canal(self, p: _ColumnPoints, walls: _CanalWalls, out: np.ndarray, solid: np.ndarray) -> np.ndarray:
        """Paint the canal outside `solid` into `out`: epidural fat, dural sac and roots, lateral recesses; returns the sac's mask."""
        u, v, w, au, sv, su, sacral = p.u, p.v, p.w, p.au, p.sv, p.su, p.sacral
        a, b, lf_zone, su_eff, sap_front = walls.a, walls.b, walls.lf_zone, walls.su_eff, walls.sap_front
        # Epidural fat, then the dural sac between the bulge and the flavum.
        canal = (au < su + 2.0) & (v > a - 0.5) & (v < sv + 3.5) & ~solid
        out[canal & ~sacral] = FAT
        vcen, vh = (a + b) / 2, np.maximum((b - a) / 2, 0.6)
        sac = (u / su_eff) ** 2 + ((v - vcen) / vh) ** 2 < 1.0
        sac &= ~sacral | (w > self.s_sacrum - 30.0)
        # Lateral recess: CSF sleeve and traversing root between the disc and the articular process.
        rec = lf_zone & (au > su_eff - 3.0) & (au < su_eff + 1.5) & (v > a) & (v < sap_front)
        out[(sac | rec) & ~sacral] = CSF
        out[sacral & sac] = FAT
        out[rec & ((au - su_eff + 0.8) ** 2 + (v - (a + sap_front) / 2) ** 2 < 2.2)] = NERVE
        # Cauda equina: fixed-size roots laid dorsally in the sac, which crowd as it narrows; the
        # cord and conus above L1/L2.
        cord_top = self.disc_s[THORACIC_ABOVE] + 18.0
        cord_r = np.clip((w - cord_top) / 6.0 + 2.0, 0.0, 4.5)
        cord = (w > cord_top - 12.0) & (u**2 + (v - 0.15 * sv) ** 2 < cord_r**2)
        roots = np.zeros(u.shape, dtype=bool)
        for ru, rv in ((-0.55, 0.35), (-0.2, 0.55), (0.2, 0.55), (0.55, 0.35), (-0.35, 0.05), (0.35, 0.05), (0.0, 0.25)):
            roots |= (u - ru * su_eff) ** 2 + (v - (vcen + rv * vh)) ** 2 < 1.3
        out[sac & (roots | cord)] = NERVE
        return sac


@dataclass(frozen=True)
class _ColumnPoints:
    """Local points [N] near the column, placed against their nearest disc and the body beside it (float32)."""

    u: np.ndarray
    v: np.ndarray  # moved forwards by any slip above
    w: np.ndarray
    au: np.ndarray  # |u|
    side: np.ndarray  # 0 = left (u > 0), 1 = right
    k: np.ndarray  # index of the nearest disc
    dw: np.ndarray  # w from that disc's centre
    half: np.ndarray  # that disc's half-height
    bu: np.ndarray  # half-width of the body beside the point
    bv: np.ndarray  # half-depth of that body
    bc: np.ndarray  # v of that body's centre
    sv: np.float32  # dural sac half AP
    su: np.float32  # dural sac half-width
    pw: np.float32  # v of the bodies' posterior wall
    sacral: np.ndarray  # below the lumbosacral junction


@dataclass(frozen=True)
class _CanalWalls:
    """Where the canal's narrowing structures stand at each of the `_ColumnPoints` (float32)."""

    a: np.ndarray  # anterior wall of the dural sac (disc bulge)
    b: np.ndarray  # posterior wall (ligamentum flavum)
    lf_zone: np.ndarray  # in the interlaminar window: ligamentum flavum, facets
    su_eff: np.ndarray  # the sac's half-width, less what facet overgrowth takes
    sap_front: np.ndarray  # front of the superior articular process (a + lateral recess depth)


def sample_spine(latent: np.ndarray, rng: np.random.Generator) -> Spine:
    """A random spine whose 25 structures are narrowed according to latent severities [25]."""
    g = severity_fraction(np.asarray(latent).reshape(5, N_LEVELS))
    scale = rng.uniform(0.92, 1.1)
    t = rng.random()
    transitional = TRANSITIONAL[1] if t < 0.02 else TRANSITIONAL[2] if t < 0.04 else TRANSITIONAL[0]
    d = THORACIC_ABOVE + N_LEVELS + SACRAL_BELOW + (transitional == "lumbarised_s1")
    # Disc heights ~7 mm (T10/T11) to ~11 mm (L4/L5), thin sacral remnants; bodies 25–29 mm.
    dh = np.concatenate([
        rng.uniform(5.5, 7.0, THORACIC_ABOVE),
        np.linspace(8.5, 11.5, N_LEVELS) * rng.uniform(0.88, 1.12),
        [rng.uniform(4.0, 6.0)] if transitional == "lumbarised_s1" else [],
        np.full(SACRAL_BELOW, 1.2),
    ]) * scale
    n_upper = THORACIC_ABOVE + N_LEVELS + (transitional == "lumbarised_s1")
    vb = np.concatenate([rng.uniform(22.0, 25.0, THORACIC_ABOVE), rng.uniform(25.0, 29.0, d - THORACIC_ABOVE)]) * scale
    vb[n_upper:] = np.linspace(24.0, 14.0, d - n_upper) * scale
    labelled = np.full(d, -1)
    labelled[THORACIC_ABOVE : THORACIC_ABOVE + N_LEVELS] = np.arange(N_LEVELS)
    lss = THORACIC_ABOVE + N_LEVELS - 1  # index of the labelled L5/S1
    # Spinal: AP loss 0.7·AP0 at the worst; loss of disc height and nucleus signal with it.
    sv = rng.uniform(6.2, 8.0) * scale  # dural sac half AP: ~12–16 mm AP
    su = rng.uniform(7.5, 9.5) * scale  # dural sac half-width: area ≈ 150–200 mm² when normal
    lost = np.zeros(d)
    lost[labelled >= 0] = 0.8 * 2 * sv * (1 - g[0]) ** 0.8  # sac area ≈ 100 mm² at the Moderate threshold, ≈ 50 at Severe
    height_g = np.ones(d)
    height_g[labelled >= 0] = 0.55 + 0.45 * (g[0] + g[1] + g[2]) / 3
    dh = dh * height_g
    if transitional == "sacralised_l5":
        dh[lss] *= 0.4
    hydration = np.clip(rng.uniform(0.8, 1.0, d) * np.where(labelled >= 0, 0.25 + 0.75 * np.r_[np.ones(THORACIC_ABOVE), g[0], np.ones(d - lss - 1)], 1.0), 0.05, 1.0)
    hydration[n_upper:] = 0.6
    sac_width = np.ones((d, 2))
    recess = np.full((d, 2), 6.0)
    fat_t = np.full((d, 2), 2.5)
    fat_v = np.full((d, 2), 3.5)
    li = labelled >= 0
    sac_width[li, 0], sac_width[li, 1] = 0.7 + 0.3 * g[3], 0.7 + 0.3 * g[4]
    recess[li, 0], recess[li, 1] = 1.0 + 5.0 * g[3], 1.0 + 5.0 * g[4]
    # Foramina: transverse fat goes first (≈0 at the Moderate threshold), vertical fat next.
    fat_t[li, 0], fat_t[li, 1] = 5.9 * g[1] - 3.4, 5.9 * g[2] - 3.4
    fat_v[li, 0], fat_v[li, 1] = 4.2 * g[1] - 0.75, 4.2 * g[2] - 0.75
    slip = np.zeros(d)
    if rng.random() < 0.06 * (1.0 + 4.0 * (1 - g[0, 3])):
        slip[lss - 1] = 3.0 + 5.0 * (1 - g[0, 3])  # degenerative slip of L4 on L5 (Meyerding I)
    steps = (dh[:-1] + dh[1:]) / 2 + vb[1:]
    s = np.concatenate([[0.0], -np.cumsum(steps)])
    s = s - s[THORACIC_ABOVE + 2] + rng.uniform(-8, 8)  # L3/L4 near w = 0
    s_sacrum = float(s[n_upper - 1] - dh[n_upper - 1] / 2 - 1.0)
    body_u = np.concatenate([rng.uniform(17.0, 20.0, THORACIC_ABOVE), np.linspace(20.0, 25.0, d - THORACIC_ABOVE)]) * scale
    body_u[n_upper:] = np.linspace(24.0, 12.0, d - n_upper) * scale
    body_v = np.concatenate([rng.uniform(13.0, 15.0, THORACIC_ABOVE), np.full(d - THORACIC_ABOVE, rng.uniform(15.0, 17.5))]) * scale
    body_v[n_upper:] = np.linspace(16.0, 9.0, d - n_upper) * scale
    # Texture: 8 fine plane waves (2–6 mm, marrow trabeculae and muscle fibres), 8 coarse ones (bowel loops).
    direction = rng.standard_normal((16, 3))
    direction /= np.linalg.norm(direction, axis=1, keepdims=True)
    wavelength = np.concatenate([rng.uniform(2.0, 6.0, 8), rng.uniform(25.0, 60.0, 8)])
    waves = np.concatenate([direction * (2 * np.pi / wavelength)[:, None], rng.uniform(0, 2 * np.pi, (16, 1))], axis=1)
    trunk_u = rng.uniform(140.0, 185.0)
    return Spine(
        disc_s=s, disc_h=dh, labelled=labelled, body_u=body_u, body_v=body_v,
        bulge=1.0 + 0.55 * lost, sac_lost=lost, sac_width=sac_width, recess=recess,
        fat_t=fat_t, fat_v=fat_v, hydration=hydration, slip=slip,
        sac_half_u=su, sac_half_v=sv, foramen_u=su + 9.0 * scale,
        curvature=rng.uniform(0.0003, 0.0007), sacral_bend=rng.uniform(0.0025, 0.0045), s_sacrum=s_sacrum,
        back=rng.uniform(55.0, 85.0), trunk_u=trunk_u, trunk_v=rng.uniform(105.0, 135.0) * trunk_u / 160.0,
        subcut=rng.uniform(8.0, 30.0), waves=waves,
        rotation=random_rotation(rng, (6.0, 3.0, 4.0)),
        origin=np.array([rng.normal(0, 4), rng.normal(0, 6), rng.normal(0, 8)]),
        transitional=transitional,
    )


def measure_level(spine: Spine, level: int, step: float = 0.25) -> dict[str, float]:
    """Radiological measurements of one labelled level from the tissue map, as a reader would take them.

    Dural-sac AP (mm, midline, at the disc) and cross-sectional area (mm², axial plane through the
    disc); lateral-recess depth (mm, left and right: disc margin to superior articular process);
    perineural fat and exiting-root area in each foramen (mm², parasagittal plane through it).
    """
    d = spine._lumbar(level)
    s0, half = float(spine.disc_s[d]), float(spine.disc_h[d]) / 2
    g = np.arange(-30.0, 30.0, step)
    u, v = np.meshgrid(g, g)
    axial, _ = spine.sample(spine.to_patient(np.stack([u, v, np.full_like(u, s0)], -1)))
    dural = np.isin(axial, (CSF, NERVE)) & (np.abs(u) < spine.sac_half_u + 1.0)
    mid = dural[:, np.argmin(np.abs(g))]
    out = {"sac_ap_mm": float(mid.sum() * step), "sac_area_mm2": float(dural.sum() * step * step)}
    a, _ = spine._sac_walls(d)
    for j, name in ((0, "left"), (1, "right")):
        side = 1.0 if j == 0 else -1.0
        su = spine.sac_half_u * spine.sac_width[d, j]
        vv = np.arange(a - 3.0, a + 12.0, step)
        line, _ = spine.sample(spine.to_patient(np.stack([np.full_like(vv, side * (su + 0.5)), vv, np.full_like(vv, s0)], -1)))
        bone = np.flatnonzero(np.isin(line, (MARROW, CORTEX)) & (vv > a))
        soft = np.flatnonzero(np.isin(line, (CSF, NERVE, FAT)) & (vv > a - 1.0))
        out[f"recess_{name}_mm"] = float(vv[bone[0]] - vv[soft[0]]) if len(bone) and len(soft) else 0.0
        vw, ww = np.meshgrid(np.arange(-spine.sac_half_v - 1.0, -spine.sac_half_v + 11.0, step), np.arange(s0 - half, s0 + half + 13.0, step))
        para, _ = spine.sample(spine.to_patient(np.stack([np.full_like(vw, side * spine.foramen_u), vw, ww], -1)))
        out[f"foramen_fat_{name}_mm2"] = float((para == FAT).sum() * step * step)
        out[f"foramen_root_{name}_mm2"] = float((para == NERVE).sum() * step * step)
    return out
