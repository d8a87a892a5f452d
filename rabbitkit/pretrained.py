"""Pretrained models: load published weights into a zoo net, and resolve the MODEL
argument every command shares.

    >>> from rabbitkit import pretrained
    >>> model = pretrained.load("vgg16-397923af.pth", arch="vgg16")    # doctest: +SKIP
    >>> logits = model.forward(pretrained.preprocess("vgg16", "cat.jpg"), training=False)  # doctest: +SKIP

:func:`open_model` takes what a user types as MODEL -- a run directory, a
rabbitkit checkpoint (a run's, or a standalone one written by ``rabbit weights
convert``), or a weights file with ``arch`` -- and returns a
:class:`LoadedModel`: the model with its input shape, class names and
preprocessing (images to model input and back).  Weight files are read by
:mod:`rabbitkit.weights`, which never executes anything from a file.
"""
import dataclasses
import difflib
import fnmatch
import json
import pathlib

import numpy as np

from . import model_input
from .errors import CheckpointError, ConfigError, RabbitError

STANDALONE = "standalone"  # metadata key of a standalone rabbitkit checkpoint


class ModelSpecError(RabbitError):
    """MODEL is not a run directory, a rabbitkit checkpoint or a weights file."""


# -- weights into a model ---------------------------------------------------------------
@dataclasses.dataclass
class LoadReport:
    """What a load did: tensors loaded, names left out, and a re-initialised head."""

    loaded: list
    missing: list
    unexpected: list
    new_head: list

    def summary(self):
        parts = [f"loaded {len(self.loaded)} tensors"]
        if self.new_head:
            parts.append(f"new head {', '.join(self.new_head)} (re-initialised)")
        if self.missing:
            parts.append(f"{len(self.missing)} left at their initial values (first: {self.missing[0]})")
        if self.unexpected:
            parts.append(f"{len(self.unexpected)} in the file unused (first: {self.unexpected[0]})")
        return "; ".join(parts)


def expected_shapes(model):
    """``{name: shape}`` of every parameter and buffer, in the model's order (nothing copied)."""
    shapes = {name: tuple(layer.params[key].shape) for name, layer, key in model.named_parameters()}
    shapes.update({name: tuple(layer.buffers[key].shape) for name, layer, key in model.named_buffers()})
    return shapes


def _nearest(name, names):
    close = difflib.get_close_matches(name, list(names), n=3, cutoff=0.5)
    return f" (nearest: {', '.join(close)})" if close else ""


def external_state(model, weights):
    """A :class:`~rabbitkit.weights.WeightFile`'s tensors under the model's names.

    A model may declare ``external_names`` (``{format: {file name: model name}}``,
    e.g. Caffe's ``"conv1/7x7_s2/0"`` -> ``"conv1.weight"``) and
    ``ignored_weights`` (patterns of file tensors it does not hold, such as
    GoogLeNet's auxiliary heads when built without them).  PyTorch's
    ``num_batches_tracked`` counters are dropped: rabbitkit's batch norm has no
    such buffer.  Caffe's legacy 4-D blob shapes (1, 1, out, in) are reshaped to
    the model's when only leading 1s differ.
    """
    names = getattr(model, "external_names", {}).get(weights.format, {})
    ignored = tuple(getattr(model, "ignored_weights", ()))
    shapes = expected_shapes(model) if weights.format == "caffe" else {}
    state = {}
    for file_name, array in weights.tensors.items():
        name = names.get(file_name, file_name)
        if name.endswith("num_batches_tracked") or any(fnmatch.fnmatchcase(name, p) for p in ignored):
            continue
        want = shapes.get(name)
        if want is not None and array.shape != want and _squeezed(array.shape) == _squeezed(want):
            array = array.reshape(want)
        state[name] = array
    return state


def _squeezed(shape):
    shape = list(shape)
    while len(shape) > 1 and shape[0] == 1:
        shape.pop(0)
    return tuple(shape)


def load_into(model, state, source, arch, strict=True, head=None):
    """Copy ``state`` into ``model`` with one-line errors naming the first tensor that does not fit.

    ``strict``: every model tensor must come from ``state`` and every tensor of
    ``state`` must be used.  ``head``: the output layer's name; when its tensors
    differ in shape (another number of classes) they keep their fresh
    initialisation and are reported as a new head instead of an error.
    """
    shapes = expected_shapes(model)
    new_head, mismatched = [], []
    for name, want in shapes.items():
        if name in state and tuple(np.shape(state[name])) != want:
            if head is not None and name.rsplit(".", 1)[0] == head:
                new_head.append(name)
            else:
                mismatched.append(name)
    if mismatched:
        name = mismatched[0]
        raise CheckpointError(f"{source}: '{name}' has shape {tuple(np.shape(state[name]))}, {arch} expects {shapes[name]}")
    missing = [name for name in shapes if name not in state]
    unexpected = [name for name in state if name not in shapes]
    if strict and missing:
        name = missing[0]
        raise CheckpointError(f"{source}: no tensor '{name}' in the file ({arch} expects shape {shapes[name]})"
                              f"{_nearest(name, unexpected or state)}")
    if strict and unexpected:
        name = unexpected[0]
        raise CheckpointError(f"{source}: tensor '{name}' of shape {tuple(np.shape(state[name]))} is not a "
                              f"parameter of {arch}{_nearest(name, missing or shapes)}")
    usable = {name: value for name, value in state.items() if name in shapes and name not in new_head}
    model.load_state_dict(usable, strict=False)
    return LoadReport(list(usable), missing, unexpected, sorted({n.rsplit(".", 1)[0] for n in new_head}))


# -- rabbitkit checkpoints --------------------------------------------------------------
def checkpoint_kind(path):
    """``("standalone" | "run", metadata)`` for a rabbitkit checkpoint, else ``(None, None)`` (cheap: header only)."""
    from .train import checkpoint

    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="numpy") as handle:
            raw = (handle.metadata() or {}).get("rabbitkit")
    except Exception:  # not a safetensors file at all: the caller decides what it is
        return None, None
    if raw is None:
        return None, None
    try:
        metadata = json.loads(raw)
    except json.JSONDecodeError:
        raise CheckpointError(f"{path}: checkpoint metadata is corrupt") from None
    if metadata.get("format") != checkpoint.FORMAT:
        return None, None
    return (STANDALONE if STANDALONE in metadata else "run"), metadata


def read_state(path, model, arch="the model"):
    """The tensors of ``path`` under ``model``'s names: a rabbitkit checkpoint's model
    group, or any weights file :mod:`rabbitkit.weights` reads."""
    kind, _ = checkpoint_kind(path)
    if kind is not None:
        from .train import checkpoint

        groups, _ = checkpoint.load(path)
        return groups.get("model", {})
    from .weights import read_weights

    return external_state(model, read_weights(path))


def save_model(path, loaded, source=None):
    """Write ``loaded`` (a :class:`LoadedModel`) as a standalone rabbitkit checkpoint.

    The metadata records the architecture, its options, input shape, number of
    outputs, preprocessing and class names, so :func:`open_model` and
    ``[model] weights`` rebuild it without anything else.
    """
    from .train import checkpoint

    groups = {"model": loaded.model.state_dict()}
    state = getattr(loaded.preprocessing, "state_dict", lambda: {})()
    if state:
        groups["preprocess"] = state
    record = {"arch": loaded.arch, "options": loaded.options, "input_shape": list(loaded.input_shape),
              "num_outputs": loaded.num_outputs, "dtype": str(loaded.model.dtype),
              "preprocessing": loaded.preprocessing.to_dict() if loaded.preprocessing else None,
              "class_names": loaded.class_names, "source": str(source) if source else None}
    checkpoint.save(path, groups, {STANDALONE: record})
    return pathlib.Path(path)


# -- the loaded model ---------------------------------------------------------------------
@dataclasses.dataclass
class LoadedModel:
    """A model ready for inference and visualisation, with what it needs around it.

    ``input_shape`` is (C, H, W) of the model input; ``preprocessing`` is an
    :class:`~rabbitkit.model_input.AffineInput` (zoo nets),
    :class:`~rabbitkit.model_input.PipelineInput` (a run's) or None (no images).
    """

    model: object
    name: str
    input_shape: tuple
    class_names: list | None
    preprocessing: object
    arch: str | None = None
    options: dict = dataclasses.field(default_factory=dict)
    num_outputs: int | None = None
    run: object = None  # the live run for a run directory

    def _need_images(self):
        if self.preprocessing is None:
            raise ConfigError(f"model {self.name} does not take images (input shape {self.input_shape})")
        return self.preprocessing

    def preprocess(self, images, size="default"):
        """Images (PIL, paths, HWC uint8 arrays) -> float32 NCHW model input at the model's
        input size; ``size=None`` keeps each image's own size (conv-only use)."""
        return self._need_images().preprocess(images, size)

    def deprocess(self, x):
        """NCHW model input -> list of HWC uint8 images (see :mod:`rabbitkit.model_input`)."""
        return self._need_images().deprocess(x)

    @property
    def input_range(self):
        """Per-channel (low, high) of valid model input (for clipping pixels in input space)."""
        return self._need_images().input_range

    @property
    def mean_pixel(self):
        return self._need_images().mean_pixel

    def logits(self, x, batch_size=16):
        x = np.asarray(x, dtype=self.model.dtype)
        outs = [np.asarray(self.model.backend.to_host(self.model.forward(x[i:i + batch_size], training=False)))
                for i in range(0, len(x), batch_size)]
        return np.concatenate(outs)

    def predict(self, images, top=5):
        """Per image, the ``top`` (class name, probability) pairs, most probable first."""
        logits = self.logits(self.preprocess(images)).astype(np.float64)
        if logits.ndim != 2:
            raise ConfigError(f"model {self.name} gives outputs of shape {logits.shape[1:]}, not class scores")
        probs = np.exp(logits - logits.max(axis=1, keepdims=True))
        probs /= probs.sum(axis=1, keepdims=True)
        names = self.class_names if self.class_names and len(self.class_names) == probs.shape[1] else None
        results = []
        for row in probs:
            order = np.argsort(-row, kind="stable")[:top]
            results.append([(names[k] if names else str(k), float(row[k])) for k in order])
        return results


# -- building --------------------------------------------------------------------------
def _factory(arch):
    from .plugins import registry

    return registry("architectures").get(arch)


def _layout(arch):
    return getattr(_factory(arch), "pretrained", None)


def zoo_names():
    """Architectures that carry a pretrained layout (the model-zoo nets)."""
    from .plugins import registry

    return [name for name, factory, _ in registry("architectures").items() if hasattr(factory, "pretrained")]


def build(arch, input_shape=None, num_outputs=None, dtype=np.float32, **options):
    """A fresh ``arch`` at its pretrained input shape and output count unless given."""
    layout = _layout(arch)
    if layout is None and input_shape is None:
        raise ConfigError(f"architecture {arch} has no pretrained layout: give its input_shape "
                          f"(zoo nets: {', '.join(zoo_names())})")
    input_shape = tuple(input_shape or layout.input_shape)
    num_outputs = int(num_outputs or layout.num_outputs)
    return _factory(arch)(input_shape, num_outputs, dtype=dtype, **options)


def _head_outputs(state, layout):
    weight = state.get(f"{layout.head}.weight") if layout else None
    return int(weight.shape[0]) if weight is not None and weight.ndim >= 1 else None


def load_weights(path, arch="vgg16", strict=True, input_shape=None, num_outputs=None, dtype=np.float32, **options):
    """``(LoadedModel, LoadReport)`` for a weights file (or rabbitkit checkpoint) and an architecture.

    The number of outputs is the file's head size unless ``num_outputs`` is
    given (then a head of another size is re-initialised and reported).
    """
    from .weights import read_weights

    layout = _layout(arch)
    kind, _ = checkpoint_kind(path)
    if kind is not None:
        from .train import checkpoint

        tensors = checkpoint.load(path)[0].get("model", {})
        weights = None
    else:
        weights = read_weights(path)
        tensors = weights.tensors
    outputs = num_outputs or _head_outputs(tensors, layout) or (layout.num_outputs if layout else None)
    model = build(arch, input_shape, outputs, dtype, **options)
    state = tensors if weights is None else external_state(model, weights)
    report = load_into(model, state, path, arch, strict, head=layout.head if (layout and num_outputs) else None)
    shape = tuple(input_shape or layout.input_shape)
    classes = layout.class_names() if layout else None
    if classes is not None and len(classes) != outputs:
        classes = None
    preprocessing = model_input.from_dict(layout.preprocessing) if layout else None
    loaded = LoadedModel(model, arch, shape, classes, preprocessing, arch, dict(options), outputs)
    return loaded, report


def load(path, arch="vgg16", strict=True, **options):
    """A model with the weights of ``path``; ``model.forward(x, training=False)`` gives the logits."""
    return load_weights(path, arch, strict, **options)[0].model


def preprocess(arch, image):
    """A zoo net's input (float32 NCHW, one image) from a PIL image, path or HWC uint8 array."""
    layout = _layout(arch)
    if layout is None:
        raise ConfigError(f"architecture {arch} has no pretrained preprocessing (zoo nets: {', '.join(zoo_names())})")
    return model_input.from_dict(layout.preprocessing).preprocess(image)


# -- MODEL resolution --------------------------------------------------------------------
def _from_run(run_dir, which):
    from .train.evaluate import load_run

    live = load_run(run_dir, which)
    dataset, feeder = live.dataset, live.feeder
    preprocessing = None
    image_shape = tuple(dataset.input_shape)
    if len(image_shape) == 3 and hasattr(feeder, "pipeline"):
        train = dataset.splits["train"].x
        preprocessing = model_input.PipelineInput(feeder.pipeline, image_shape, sample=lambda: train[:256])
    model_cfg = live.config["model"]
    return LoadedModel(live.model, pathlib.Path(run_dir).name, tuple(feeder.input_shape), dataset.class_names,
                       preprocessing, model_cfg["architecture"], dict(model_cfg.get("options", {})),
                       feeder.num_outputs, run=live)


def _from_standalone(path, metadata):
    from .train import checkpoint

    record = metadata[STANDALONE]
    groups, _ = checkpoint.load(path)
    model = _factory(record["arch"])(tuple(record["input_shape"]), record["num_outputs"],
                                     dtype=np.dtype(record.get("dtype", "float32")), **record["options"])
    load_into(model, groups.get("model", {}), path, record["arch"], strict=True)
    prep = record.get("preprocessing")
    preprocessing = model_input.from_dict(prep, groups.get("preprocess")) if prep else None
    return LoadedModel(model, pathlib.Path(path).stem, tuple(record["input_shape"]), record.get("class_names"),
                       preprocessing, record["arch"], dict(record["options"]), record["num_outputs"])


def _weights_format(path):
    """The weights format of ``path`` from its first bytes, or None."""
    from .weights.detect import detect_format
    from .errors import WeightsError

    try:
        with open(path, "rb") as handle:
            head = handle.read(512)
        return detect_format(str(path), head, path.stat().st_size)
    except (WeightsError, OSError):
        return None


def open_model(spec, arch=None, which="best", strict=True, **options):
    """Resolve MODEL: a run directory (its ``which`` checkpoint), a rabbitkit checkpoint
    file, or a weights file together with ``arch``; returns a :class:`LoadedModel`."""
    from .train.trainer import BEST, LAST

    path = pathlib.Path(spec)
    if path.is_dir():
        if (path / "config.toml").is_file():
            return _from_run(path, which)
        raise ModelSpecError(f"{spec} is a folder but not a run directory (no config.toml)")
    if not path.is_file():
        raise ModelSpecError(f"{spec}: no such run directory or file (expected a run directory, a rabbitkit "
                             "checkpoint, or a weights file with --arch)")
    kind, metadata = checkpoint_kind(path)
    if kind == STANDALONE:
        return _from_standalone(path, metadata)
    if kind == "run":
        run_dir = path.parent.parent
        if path.name in (BEST, LAST) and (run_dir / "config.toml").is_file():
            return _from_run(run_dir, "last" if path.name == LAST else "best")
        raise ModelSpecError(f"{spec} is a run's checkpoint outside its run directory; pass the run directory, "
                             "or write a standalone checkpoint with `rabbit weights convert`")
    fmt = _weights_format(path)
    if arch is None:
        if fmt is not None:
            raise ModelSpecError(f"{spec} is a {fmt} weights file: pass --arch NAME (zoo nets: {', '.join(zoo_names())})")
        raise ModelSpecError(f"{spec} is neither a run directory, a rabbitkit checkpoint, nor a weights file "
                             "(pass --arch with weights)")
    return load_weights(path, arch, strict, **options)[0]


# -- which zoo net a file holds -------------------------------------------------------------
def _fits(model, state):
    shapes = expected_shapes(model)
    return set(shapes) == set(state) and all(tuple(np.shape(state[n])) == s for n, s in shapes.items())


def match_architecture(weights):
    """``(arch, options, num_outputs)`` of the zoo net whose names and shapes ``weights``
    (a WeightFile) fits exactly, or None.  Only nets whose output layer is in the
    file are built (a VGG takes seconds to build)."""
    from .plugins import registry

    for name, factory, _ in registry("architectures").items():
        layout = getattr(factory, "pretrained", None)
        if layout is None or layout.caffe != (weights.format == "caffe"):
            continue
        for options in layout.variants:
            model = build(name, None, layout.num_outputs, **options)
            state = external_state(model, weights)
            outputs = _head_outputs(state, layout)
            if outputs is None:
                break  # no output layer of this net in the file
            if outputs != layout.num_outputs:
                model = build(name, None, outputs, **options)
                state = external_state(model, weights)
            if _fits(model, state):
                return name, dict(options), outputs
    return None
