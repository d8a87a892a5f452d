"""Confusion-matrix picture for ``rabbit eval`` (a plotting helper, not a run visualizer)."""
import numpy as np

from .plotting import pyplot, save_figure


def plot_confusion(matrix, path, title="confusion matrix"):
    plt = pyplot()
    size = max(4.0, min(12.0, 0.22 * matrix.shape[0] + 2))
    figure, axis = plt.subplots(figsize=(size, size))
    rows = matrix.sum(axis=1, keepdims=True)
    normalised = np.divide(matrix, rows, out=np.zeros(matrix.shape, dtype=float), where=rows > 0)
    image = axis.imshow(normalised, cmap="Blues", vmin=0, vmax=1)
    axis.set_xlabel("predicted class")
    axis.set_ylabel("true class")
    axis.set_title(title)
    figure.colorbar(image, ax=axis, fraction=0.046, pad=0.04)
    return save_figure(figure, path)
