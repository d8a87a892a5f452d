"""Shared matplotlib set-up: a headless backend and atomic PNG writes."""
import os
import pathlib


def pyplot():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def save_figure(figure, path):
    """Write a PNG via a temporary name, then close the figure."""
    path = pathlib.Path(path)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}.png")
    figure.savefig(tmp, dpi=110, bbox_inches="tight")
    os.replace(tmp, path)
    pyplot().close(figure)
    return path
