"""What the model-zoo nets share: their pretrained layout (input, preprocessing,
classes, output layer) and ImageNet's class names.

An architecture factory with a ``pretrained`` attribute (a
:class:`PretrainedLayout`, set by :func:`pretrained_layout`) can be built
without an experiment: :func:`rabbitkit.pretrained.load` builds it at
``input_shape`` with ``num_outputs`` (or the file's own head size) and loads a
weight file into it.  A plugin architecture opts in the same way.
"""
import dataclasses
import functools
import pathlib

# torchvision's ImageNet transform: Resize(256), CenterCrop(224), ToTensor (0-1), Normalize.
TORCHVISION_INPUT = {"kind": "affine", "size": [224, 224], "mean": [0.485, 0.456, 0.406],
                     "std": [0.229, 0.224, 0.225], "order": "RGB", "value_range": 1.0, "resize": 256}
# Caffe's BVLC models: BGR, 0-255, the ImageNet mean pixel subtracted (as google/deepdream does).
CAFFE_INPUT = {"kind": "affine", "size": [224, 224], "mean": [104.0, 117.0, 123.0],
               "std": [1.0, 1.0, 1.0], "order": "BGR", "value_range": 255.0, "resize": 256}


@dataclasses.dataclass(frozen=True)
class PretrainedLayout:
    """How a zoo net meets its published weights.

    ``head``: the parameter-holding layer that gives the logits (re-initialised
    when a fine-tuning run has another number of classes); ``classes``: a class
    list file in this package (or None); ``caffe``: the weights come as a
    caffemodel (otherwise as a PyTorch state dict); ``variants``: the options
    ``rabbit weights inspect`` tries when matching a file (first fit wins).
    """

    preprocessing: dict
    head: str
    input_shape: tuple = (3, 224, 224)
    num_outputs: int = 1000
    classes: str | None = "imagenet_classes.txt"
    caffe: bool = False
    variants: tuple = ({},)

    def class_names(self):
        return class_names(self.classes) if self.classes else None


def pretrained_layout(**fields):
    """Decorator: attach a :class:`PretrainedLayout` to an architecture factory."""
    layout = PretrainedLayout(**fields)

    def attach(factory):
        factory.pretrained = layout
        return factory

    return attach


@functools.lru_cache(maxsize=None)
def _read_classes(name):
    lines = (pathlib.Path(__file__).parent / name).read_text(encoding="utf-8").splitlines()
    return tuple(line.strip() for line in lines if line.strip())


def class_names(name="imagenet_classes.txt"):
    """The class names stored in this package's ``name`` file (ImageNet's 1,000 in synset order)."""
    return list(_read_classes(name))
