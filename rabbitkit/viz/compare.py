"""Learning curves of several runs on shared axes (``rabbit compare``) and a sweep's metric plot.

Plain functions, no visualizer: they read run directories and sweep results, not a live run.
"""
import math

from .plotting import pyplot, save_figure


def _positive(values):
    return all(v > 0 for v in values if v is not None)


def plot_comparison(runs, path, names=None):
    """Loss (and accuracy, where any run has it) per epoch: one colour per run, training dashed,
    validation solid.  ``runs`` are :class:`rabbitkit.train.runs.RunInfo`; returns ``path``."""
    plt = pyplot()
    names = names or [r.name for r in runs]
    metrics = ["loss"] + (["accuracy"] if any("train_accuracy" in h for r in runs for h in r.history) else [])
    figure, axes = plt.subplots(1, len(metrics), figsize=(5.5 * len(metrics), 4), squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for column, metric in enumerate(metrics):
        axis = axes[0][column]
        plotted = []
        for index, (run, name) in enumerate(zip(runs, names)):
            epochs = [h.get("epoch") for h in run.history]
            for split, style in (("train", "--"), ("val", "-")):
                values = [h.get(f"{split}_{metric}") for h in run.history]
                if any(v is not None for v in values):
                    axis.plot(epochs, values, style, color=colours[index % len(colours)],
                              label=f"{name} ({'validation' if split == 'val' else 'training'})")
                    plotted += [v for v in values if v is not None]
        if metric == "loss" and plotted and _positive(plotted):
            axis.set_yscale("log")
        axis.set_xlabel("epoch")
        axis.set_ylabel(metric)
        axis.set_title(f"{metric} (dashed: training, solid: validation)", fontsize=9)
        axis.legend(fontsize=7)
    return save_figure(figure, path)


def _numeric(values):
    return all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)


def plot_sweep(points, values, metric, path):
    """``metric`` against each swept key (one panel per key; other keys' points share a panel).

    ``points``: the swept values per run (dicts); ``values``: the metric per run (None: missing).
    """
    plt = pyplot()
    keys = list(points[0]) if points else []
    figure, axes = plt.subplots(1, max(1, len(keys)), figsize=(4.5 * max(1, len(keys)), 3.8), squeeze=False)
    for column, key in enumerate(keys):
        axis = axes[0][column]
        xs = [p[key] for p in points]
        shown = [(x, y) for x, y in zip(xs, values) if y is not None and math.isfinite(y)]
        if _numeric(xs):
            axis.scatter([x for x, _ in shown], [y for _, y in shown])
            if all(x > 0 for x in xs) and max(xs) / min(xs) >= 20:
                axis.set_xscale("log")
        else:  # categories in the order they were swept
            categories = list(dict.fromkeys(repr(x) for x in xs))
            axis.scatter([categories.index(repr(x)) for x, _ in shown], [y for _, y in shown])
            axis.set_xticks(range(len(categories)), categories)
        axis.set_xlabel(key)
        axis.set_ylabel(metric)
    figure.suptitle(f"{metric} per swept value")
    return save_figure(figure, path)
