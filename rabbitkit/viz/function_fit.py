"""For 1-D regression: the target function, the samples and the net's prediction (``fit.png``)."""
import numpy as np

from ..backend import to_host
from ..errors import RabbitError
from ..hookspecs import hookimpl
from .plotting import pyplot, save_figure


def plot_function_fit(run, points=400):
    dataset = run.dataset
    if run.task != "regression" or tuple(dataset.input_shape) != (1,):
        raise RabbitError("the 'function_fit' visualizer needs a 1-D regression dataset")
    train = dataset.splits["train"]
    low, high = float(train.x.min()), float(train.x.max())
    grid = np.linspace(low, high, points, dtype=np.float32)[:, None]
    prediction = np.asarray(to_host(run.model.forward(run.feeder.pipeline.apply(grid), training=False)))
    plt = pyplot()
    figure, axis = plt.subplots(figsize=(6, 4))
    target = getattr(dataset, "target_function", None)
    if target is not None:
        axis.plot(grid[:, 0], target(grid[:, 0].astype(np.float64)), color="black", lw=1, label="target")
    axis.scatter(train.x[:, 0], train.y[:, 0], s=8, alpha=0.5, label="training samples")
    axis.plot(grid[:, 0], prediction[:, 0], color="tab:red", lw=2, label="prediction")
    axis.set_xlabel("x")
    axis.set_ylabel("y")
    axis.legend()
    axis.set_title(run.config["experiment"]["name"])
    return [save_figure(figure, run.run_dir / "fit.png")]


@hookimpl
def rabbit_visualizers():
    return {"function_fit": plot_function_fit}
