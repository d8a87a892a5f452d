"""``rabbit eval``: accuracy, per-class accuracy and a confusion matrix of a trained run."""
import dataclasses
import json
import pathlib

import numpy as np

from ..backend import tuning
from ..errors import CheckpointError, ConfigError
from . import checkpoint
from . import config as config_module
from .rundir import atomic_write_text
from .trainer import BEST, LAST, Run


@dataclasses.dataclass
class EvalReport:
    metrics: dict
    confusion: np.ndarray | None
    files: list
    text: str


def load_run(run_dir, which=None, quiet=True, device=None):
    """Rebuild a finished run's model and data and load its ``best`` or ``last`` weights
    (``None``: the checkpoint the run tests with, ``train.test_checkpoint``).

    ``device`` overrides the run's device: checkpoints hold host arrays, so a model
    trained on ``cuda`` evaluates on ``cpu`` and back.
    """
    run_dir = pathlib.Path(run_dir)
    if not (run_dir / "config.toml").is_file():
        raise CheckpointError(f"{run_dir}: not a run directory (no config.toml)")
    overrides = {"experiment.device": device} if device else None
    config = config_module.load(run_dir / "config.toml", overrides=overrides)
    # The run's own kernel variants where it kept them (a test as the run's own), not
    # those of a run it may have replayed, which may be gone by now.
    own_choices = run_dir / tuning.CHOICES_FILE
    config["experiment"]["kernel_choices"] = str(own_choices) if own_choices.is_file() else None
    which = which or config["train"]["test_checkpoint"]
    path = run_dir / "checkpoints" / (BEST if which == "best" else LAST)
    if which == "best" and not path.is_file():
        path = run_dir / "checkpoints" / LAST
    live = Run(config, run_dir, log_to_stdout=not quiet)  # evaluation shows its bar on a terminal
    groups, metadata = checkpoint.load(path)
    if metadata.get("config_hash") != live.hash:
        raise CheckpointError(f"{path}: checkpoint belongs to a different model/data configuration")
    live.model.load_state_dict(groups.get("model", {}))
    live.feeder.load_state_dict(groups.get("preprocess", {}))
    return live


def confusion_matrix(predicted, targets, num_classes):
    matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(matrix, (targets.ravel(), predicted.ravel()), 1)
    return matrix


def class_report(probabilities, targets, class_names, images, out, split, worst, lines):
    """Per-class accuracy (appended to ``lines``), the confusion matrix as CSV and PNG and
    the ``worst`` worst-classified ``images`` as a PNG, written into ``out`` (created if
    needed); ``class_names`` None: the class numbers.  Returns (confusion matrix,
    per-class accuracy, the files written)."""
    from ..viz.confusion import plot_confusion
    from ..viz.worst import plot_worst

    num_classes = probabilities.shape[1]
    names = class_names or [str(c) for c in range(num_classes)]
    matrix = confusion_matrix(probabilities.argmax(axis=-1), targets, num_classes)
    support = matrix.sum(axis=1)
    per_class = np.divide(np.diag(matrix), support, out=np.full(num_classes, np.nan), where=support > 0)
    lines.append("per-class accuracy:")
    for c in range(num_classes):
        lines.append(f"  {c:>3} {str(names[c])[:28]:<28} {per_class[c]:.4f}  (n={support[c]})")
    out.mkdir(parents=True, exist_ok=True)
    csv_path = out / f"confusion_{split}.csv"
    header = ",".join(["true\\pred"] + [str(c) for c in range(num_classes)])
    rows = [header] + [",".join([str(c)] + [str(v) for v in matrix[c]]) for c in range(num_classes)]
    csv_path.write_text("\n".join(rows) + "\n")
    files = [csv_path, plot_confusion(matrix, out / f"confusion_{split}.png", title=f"{split} confusion matrix")]
    if worst:
        files.append(plot_worst(images, probabilities, targets, names, out / f"worst_{split}.png", count=worst,
                                title=f"the {worst} worst-classified {split} images"))
    return matrix, per_class, files


def _check_split(live, run_dir, split):
    if not live.feeder.has_split(split):
        raise ConfigError(f"{run_dir}: split '{split}' not available; available: {', '.join(live.feeder.splits)}")


def evaluate_run(run_dir, split="test", which=None, device=None, tta=None, worst=20, out=None):
    """Metrics, per-class accuracy, the confusion matrix (CSV + PNG) and the ``worst``
    worst-classified images (PNG) of a run, written into ``out`` (default: the run
    directory); ``tta`` a preset or view list (see :mod:`.tta`)."""
    from .tta import parse_views, predict, softmax

    views = parse_views(tta, where="--tta")
    live = load_run(run_dir, which, device=device)
    _check_split(live, run_dir, split)
    result = live.evaluate(split, collect=live.task == "classification")
    metrics = {k: v for k, v in result.items() if k in ("loss", "accuracy")}
    lines = [f"{split}: " + "  ".join(f"{k} {v:.4f}" for k, v in metrics.items())]
    files = []
    matrix = None
    if live.task == "classification":
        probabilities = softmax(np.asarray(result["outputs"], dtype=np.float64))
        if len(views) > 1 or not views[0].identity:
            prediction = predict(live, split, views)
            probabilities = prediction.probabilities
            metrics.update(tta_accuracy=prediction.accuracy, tta_loss=prediction.loss)
            lines.append(f"{split} with test-time augmentation ({len(views)} views: "
                         f"{', '.join(v.describe() for v in views)}): accuracy {prediction.accuracy:.4f}  "
                         f"loss {prediction.loss:.4f}  ({prediction.seconds:.1f}s, "
                         f"{len(views)}x the forward passes)")
        matrix, per_class, files = class_report(probabilities, result["targets"], live.dataset.class_names,
                                                live.dataset.splits[split].x, pathlib.Path(out or run_dir), split,
                                                worst, lines)
        lines.append("wrote " + ", ".join(str(f) for f in files))
        metrics["per_class_accuracy"] = per_class
    return EvalReport(metrics, matrix, files, "\n".join(lines))


def evaluate_committee(run_dirs, split="test", which=None, device=None, tta=None, worst=20, out=None):
    """Average the members' class probabilities (IDSIA's multi-column net); each member
    keeps its own preprocessing, input size and architecture.  Writes the committee's
    per-class accuracy, confusion matrix (CSV + PNG), ``worst`` worst-classified images
    (as the first member sees them) and ``committee_<split>.json`` (members, their
    accuracies and the committee's) into ``out``, by default a ``committee`` folder next
    to the first member.  Returns an :class:`EvalReport`."""
    from .tta import parse_views, predict

    if len(run_dirs) < 2:
        raise ConfigError(f"a committee needs at least two runs, got {len(run_dirs)}")
    views = parse_views(tta, where="--tta")
    lines, members, targets = [], [], None
    for run_dir in run_dirs:
        live = load_run(run_dir, which, device=device)
        _check_split(live, run_dir, split)
        prediction = predict(live, split, views)
        if targets is None:
            targets, first = prediction.targets, run_dir
            names = live.dataset.class_names
            images = live.dataset.splits[split].x
        elif len(prediction.targets) != len(targets) or not np.array_equal(prediction.targets, targets):
            raise ConfigError(f"{run_dir}: its {split} split differs from {first}'s (committee members must be "
                              f"evaluated on the same samples in the same order)")
        members.append(prediction)
        lines.append(f"member {run_dir}: {split} accuracy {prediction.accuracy:.4f}  ({prediction.seconds:.1f}s)")
    probabilities = np.mean([m.probabilities for m in members], axis=0)
    accuracy = float(np.mean(probabilities.argmax(axis=1) == targets))
    tta_text = f", test-time augmentation {len(views)} views" if len(views) > 1 else ""
    lines.append(f"committee of {len(members)}{tta_text}: {split} accuracy {accuracy:.4f}")
    metrics = {"accuracy": accuracy, "member_accuracy": [m.accuracy for m in members]}
    out = pathlib.Path(out) if out is not None else pathlib.Path(run_dirs[0]).parent / "committee"
    matrix, per_class, files = class_report(probabilities, targets, names, images, out, split, worst, lines)
    summary = out / f"committee_{split}.json"
    atomic_write_text(summary, json.dumps({"members": [str(r) for r in run_dirs], "checkpoint": which, "views": len(views),
                                   "member_accuracy": metrics["member_accuracy"], "accuracy": accuracy}, indent=1))
    files.append(summary)
    lines.append("wrote " + ", ".join(str(f) for f in files))
    metrics["per_class_accuracy"] = per_class
    return EvalReport(metrics, matrix, files, "\n".join(lines))
