"""PNG overlays of segmentations on their source images, for a quick visual check of inference.

:class:`OverlayWriter` is an ignite handler for inference workflows: after each volume it reads
the original image named in the prediction's metadata, takes up to ``max_slices`` evenly spaced
slices along the last axis, draws the predicted labels in colour over the grey image and writes
one montage ``<case>_overlay.png`` (atomically: temporary file, then rename).
"""

from __future__ import annotations

import os

import numpy as np
from ignite.engine import Engine, Events

from .guards import atomic_write, ensure_writable_dir
from .metrics import source_case_name

__all__ = ["OverlayWriter", "overlay_montage"]

# background transparent; then red, green, blue, yellow, magenta, cyan, orange, purple
PALETTE = np.array([[0, 0, 0], [230, 25, 75], [60, 180, 75], [0, 130, 200], [255, 225, 25], [240, 50, 230],
                    [70, 240, 240], [245, 130, 48], [145, 30, 180]], np.uint8)


def overlay_montage(image: np.ndarray, labels: np.ndarray, max_slices: int = 8, alpha: float = 0.45) -> np.ndarray:
    """(H, W, D) image and labels -> (H, n*W, 3) uint8 montage of up to ``max_slices`` slices."""
    if image.shape != labels.shape:
        raise ValueError(f"overlay: image shape {image.shape} != label shape {labels.shape}")
    if image.ndim == 2:
        image, labels = image[..., None], labels[..., None]
    depth = image.shape[-1]
    picks = np.unique(np.linspace(0, depth - 1, min(max_slices, depth)).round().astype(int))
    lo, hi = np.percentile(image, [1, 99])
    grey = np.clip((image - lo) / max(hi - lo, 1e-8), 0, 1)
    tiles = []
    for k in picks:
        rgb = np.repeat(grey[..., k, None] * 255, 3, axis=-1)
        lab = np.clip(labels[..., k].astype(int), 0, len(PALETTE) - 1)
        mask = lab > 0
        rgb[mask] = (1 - alpha) * rgb[mask] + alpha * PALETTE[lab[mask]]
        tiles.append(rgb.astype(np.uint8))
    return np.concatenate(tiles, axis=1)


class OverlayWriter:
    """Write ``<output_dir>/<case>_overlay.png`` for each predicted volume.

    Args:
        output_dir: folder for the PNG files.
        pred_key: key of the (inverted, discrete) prediction in the decollated engine output.
        max_slices: slices per montage.
        data_root_dir: name the PNG after the source path relative to this folder (sub-folders
            kept), so that cases whose files share a name (MSSEG-2) do not overwrite each other;
            default: the file name alone.
    """

    def __init__(self, output_dir: str, pred_key: str = "pred", max_slices: int = 8,
                 data_root_dir: str | None = None) -> None:
        self.output_dir, self.pred_key, self.max_slices = output_dir, pred_key, max_slices
        self.data_root_dir = data_root_dir

    def attach(self, engine: Engine) -> None:
        ensure_writable_dir(self.output_dir)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        from monai.transforms import LoadImage
        from PIL import Image

        outputs = engine.state.output if isinstance(engine.state.output, list) else [engine.state.output]
        os.makedirs(self.output_dir, exist_ok=True)
        for out in outputs:
            pred = out[self.pred_key]
            src = pred.meta.get("filename_or_obj")
            image = LoadImage(image_only=True)(src)
            labels = np.asarray(pred.detach().cpu())[0]
            montage = overlay_montage(np.asarray(image), labels, self.max_slices)
            name = source_case_name(src, self.data_root_dir)
            path = os.path.join(self.output_dir, f"{name}_overlay.png")
            os.makedirs(os.path.dirname(path), exist_ok=True)
            atomic_write(path, lambda f, m=montage: Image.fromarray(m).save(f, format="PNG"), binary=True)
