"""The worst-classified test images of ``rabbit eval`` (a plotting helper, not a run visualizer)."""
import numpy as np

from .plotting import pyplot, save_figure


def worst_indices(probabilities, targets, count=20):
    """Indices of the ``count`` samples whose true class got the lowest probability, worst first."""
    true_probability = probabilities[np.arange(len(targets)), targets]
    return np.argsort(true_probability, kind="stable")[:count]


def _displayable(image):
    """CHW uint8 (or float) -> HWC (or HW) for imshow."""
    image = np.asarray(image)
    if image.ndim == 3:
        image = image[0] if image.shape[0] == 1 else np.transpose(image, (1, 2, 0))
    if image.dtype != np.uint8:
        low, high = float(image.min()), float(image.max())
        image = (image - low) / (high - low) if high > low else np.zeros_like(image, dtype=float)
    return image


def plot_worst(images, probabilities, targets, class_names, path, count=20, title="worst-classified images"):
    """A grid of the ``count`` worst-classified images titled with true and predicted class names."""
    names = class_names or [str(c) for c in range(probabilities.shape[1])]
    chosen = worst_indices(probabilities, targets, count)
    columns = 5
    rows = max(1, int(np.ceil(len(chosen) / columns)))
    plt = pyplot()
    figure, axes = plt.subplots(rows, columns, figsize=(columns * 2.6, rows * 2.9), squeeze=False)
    for axis in axes.ravel():
        axis.axis("off")
    for axis, index in zip(axes.ravel(), chosen):
        predicted = int(probabilities[index].argmax())
        true = int(targets[index])
        image = _displayable(images[index])
        axis.imshow(image, cmap="gray" if image.ndim == 2 else None, interpolation="nearest")
        axis.set_title(f"#{index} true: {str(names[true])[:22]}\npred: {str(names[predicted])[:22]} "
                       f"({probabilities[index, predicted]:.2f})", fontsize=7)
    figure.suptitle(title)
    return save_figure(figure, path)
