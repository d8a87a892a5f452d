"""Learning curves: training/validation loss and accuracy per epoch (``curves.png``)."""
from ..hookspecs import hookimpl
from .plotting import pyplot, save_figure


def _plot_metric(axis, history, epochs, metric):
    """Training and validation curves of one metric ("loss", "accuracy") on one axis."""
    for split, label in (("train", "training"), ("val", "validation")):
        values = [h.get(f"{split}_{metric}") for h in history]
        if any(v is not None for v in values):
            axis.plot(epochs, values, marker="o" if len(epochs) < 30 else None, label=label)
    axis.set_xlabel("epoch")
    axis.set_ylabel(metric)
    axis.legend()
    axis.set_title(metric)


def plot_learning_curves(run):
    history = run.history
    if not history:
        return []
    plt = pyplot()
    epochs = [h["epoch"] for h in history]
    has_accuracy = any("train_accuracy" in h for h in history)
    figure, axes = plt.subplots(1, 2 if has_accuracy else 1, figsize=(10 if has_accuracy else 5.5, 4), squeeze=False)
    _plot_metric(axes[0][0], history, epochs, "loss")
    if all(h.get("train_loss", 1) > 0 for h in history):
        axes[0][0].set_yscale("log")
    if has_accuracy:
        _plot_metric(axes[0][1], history, epochs, "accuracy")
    figure.suptitle(run.config["experiment"]["name"])
    return [save_figure(figure, run.run_dir / "curves.png")]


@hookimpl
def rabbit_visualizers():
    return {"curves": plot_learning_curves}
