"""Feeders turn a dataset into training and evaluation batches for the trainer.

* :class:`ArrayFeeder`: classification and regression on in-memory arrays.
  Preprocessing is fitted on the training split and applied to every split once
  (ZCA or LCN per batch would cost more than the training step); augmentation
  runs per batch on the fly in a background thread.
* :class:`StreamFeeder`: character language models; stateful batches in which
  row i of batch k+1 continues where row i of batch k stopped (truncated BPTT).

Each batch's randomness comes from (seed, epoch, batch index), so any batch can be
replayed exactly after a resume.
"""
import numpy as np


def _derived_rng(*parts):
    return np.random.default_rng(np.random.SeedSequence([int(p) for p in parts]))


class Feeder:
    """What every feeder shares: the dataset, batch sizes, and no learned state by default."""

    has_accuracy = True

    def __init__(self, dataset, config):
        self.dataset = dataset
        self.task = dataset.task
        self.splits = dataset.splits
        self.seed = config["experiment"]["seed"]
        self.batch_size = config["train"]["batch_size"]
        self.eval_batch_size = config["train"]["eval_batch_size"]
        self.input_shape = tuple(dataset.input_shape)
        self.num_outputs = int(dataset.num_classes) if dataset.num_classes else None

    def has_split(self, name):
        return name in self.splits and len(self.splits[name]) > 0

    def fit(self):
        """Learn preprocessing statistics from the training split (nothing by default)."""

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass

    def score(self, out, yb):
        """(correct, count) of a batch; count is what the loss averages over."""
        if not self.has_accuracy:
            return 0.0, float(len(yb))
        from ..backend import device_of, get_backend, to_host

        if device_of(out) == "cuda":  # count on the device: one number comes back, not the scores
            backend = get_backend("cuda")
            return backend.count_argmax_matches(out.reshape(yb.size, out.size // yb.size), yb), float(yb.size)
        predicted = np.asarray(to_host(out)).argmax(axis=-1)
        return float(np.count_nonzero(predicted == yb)), float(yb.size)


def dataset_class_maps(augment, dataset):
    """``augment`` with ``flip_class_map = "dataset"`` (or ``vflip_class_map``) replaced
    by the dataset's own map of mirrored classes (``Dataset.mirror_classes``)."""
    from ..errors import ConfigError

    augment = dict(augment)
    for key, flip in (("flip_class_map", "hflip"), ("vflip_class_map", "vflip")):
        if isinstance(augment.get(key), str):
            if augment[key] != "dataset":
                raise ConfigError(f"data.augment.{key}: expected a table of class ids or \"dataset\", "
                                  f"got {augment[key]!r}")
            if flip not in dataset.mirror_classes:
                known = ", ".join(sorted(dataset.mirror_classes)) or "none"
                raise ConfigError(f"data.augment.{key} = \"dataset\": dataset '{dataset.name}' declares no "
                                  f"class map for {flip} (it has: {known})")
            augment[key] = dataset.mirror_classes[flip]
    return augment


class ArrayFeeder(Feeder):
    def __init__(self, dataset, config):
        from ..data.preprocess import Pipeline

        super().__init__(dataset, config)
        self.pipeline = Pipeline.from_config(config["data"]["preprocess"])
        augment = config["data"]["augment"]
        self.augmenter = None
        if augment:
            from ..data.augment import Augmenter

            self.augmenter = Augmenter.from_config(dataset_class_maps(augment, dataset))
        self.input_shape = tuple(self.pipeline.output_shape(dataset.input_shape))
        if self.task != "classification":
            y = self.splits["train"].y
            self.num_outputs = int(np.prod(y.shape[1:])) if y.ndim > 1 else 1
        self.has_accuracy = self.task == "classification"
        self._prepared = {}

    # -- preprocessing ----------------------------------------------------------------
    def fit(self):
        self.pipeline.fit(self.splits["train"].x)

    def state_dict(self):
        return self.pipeline.state_dict()

    def load_state_dict(self, state):
        self.pipeline.load_state_dict(state)
        self._prepared.clear()

    def prepared(self, name):
        """The split's inputs after preprocessing (float32), computed once."""
        if name not in self._prepared:
            self._prepared[name] = np.ascontiguousarray(self.pipeline.apply(self.splits[name].x), dtype=np.float32)
        return self._prepared[name]

    def _targets(self, y):
        return y.astype(np.int64) if self.task == "classification" else y.astype(np.float32)

    # -- batches ----------------------------------------------------------------------
    def num_train_batches(self, limit=None):
        n = len(self.splits["train"])
        batches = n // self.batch_size if n >= self.batch_size else 1  # drop the ragged last batch
        return min(batches, limit) if limit else batches

    def train_batches(self, epoch, start=0, limit=None):
        """(batch index, (x, y)) from ``start``; augmentation runs in the loader's thread."""
        from ..data.loader import BatchLoader, make_transform

        x = self.prepared("train")
        y = self._targets(self.splits["train"].y)
        loader = BatchLoader(x, y, min(self.batch_size, len(x)), shuffle=True, rng=_derived_rng(self.seed, 1, epoch),
                             transform=make_transform(None, self.augmenter) if self.augmenter else None,
                             drop_last=True)
        return enumerate(loader.batches(start, self.num_train_batches(limit)), start)

    def eval_batches(self, name):
        x = self.prepared(name)
        y = self._targets(self.splits[name].y)
        for begin in range(0, len(x), self.eval_batch_size):
            yield x[begin:begin + self.eval_batch_size], y[begin:begin + self.eval_batch_size]


class StreamFeeder(Feeder):
    """Stateful (N, T) character batches for truncated BPTT."""

    has_accuracy = False

    def __init__(self, dataset, config):
        super().__init__(dataset, config)
        self.seq_len = config["train"]["seq_len"]
        self.input_shape = (self.seq_len,)

    def has_split(self, name):
        return name in self.splits and len(self.splits[name]) > self.batch_size * (self.seq_len + 1)

    def num_train_batches(self, limit=None):
        n = len(self.splits["train"].x)
        batches = max(1, (n - 1) // (self.batch_size * self.seq_len))
        return min(batches, limit) if limit else batches

    def train_batches(self, epoch, start=0, limit=None):
        total = self.num_train_batches(limit)
        stream = self.dataset.stream_batches("train", self.batch_size, self.seq_len)
        for b, batch in enumerate(stream):
            if b >= total:
                return
            if b >= start:
                yield b, batch

    def eval_batches(self, name):
        yield from self.dataset.stream_batches(name, self.batch_size, self.seq_len)

    def score(self, out, yb):
        return 0.0, float(yb.size)  # the loss averages over every (N, T) position


class Seq2SeqFeeder(Feeder):
    """Generated (source, decoder input) -> decoder target batches, teacher forcing.

    Validation and test report token loss/accuracy under teacher forcing plus the
    sequence accuracy of greedy decoding (whole strings exactly right).
    """

    def __init__(self, dataset, config):
        super().__init__(dataset, config)
        self.generator = dataset.generator

    def num_train_batches(self, limit=None):
        return min(self.dataset.train_batches, limit) if limit else self.dataset.train_batches

    def train_batches(self, epoch, start=0, limit=None):
        for b in range(start, self.num_train_batches(limit)):
            source, decoder_input, target = self.generator.training_batch(self.batch_size, _derived_rng(self.seed, 1, epoch, b))
            yield b, ((source, decoder_input), target)

    def _by_length(self, name):
        groups = {}
        for text in self.splits[name].x:
            groups.setdefault(len(text), []).append(text)
        return groups

    def eval_batches(self, name):
        for _, strings in sorted(self._by_length(name).items()):
            for begin in range(0, len(strings), self.eval_batch_size):
                source, decoder_input, target = self.generator.arrays(strings[begin:begin + self.eval_batch_size])
                yield (source, decoder_input), target

    def extra_metrics(self, model, name):
        """Greedy-decoding sequence accuracy on a held-out split."""
        from ..models.seq2seq import sequence_accuracy

        seq2seq = model.layers[0] if hasattr(model, "layers") else model
        return {"sequence_accuracy": sequence_accuracy(seq2seq, self.generator, list(self.splits[name].x))}


def make_feeder(dataset, config):
    if dataset.task == "language_model":
        return StreamFeeder(dataset, config)
    if dataset.task == "seq2seq":
        return Seq2SeqFeeder(dataset, config)
    return ArrayFeeder(dataset, config)
