"""The report's figures: matplotlib (Agg, no display), each function draws one PNG from plain arrays.

Pure: arrays in, a file out; nothing here reads a run. `spine_ray.report.build` computes what to draw.
"""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")  # no display, no network: the report is built on headless machines
import matplotlib.patches  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402
import numpy as np  # noqa: E402

PRED_COLOUR, GT_COLOUR, PROJ_COLOUR = "#ff3030", "#30ff60", "#30a0ff"


def _save(fig: plt.Figure, path: str) -> str:
    fig.savefig(path, dpi=90, bbox_inches="tight")
    plt.close(fig)
    return path


def confusion(counts: np.ndarray, labels: Sequence[str], title: str, path: str) -> str:
    """A 3 × 3 confusion matrix: row-normalised colour, count and row share in each cell."""
    counts = np.asarray(counts, dtype=np.float64)
    share = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(3.4, 3.0))
    ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    for i in range(len(labels)):
        for j in range(len(labels)):
            ax.text(j, i, f"{int(counts[i, j])}\n{share[i, j]:.0%}", ha="center", va="center", fontsize=8, color="white" if share[i, j] > 0.6 else "black")
    ax.set_xticks(range(len(labels)), labels, fontsize=7)
    ax.set_yticks(range(len(labels)), labels, fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=8)
    return _save(fig, path)


def reliability(curves: dict[str, list[tuple[np.ndarray, np.ndarray, np.ndarray]]], grades: Sequence[str], path: str) -> str:
    """Reliability diagrams, one panel per grade: {curve name: [(mean p, observed rate, count) per grade]}."""
    fig, axes = plt.subplots(1, len(grades), figsize=(3.2 * len(grades), 3.0))
    for g, ax in enumerate(axes):
        ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--")
        for name, per_grade in curves.items():
            p, rate, n = per_grade[g]
            keep = n > 0
            ax.plot(p[keep], rate[keep], marker="o", ms=3, label=name)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_title(grades[g], fontsize=9)
        ax.set_xlabel("predicted probability")
    axes[0].set_ylabel("observed frequency")
    axes[0].legend(fontsize=7)
    return _save(fig, path)


def histograms(values: dict[str, np.ndarray], xlabel: str, path: str, bins: int = 20) -> str:
    """One histogram per named series, side by side."""
    fig, axes = plt.subplots(1, len(values), figsize=(3.2 * len(values), 2.6), squeeze=False)
    for ax, (name, v) in zip(axes[0], values.items(), strict=True):
        v = np.asarray(v, dtype=np.float64)
        v = v[np.isfinite(v)]
        ax.hist(v, bins=bins if len(v) else 1, color="#4a78b0")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel(xlabel)
    return _save(fig, path)


def curves(series: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]], path: str) -> str:
    """Panels of lines: {panel title: {line name: (x, y)}}."""
    columns = min(4, len(series))
    rows = -(-len(series) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(3.6 * columns, 2.9 * rows), squeeze=False)
    for ax in axes.ravel()[len(series):]:
        ax.axis("off")
    for ax, (title, lines) in zip(axes.ravel(), series.items(), strict=False):
        for name, (x, y) in lines.items():
            ax.plot(x, y, marker="o", ms=3, lw=1, label=name)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        if lines:
            ax.legend(fontsize=6)
    fig.tight_layout()
    return _save(fig, path)


def timeline(bars: Sequence[tuple[int, float, float, str, str]], path: str) -> str:
    """One row per slot, one bar per job: (slot, start s, end s, colour group, label); a legend per group."""
    span = max((b[2] for b in bars), default=0.0)
    unit, per = ("hours", 3600.0) if span > 2 * 3600 else ("minutes", 60.0)
    bars = [(slot, start / per, end / per, group, label) for slot, start, end, group, label in bars]
    groups = sorted({g for *_, g, _ in bars})
    colours = {g: plt.get_cmap("tab10")(i % 10) for i, g in enumerate(groups)}
    slots = 1 + max((b[0] for b in bars), default=0)
    fig, ax = plt.subplots(figsize=(9.0, 0.9 + 0.32 * slots))
    for slot, start, end, group, label in bars:
        ax.barh(slot, end - start, left=start, height=0.8, color=colours[group], edgecolor="white", linewidth=0.5)
        if len(bars) <= 80:
            ax.text(start + (end - start) / 2, slot, label, ha="center", va="center", fontsize=5, clip_on=True)
    ax.set_yticks(range(slots), [f"slot {i}" for i in range(slots)], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel(f"{unit} since the first fold started")
    ax.legend(handles=[matplotlib.patches.Patch(color=colours[g], label=g) for g in groups], fontsize=7, loc="lower left",
              bbox_to_anchor=(0.0, 1.0), ncols=min(len(groups), 5), frameon=False)
    return _save(fig, path)


def to_rgb(image: np.ndarray, scale: int = 1) -> np.ndarray:
    """A slice [H, W] → uint8 RGB [H·scale, W·scale, 3], windowed to its 1st–99th percentile."""
    img = np.asarray(image, dtype=np.float64)
    lo, hi = np.percentile(img, [1, 99]) if img.size else (0.0, 1.0)
    g = np.clip((img - lo) / max(hi - lo, 1e-9), 0, 1) * 255
    g = np.repeat(np.repeat(g.astype(np.uint8), scale, axis=0), scale, axis=1)
    return np.stack([g, g, g], axis=-1)


def _hex(colour: str) -> np.ndarray:
    return np.array([int(colour[i : i + 2], 16) for i in (1, 3, 5)], dtype=np.uint8)


def draw_points(rgb: np.ndarray, points: np.ndarray, kind: str, scale: int = 1) -> np.ndarray:
    """Rasterise markers into rgb in place at pixel (row, col) of the unscaled slice: 'pred' a red ×,
    'gt' a green ring, 'proj' a blue square outline. Drawn into the pixels, so a test can find them."""
    colour = _hex({"pred": PRED_COLOUR, "gt": GT_COLOUR, "proj": PROJ_COLOUR}[kind])
    h, w = rgb.shape[:2]
    r = max(3, 2 * scale)
    d = np.arange(-r, r + 1)
    for row, col in np.asarray(points, dtype=np.float64).reshape(-1, 2):
        if not (np.isfinite(row) and np.isfinite(col)):
            continue
        # The centre of native pixel (row, col) in the scaled image.
        cy, cx = int(round((row + 0.5) * scale - 0.5)), int(round((col + 0.5) * scale - 0.5))
        if kind == "pred":
            ys, xs = np.r_[cy + d, cy + d], np.r_[cx + d, cx - d]
        elif kind == "gt":
            t = np.linspace(0, 2 * np.pi, 16 * r, endpoint=False)
            ys, xs = np.rint(cy + (r + 1) * np.sin(t)).astype(int), np.rint(cx + (r + 1) * np.cos(t)).astype(int)
        else:
            ys = np.r_[np.full_like(d, cy - r), np.full_like(d, cy + r), cy + d, cy + d]
            xs = np.r_[cx + d, cx + d, np.full_like(d, cx - r), np.full_like(d, cx + r)]
        ok = (ys >= 0) & (ys < h) & (xs >= 0) & (xs < w)
        rgb[ys[ok], xs[ok]] = colour
    return rgb


def overlay(image: np.ndarray, pred=(), gt=(), proj=(), scale: int = 1) -> np.ndarray:
    """A slice with its points drawn (ground truth first, so the prediction stays visible on top)."""
    rgb = to_rgb(image, scale)
    for kind, pts in (("gt", gt), ("proj", proj), ("pred", pred)):
        draw_points(rgb, np.asarray(pts, dtype=np.float64).reshape(-1, 2), kind, scale)
    return rgb


def overlay_panels(panels: list[dict], path: str, columns: int = 5) -> str:
    """A grid of drawn slices: each panel {rgb [H, W, 3] from `overlay`, title}."""
    rows = -(-len(panels) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(2.4 * columns, 2.6 * rows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, p in zip(axes.ravel(), panels, strict=False):
        ax.imshow(p["rgb"], interpolation="nearest")
        ax.set_title(p["title"], fontsize=7)
    return _save(fig, path)


def crops_attention(crops: np.ndarray, attention: np.ndarray, names: Sequence[str], title: str, path: str) -> str:
    """Stage-2 crops [T, S, H, W] with the attention over slices [T, S] written above each slice."""
    t, s = crops.shape[:2]
    fig, axes = plt.subplots(t, s, figsize=(1.2 * s, 1.3 * t), squeeze=False)
    for i in range(t):
        for k in range(s):
            ax = axes[i, k]
            ax.imshow(crops[i, k], cmap="gray", interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            # The slice the model weighs most gets a thick frame: where it looked.
            w = float(attention[i, k])
            for spine in ax.spines.values():
                spine.set_color(PRED_COLOUR if k == int(np.argmax(attention[i])) else "white")
                spine.set_linewidth(2.0 if k == int(np.argmax(attention[i])) else 0.5)
            ax.set_title(f"{w:.2f}", fontsize=6)
        axes[i, 0].set_ylabel(names[i], fontsize=6, rotation=0, ha="right", va="center")
    fig.suptitle(title, fontsize=8)
    return _save(fig, path)
