"""End-of-run visualisers ``class_models`` and ``saliency`` (``[output] visualizers``):
what the trained net thinks each class looks like, and where it looks in test images.

Both open the run's best checkpoint the way ``rabbit visualize RUN`` does and
write ``class_models.png`` / ``saliency.png`` with their CSVs into the run directory.
"""
import numpy as np

from ..hookspecs import hookimpl

SALIENCY_IMAGES = 8


def _loaded(run):
    from ..pretrained import open_model

    return open_model(run.run_dir, which="best")


def plot_class_models(run):
    from ..visualize import common
    from ..visualize.classes import class_models
    from ..visualize.pictures import class_models_picture

    log = common.StepLog()
    result = class_models(_loaded(run), "all", seed=run.config["experiment"].get("seed", 0), log=log, progress=False)
    return list(common.save_image_and_log(run.run_dir / "class_models.png", class_models_picture(result), log))


def plot_saliency(run):
    from ..visualize import common
    from ..visualize.pictures import saliency_picture

    split = "test" if "test" in run.dataset.splits else "val"
    x = run.dataset.splits[split].x[:SALIENCY_IMAGES]  # uint8 NCHW, as the dataset holds them
    pictures = [np.ascontiguousarray(image.transpose(1, 2, 0)) for image in x]
    labels = [f"{split} {i}" for i in range(len(pictures))]
    grid, log = saliency_picture(_loaded(run), pictures, labels)
    return list(common.save_image_and_log(run.run_dir / "saliency.png", grid, log))


@hookimpl
def rabbit_visualizers():
    return {"class_models": plot_class_models, "saliency": plot_saliency}
