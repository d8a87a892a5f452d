"""TensorBoard event files for every run, so ``tensorboard --logdir runs/`` shows rabbitkit runs.

Off unless ``output.tensorboard = true``.  Written with `tensorboardX
<https://github.com/lanpa/tensorboardX>`_ (the optional extra ``tensorboard``:
``pip install 'rabbitkit[tensorboard]'``), a small, maintained writer that needs
neither TensorFlow nor PyTorch.  The event file goes into the run directory itself,
so TensorBoard names each run after its directory.

Every number of an epoch's metrics becomes a scalar at step = epoch (``train_loss``,
``val_accuracy``, ``lr``, ``samples_per_s``, ...); the test metrics are written at
the last epoch when the run ends.  A resumed run purges the events after the epoch
it resumes from, so replayed epochs are not drawn twice.
"""
import math
import time
import weakref

from ..errors import RabbitError
from ..hookspecs import hookimpl

# run -> its SummaryWriter; a run that never reaches rabbit_train_end (interrupted, diverged)
# has its writer closed when the run object goes away.
_writers = weakref.WeakKeyDictionary()


def _enabled(run):
    return bool(run.config["output"].get("tensorboard"))


def _writer_class():
    try:
        from tensorboardX import SummaryWriter
    except ImportError:
        raise RabbitError("output.tensorboard = true needs the optional extra: "
                          "pip install 'rabbitkit[tensorboard]' (tensorboardX)") from None
    return SummaryWriter


def _scalars(writer, metrics, step, prefix=""):
    for name, value in metrics.items():
        if name == "epoch" or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if math.isfinite(value):
            writer.add_scalar(prefix + name, float(value), step)
    writer.flush()  # an interrupted run keeps every epoch it finished


@hookimpl
def rabbit_train_start(run):
    if not _enabled(run):
        return
    writer_class = _writer_class()
    # On resume, drop events after the epoch the checkpoint holds (they are replayed).
    # A fresh file name per session, sorting in session order (TensorBoard reads the files
    # sorted by name): two sessions within one second would otherwise share one file.
    writer = writer_class(logdir=str(run.run_dir), purge_step=run.epoch + 1 if run.epoch else None,
                          flush_secs=30, filename_suffix=f".{time.time_ns()}")
    _writers[run] = writer
    weakref.finalize(run, writer.close)


@hookimpl
def rabbit_epoch_end(run, epoch, metrics):
    writer = _writers.get(run)
    if writer is not None:
        _scalars(writer, metrics, epoch)


@hookimpl
def rabbit_train_end(run, result):
    writer = _writers.pop(run, None)
    if writer is None:
        return
    _scalars(writer, {k: v for k, v in result.metrics.items() if k.startswith("test_")}, run.epoch)
    writer.close()
