"""The pictures ``rabbit visualize`` and the end-of-run visualisers write: a grid of
class models, and images beside their saliency maps."""
from . import common
from .grid import heatmap, titled_grid


def class_models_picture(result, columns=None):
    """One titled tile per class of a :class:`~rabbitkit.visualize.classes.ClassModels` result."""
    titles = [f"{c} {name}" if name != str(c) else str(c) for c, name in zip(result.classes, result.names)]
    return titled_grid(result.images, titles, columns)


def saliency_picture(loaded, pictures, labels, columns=None):
    """Each image as the model sees it (its input size) beside its saliency map, and a log
    row per image (its predicted class); returns ``(picture, log)``."""
    from .classes import saliency
    from .subject import Subject

    subject = Subject(loaded)
    maps, classes = saliency(loaded, pictures)
    tiles, titles = [], []
    log = common.StepLog()
    for label, picture, values, c in zip(labels, pictures, maps, classes):
        tiles += [subject.to_output(subject.to_input(picture, model_size=True)), heatmap(values)]
        titles += [label, f"saliency: {subject.class_name(c)}"]
        log.record(image=label, predicted_class=c, class_name=subject.class_name(c))
    return titled_grid(tiles, titles, columns or 2), log
