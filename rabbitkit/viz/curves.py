"""Learning curves: training/validation loss and accuracy per epoch (``curves.png``)."""
from ..hookspecs import hookimpl
from .plotting import pyplot, save_figure


def plot_learning_curves(run):
    history = run.history
    if not history:
        return []
    plt = pyplot()
    epochs = [h["epoch"] for h in history]
    has_accuracy = any("train_accuracy" in h for h in history)
    figure, axes = plt.subplots(1, 2 if has_accuracy else 1, figsize=(10 if has_accuracy else 5.5, 4), squeeze=False)
    loss_axis = axes[0][0]
    for key, label in (("train_loss", "training"), ("val_loss", "validation")):
        values = [h.get(key) for h in history]
        if any(v is not None for v in values):
            loss_axis.plot(epochs, values, marker="o" if len(epochs) < 30 else None, label=label)
    loss_axis.set_xlabel("epoch")
    loss_axis.set_ylabel("loss")
    if all(h.get("train_loss", 1) > 0 for h in history):
        loss_axis.set_yscale("log")
    loss_axis.legend()
    loss_axis.set_title("loss")
    if has_accuracy:
        acc_axis = axes[0][1]
        for key, label in (("train_accuracy", "training"), ("val_accuracy", "validation")):
            values = [h.get(key) for h in history]
            if any(v is not None for v in values):
                acc_axis.plot(epochs, values, marker="o" if len(epochs) < 30 else None, label=label)
        acc_axis.set_xlabel("epoch")
        acc_axis.set_ylabel("accuracy")
        acc_axis.legend()
        acc_axis.set_title("accuracy")
    figure.suptitle(run.config["experiment"]["name"])
    return [save_figure(figure, run.run_dir / "curves.png")]


@hookimpl
def rabbit_visualizers():
    return {"curves": plot_learning_curves}
