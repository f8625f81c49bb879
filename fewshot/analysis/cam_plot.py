"""The CAM grid: one row per image; the image, then one column per conv layer of each network."""

from __future__ import annotations

from pathlib import Path

from torch import Tensor

from fewshot.analysis.cam import CAMs
from fewshot.io import atomic_write

__all__ = ["plot_cam_grid"]


def _image(pixels: Tensor):
    """``C x H x W`` uint8 -> what ``imshow`` takes (grey for one channel)."""
    return pixels[0].numpy() if pixels.shape[0] == 1 else pixels.permute(1, 2, 0).numpy()


def plot_cam_grid(pixels: Tensor, targets: list[int], cams: list[tuple[str, CAMs]], path: str | Path) -> Path:
    """Rows: images (``pixels``, uint8 ``N x C x H x W``); columns: the image, then each network's layers,
    its CAM over the grey image. ``cams``: ``(label, CAMs)`` per network. Titles mark wrong predictions."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = 1 + sum(len(c.layers) for _, c in cams)
    rows = pixels.shape[0]
    fig, axes = plt.subplots(rows, columns, figsize=(1.3 * columns, 1.3 * rows + 0.6), squeeze=False)
    for r in range(rows):
        axes[r, 0].imshow(_image(pixels[r]), cmap="gray")
        axes[r, 0].set_ylabel(f"class {targets[r]}", fontsize=7)
        col = 1
        for label, c in cams:
            mark = "" if int(c.classes[r]) == targets[r] else " (wrong)"
            for k, layer in enumerate(c.layers):
                ax = axes[r, col]
                ax.imshow(_image(pixels[r]), cmap="gray")
                ax.imshow(c.maps[r, k].numpy(), cmap="jet", alpha=0.5, vmin=0.0, vmax=1.0)
                if r == 0:
                    ax.set_title(f"{label}\n{layer}", fontsize=6)
                if k == len(c.layers) - 1:
                    ax.set_xlabel(f"pred {int(c.classes[r])}{mark}", fontsize=6)
                col += 1
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    out = atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110), binary=True)
    plt.close(fig)
    return out
