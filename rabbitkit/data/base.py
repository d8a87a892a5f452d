"""The dataset types every dataset plugin returns and the trainer consumes.

A :class:`Dataset` holds whole splits in memory as numpy arrays:

* images: ``Split.x`` is **uint8 NCHW** (0..255), labels ``Split.y`` int64 (N,);
  the preprocessing pipeline (:mod:`rabbitkit.data.preprocess`) turns images into
  float32 for the network;
* regression: ``x`` float32 (N, ...), ``y`` float32 targets;
* language models: ``x`` the encoded corpus piece (int64, 1-D), ``y`` None (the
  targets are the next characters; see :class:`rabbitkit.data.datasets.text.TextDataset`);
* sequence to sequence: ``x`` the held-out source strings, ``y`` their target strings
  (object arrays); training pairs are generated on the fly (see
  :mod:`rabbitkit.data.datasets.reverse_strings`).
"""
from dataclasses import dataclass, field

import numpy as np

TASKS = ("classification", "regression", "language_model", "seq2seq")


@dataclass
class Split:
    """One split: inputs ``x`` (N, ...), targets ``y`` (N,) and optional ``groups`` (N,).

    ``groups`` identifies samples that must stay together (GTSRB: the physical
    sign, i.e. the track); it is None where samples are independent.
    """

    x: np.ndarray
    y: np.ndarray | None
    groups: np.ndarray | None = None

    def __post_init__(self):
        for name in ("y", "groups"):
            value = getattr(self, name)
            if value is not None and len(value) != len(self.x):
                raise ValueError(f"Split.{name} has {len(value)} entries but x has {len(self.x)}")

    def __len__(self):
        return len(self.x)

    def subset(self, index):
        """A new split with the samples at ``index`` (an integer array or a boolean mask)."""
        return Split(
            self.x[index],
            None if self.y is None else self.y[index],
            None if self.groups is None else self.groups[index],
        )


@dataclass
class Dataset:
    """A loaded dataset: its splits plus what the trainer needs to build a model.

    Attributes:
        name: the registry name (e.g. ``"gtsrb"``).
        task: ``"classification"``, ``"regression"`` or ``"language_model"``.
        input_shape: shape of one sample, e.g. ``(3, 48, 48)``.
        num_classes: number of classes (None for regression).
        class_names: one name per class (None when unknown).
        splits: ``{"train": Split, "val": Split, "test": Split}``, as available.
        info: free-form provenance shown by :meth:`summary` (source path, layout, options).
        mirror_classes: ``{"hflip": {class: class}, "vflip": {...}}``, the class each
            class becomes in a mirror image, where the dataset knows it (what
            ``[data.augment] flip_class_map = "dataset"`` takes; see
            :mod:`rabbitkit.data.augment`).
    """

    name: str
    task: str
    input_shape: tuple
    num_classes: int | None
    class_names: list | None
    splits: dict
    info: dict = field(default_factory=dict)
    mirror_classes: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {self.task!r}")
        self.input_shape = tuple(int(d) for d in self.input_shape)

    def summary(self, max_classes=60):
        """Human-readable counts per split and per class (what ``rabbit data info`` prints)."""
        lines = [f"dataset {self.name}: task {self.task}, input shape {self.input_shape}"
                 + (f", {self.num_classes} classes" if self.num_classes else "")]
        for key, value in self.info.items():
            lines.append(f"  {key}: {value}")
        names = list(self.splits)
        for name in names:
            split = self.splits[name]
            extra = ""
            if split.groups is not None:
                extra = f" in {len(np.unique(split.groups))} groups"
            lines.append(f"  {name}: {len(split)} samples{extra}, x {split.x.dtype} {tuple(split.x.shape)}")
        if self.task == "classification" and self.num_classes:
            counts = {name: np.bincount(self.splits[name].y, minlength=self.num_classes) for name in names}
            width = max([len(str(c)) for c in (self.class_names or [])] + [5])
            lines.append("  " + "class".ljust(width + 5) + "".join(n.rjust(8) for n in names))
            for c in range(min(self.num_classes, max_classes)):
                label = f"{c:>3} " + (str(self.class_names[c]) if self.class_names else "")
                lines.append("  " + label.ljust(width + 5) + "".join(str(counts[n][c]).rjust(8) for n in names))
            if self.num_classes > max_classes:
                lines.append(f"  ... {self.num_classes - max_classes} more classes")
        return "\n".join(lines)
