"""A picture of what a config does: each row one original image, then augmented versions of it."""

import numpy as np
from matplotlib.figure import Figure

from kcifar.augment import augment_once
from kcifar.fileio import atomic_path


def one_per_class(y, count):
    """Indices of the first image of each of the first `count` classes present."""
    classes = np.unique(y)[:count]
    return np.array([np.flatnonzero(y == c)[0] for c in classes])


def describe(cfg):
    """One line naming the preset's ranges and the extras."""
    g = cfg.geometry
    shift = f"{int(g.shift)} px" if g.shift >= 1 else f"{g.shift:g} of the side"
    parts = [f"rotation ±{g.rotation:g}°" if g.rotation else "", f"shift ±{shift}" if g.shift else "",
             f"shear ±{g.shear:g}°" if g.shear else "", f"zoom ±{g.zoom:g}" if g.zoom else "",
             "horizontal flip" if g.hflip else "", f"fill {g.fill}" if g.warps else "",
             f"cutout {cfg.cutout} px" if cfg.cutout else "", f"mixup α={cfg.mixup:g}" if cfg.mixup else "",
             f"cutmix α={cfg.cutmix:g}" if cfg.cutmix else ""]
    return ", ".join(p for p in parts if p) or "no augmentation"


def label_text(label, class_names):
    """Class name, or the two largest shares of a soft label ("cat .62" over "dog .38")."""
    top = np.argsort(label)[::-1][:2]
    if label[top[1]] < 0.005:
        return class_names[top[0]]
    return "\n".join(f"{class_names[k]} {label[k]:.2f}".replace(" 0.", " .") for k in top)


def preview(x, y, class_names, cfg, path, copies=7, seed=0):
    """Write a PNG grid: column 0 the originals, columns 1.. augmented draws; returns the path."""
    draws = [augment_once(x, y, len(class_names), cfg, seed=seed + k) for k in range(copies)]
    soft = cfg.mixup or cfg.cutmix
    fig = Figure(figsize=(1.35 * (copies + 1), (2.0 if soft else 1.7) * len(x) + 0.7))  # no pyplot, no backend
    axes = fig.subplots(len(x), copies + 1, squeeze=False)
    for row in range(len(x)):
        tiles = [(x[row], f"original\n{class_names[y[row]]}")]
        tiles += [(images[row], f"#{k + 1}" + (f"\n{label_text(labels[row], class_names)}" if soft else ""))
                  for k, (images, labels) in enumerate(draws)]
        for ax, (image, title) in zip(axes[row], tiles):
            ax.imshow(np.clip(image, 0, 255).astype(np.uint8), interpolation="nearest")
            ax.set_title(title, fontsize=7, fontweight="bold" if title.startswith("original") else "normal")
            ax.set_xticks([])
            ax.set_yticks([])
        for side in axes[row][0].spines.values():
            side.set(color="tab:blue", linewidth=2.5)
    fig.suptitle(f"preset {cfg.preset}, engine {cfg.engine}: {describe(cfg)}\n"
                 "left: original (blue frame); right: augmented draws", fontsize=9)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110)
    return path
