"""Every hook a rabbitkit plugin can implement: the plugin author's reference.

Registry hooks return a dict mapping a name to a factory (a class or a
function).  Each name may be claimed by one plugin only; built-in plugins use
these same hooks.  Lifecycle hooks are called by the trainer.

A plugin is a module or object with functions decorated by
``rabbitkit.hookimpl``; see docs/plugins.md for a complete example.
"""
import pluggy

PROJECT = "rabbitkit"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def rabbit_layers():
    """Return ``{name: LayerClass}``.

    A layer class subclasses :class:`rabbitkit.layers.Layer`; the name is what
    experiment files use in ``[[model.layers]] type = "name"``.
    """


@hookspec
def rabbit_architectures():
    """Return ``{name: factory}``; ``factory(input_shape, num_outputs, dtype, **options)``
    returns a :class:`rabbitkit.Sequential` (or any layer)."""


@hookspec
def rabbit_initializers():
    """Return ``{name: init}``; ``init(shape, rng, dtype, **options)`` returns a
    numpy array of that shape (see :mod:`rabbitkit.initializers`)."""


@hookspec
def rabbit_regularizers():
    """Return ``{name: RegularizerClass}`` (see :mod:`rabbitkit.regularizers`)."""


@hookspec
def rabbit_optimizers():
    """Return ``{name: OptimizerClass}`` (see :mod:`rabbitkit.optim`)."""


@hookspec
def rabbit_losses():
    """Return ``{name: LossClass}`` (see :mod:`rabbitkit.losses`)."""


@hookspec
def rabbit_datasets():
    """Return ``{name: factory}``; ``factory(**options)`` returns a dataset object
    (see :mod:`rabbitkit.data`)."""


@hookspec
def rabbit_visualizers():
    """Return ``{name: visualizer}``; ``visualizer(run)`` writes files into the
    run directory at the end of training (see :mod:`rabbitkit.viz`)."""


@hookspec
def rabbit_objectives():
    """Return ``{name: factory}``; ``factory(**options)`` returns an objective of image
    optimisation (Deep Dream, class models): an object with ``layers`` (the layer
    names it reads, ``""`` for the model output), ``tileable`` (True if it is a sum
    over positions) and ``__call__(features) -> (value, {layer: dvalue/doutput})``,
    the value to maximise (see :mod:`rabbitkit.visualize.objectives`)."""


@hookspec
def rabbit_image_regularizers():
    """Return ``{name: factory}``; ``factory(**options)`` returns an image regulariser:
    a callable ``(images, grad, step)`` that changes the float (N, C, H, W) ``images``
    in place after each optimisation step (``grad``: the objective's input gradient
    of that step; ``step`` counts from 1; see :mod:`rabbitkit.visualize.regularizers`)."""


@hookspec
def rabbit_train_start(run):
    """Called once before the first epoch; ``run`` is the live training run."""


@hookspec
def rabbit_epoch_end(run, epoch, metrics):
    """Called after every epoch with the epoch number and its metrics dict."""


@hookspec
def rabbit_train_end(run, result):
    """Called once after training (also after early stopping)."""
