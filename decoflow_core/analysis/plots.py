"""The one place figures are written: ``save_figure`` puts a PNG and a PDF into ``figures/``."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

FIGURES = Path(__file__).resolve().parents[2] / "figures"


def save_figure(fig, name: str, folder: str | Path | None = None) -> list[Path]:
    """Write ``fig`` as ``<folder>/<name>.png`` (150 dpi) and ``.pdf``; returns both paths."""
    folder = Path(folder) if folder else FIGURES
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"{name}.png", folder / f"{name}.pdf"]
    # fixed metadata so an unchanged figure gives an unchanged file
    fig.savefig(paths[0], dpi=150, bbox_inches="tight", metadata={"Software": None})
    fig.savefig(paths[1], bbox_inches="tight", metadata={"CreationDate": None, "Producer": None, "Creator": None})
    plt.close(fig)
    return paths


def heatmap(ax, matrix, labels, *, title: str, vmin=0.0, vmax=1.0, fmt="{:.2f}", cmap="viridis",
            xlabel="tested on task j", ylabel="after training task i"):
    """R[i][j]-style heatmap with the values written in the cells (NaN cells left blank)."""
    matrix = np.asarray(matrix, dtype=float)
    image = ax.imshow(np.ma.masked_invalid(matrix), vmin=vmin, vmax=vmax, cmap=cmap)
    ax.set_xticks(range(len(labels)), labels, rotation=90, fontsize=7)
    ax.set_yticks(range(len(labels)), labels, fontsize=7)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if len(labels) <= 16:
        for (i, j), value in np.ndenumerate(matrix):
            if not np.isnan(value):
                ax.text(j, i, fmt.format(value), ha="center", va="center", fontsize=5,
                        color="white" if value < (vmin + vmax) / 2 else "black")
    return image
