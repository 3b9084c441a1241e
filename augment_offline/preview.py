"""A PNG to look at: each row one training image, then its augmented copies."""

import cv2
import numpy as np

from kcifar.errors import KcifarError
from kcifar.fileio import write_bytes


def preview_grid(x, augmenter, copies: int, rows: int = 8, zoom: int = 4) -> np.ndarray:
    """RGB uint8 grid: row i = source image i (first column) and its copies 1..copies (at most 8),
    the same pixels the shards hold; a white 1-pixel frame around each image, then ``zoom`` x nearest."""
    sources = np.arange(min(rows, len(x)))
    columns = [x[sources]] + [augmenter.augment(x[sources], sources, np.full(len(sources), c))[0]
                              for c in range(1, min(copies, 8) + 1)]
    framed = [np.pad(column, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=255) for column in columns]
    grid = np.concatenate([np.concatenate(list(column), axis=0) for column in framed], axis=1)
    return cv2.resize(grid, None, fx=zoom, fy=zoom, interpolation=cv2.INTER_NEAREST)


def write_preview(path, x, augmenter, copies: int):
    ok, png = cv2.imencode(".png", cv2.cvtColor(preview_grid(x, augmenter, copies), cv2.COLOR_RGB2BGR))
    if not ok:
        raise KcifarError(f"OpenCV could not encode the preview for {path}")
    write_bytes(path, png.tobytes())
