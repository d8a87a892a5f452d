"""The training loop: one run from a resolved config to a complete run directory.

Randomness is derived from (seed, epoch, batch) rather than carried along, so a
run resumed from any checkpoint (epoch end or mid-epoch after Ctrl-C) replays
exactly the batches, augmentations and dropout masks of an uninterrupted run.
"""
import dataclasses
import math
import pathlib
import signal
import time

import numpy as np

from ..backend import to_host, tuning
from ..errors import ConfigError, RabbitError
from ..optim import clip_grad_norm
from ..plugins import get_manager
from ..progress import bar
from . import builder, checkpoint, status
from .config import config_hash, dump_toml
from .feeders import make_feeder
from .rundir import RunDirectory

LAST = "last.safetensors"
BEST = "best.safetensors"


class DivergenceError(RabbitError):
    """The loss became NaN or infinite, or grew past ``train.divergence_factor`` times its start.

    ``run_dir`` and ``history`` tell which run it was and what it had done (a sweep
    records a diverged point and goes on).
    """

    def __init__(self, message, run_dir=None, history=()):
        super().__init__(message)
        self.run_dir = run_dir
        self.history = list(history)


@dataclasses.dataclass
class Result:
    """What a run returns: its final metrics, the run directory and the per-epoch history."""

    run_dir: pathlib.Path
    metrics: dict
    history: list
    stopped: str = "completed"


def derived_seed(*parts):
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


class Run:
    """A live run: what hooks and visualizers receive (``run.model``, ``run.history``, ...)."""

    def __init__(self, config, run_dir, manager=None, progress=None, log_to_stdout=True):
        self.config = config
        self.manager = manager or get_manager()
        self.directory = RunDirectory(run_dir)
        self.run_dir = self.directory.path
        self.seed = config["experiment"]["seed"]
        self.device = config["experiment"]["device"]
        self.log_to_stdout = log_to_stdout
        self.progress_enabled = config["output"]["progress"] if progress is None else progress
        self.history = []
        self.epoch = 0  # epochs completed
        self.step = 0
        self.best = None
        self.initial_loss = None  # the first step's loss: the reference of train.divergence_factor
        self.interrupted = False
        self._set_threads(config["experiment"]["threads"])
        # tune = false fixes every kernel variant to its default; otherwise RABBIT_TUNE decides (default on).
        tuning.set_enabled(None if config["experiment"]["tune"] else False)
        # Another run's choices, replayed; restore() pins a resumed run's own instead.
        replayed = config["experiment"]["kernel_choices"]
        tuning.start_run(pinned=tuning.read_choices(replayed) if replayed else None)

        from .. import random as rk_random

        rk_random.manual_seed(self.seed)
        self.dataset = builder.build_dataset(config, self.manager)
        self.task = self.dataset.task
        with builder.blame(config, "data"):
            self.feeder = make_feeder(self.dataset, config)
        self.input_shape = self.feeder.input_shape
        self.model = builder.build_model(config, self.input_shape, self.feeder.num_outputs, self.manager)
        builder.initialize(config, self.model, np.random.default_rng(derived_seed(self.seed, 0)))
        self._frozen = builder.freeze_layers(config, self.model)  # before the optimizer sees the parameters
        self.model.skip_input_grad()  # nothing uses the gradient w.r.t. the data
        if self.device != "cpu":
            self.model.to(self.device)
        self.params = self.model.parameters()
        self.loss = builder.build_loss(config, self.task, self.manager)
        self.optimizer = builder.build_optimizer(config, self.params, self.manager)
        self._multipliers = builder.multiplier_summary(self.optimizer)
        self.regularizers = builder.build_regularizers(config, self.manager)
        self.schedule = builder.build_schedule(config)
        self.visualizers = builder.build_visualizers(config, self.manager)
        monitor = config["train"]["monitor"]
        if monitor is None:
            monitor = "val_accuracy" if self.feeder.has_accuracy else "val_loss"
            if not self.feeder.has_split("val"):
                monitor = monitor.replace("val_", "train_")
        self.monitor = monitor
        self.higher_is_better = "accuracy" in monitor
        self.hash = config_hash(config)
        factor = config["train"]["divergence_factor"]
        if 0 < factor <= 1:
            raise ConfigError(f"{config['source']}: train.divergence_factor: expected 0 (off) or a multiple > 1, "
                              f"got {factor!r}")
        self.test_missing = None if self.feeder.has_split("test") else self.dataset.info.get("test_missing")

    # -- small services ---------------------------------------------------------------
    @staticmethod
    def _set_threads(threads):
        if threads:
            import numba

            numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))

    def log(self, message):
        self.directory.log(message)
        if self.log_to_stdout:
            print(message, flush=True)

    # -- checkpoints ------------------------------------------------------------------
    def _state(self, position):
        groups = {
            "model": self.model.state_dict(),
            "optim": self.optimizer.state_dict(),
            "preprocess": self.feeder.state_dict(),
        }
        metadata = {
            "config_hash": self.hash,
            "epoch": self.epoch,
            "step": self.step,
            "position": position,
            "schedule": self.schedule.state_dict(),
            "history": self.history,
            "best": self.best,
            "lr": self.optimizer.lr,
            "initial_loss": self.initial_loss,
            "kernel_choices": tuning.used(),
        }
        return groups, metadata

    def save_checkpoint(self, name=LAST, position=None):
        groups, metadata = self._state(position)
        checkpoint.save(self.directory.checkpoints / name, groups, metadata)
        self.directory.write_json(tuning.CHOICES_FILE, metadata["kernel_choices"])

    def restore(self, path):
        """Load a checkpoint into this run (weights, optimizer, schedule, history, position)."""
        groups, metadata = checkpoint.load(path)
        from ..errors import CheckpointError

        if metadata.get("config_hash") != self.hash:
            raise CheckpointError(f"{path}: checkpoint belongs to a different model/data configuration")
        self.model.load_state_dict(groups.get("model", {}))
        self.optimizer.load_state_dict(groups.get("optim", {}))
        self.feeder.load_state_dict(groups.get("preprocess", {}))
        self.schedule.load_state_dict(metadata["schedule"])
        self.history = metadata["history"]
        self.best = metadata["best"]
        self.epoch = metadata["epoch"]
        self.step = metadata["step"]
        self.optimizer.lr = metadata["lr"]
        self.initial_loss = metadata.get("initial_loss")
        # The kernel variants the run had chosen: with other ones (the cache measured
        # again since), the resumed epochs would round differently from an uninterrupted run.
        choices = metadata.get("kernel_choices", {})
        wrong = [v for v in choices.values() if not isinstance(v, str)] if isinstance(choices, dict) else [choices]
        if wrong:
            raise CheckpointError(f"{path}: 'kernel_choices' must map kernel shapes to variant names, "
                                  f"got {wrong[0]!r:.80}")
        tuning.start_run(pinned=choices)
        return metadata.get("position")

    # -- the loop ---------------------------------------------------------------------
    def train(self, resume_from=None):
        config = self.config
        train_cfg = config["train"]
        position = None
        if resume_from is not None:
            position = self.restore(resume_from)
            self.log(f"resumed from {resume_from} at epoch {self.epoch + 1}" +
                     (f", batch {position['batch'] + 1}" if position else ""))
        else:
            self.feeder.fit()
            self.directory.write_config(dump_toml(config))
            self.log(f"run {self.run_dir}: {config['data']['dataset']} ({self.task}), "
                     f"{self.model.num_parameters():,} parameters, device {self.device}")
            for line in (builder.load_pretrained(config, self.model, self.manager), self._frozen, self._multipliers):
                if line:
                    self.log(line)
        if self.test_missing:
            self.log(f"warning: no test split ({self.test_missing}); the run will end without test metrics")
        status.mark_running(self.run_dir, self.monitor, train_cfg["epochs"], self.epoch)
        stopped = "failed"
        try:
            stopped, result = self._train_epochs(position)
        except DivergenceError:
            stopped = "diverged"
            raise
        except KeyboardInterrupt:
            stopped = "interrupted"
            raise
        finally:
            status.write_status(self.run_dir, state=stopped, epochs_done=self.epoch)
        return result

    def _train_epochs(self, position):
        from .. import warn_if_sharing_cores_with_torch

        warn_if_sharing_cores_with_torch()
        train_cfg = self.config["train"]
        self.manager.hook.rabbit_train_start(run=self)
        stopped = "completed"
        previous = signal.getsignal(signal.SIGINT)
        installed = False
        try:
            signal.signal(signal.SIGINT, self._on_interrupt)
            installed = True
        except ValueError:  # not the main thread
            pass
        try:
            while self.epoch < train_cfg["epochs"]:
                metrics = self._run_epoch(position)
                position = None
                if metrics is None:  # interrupted
                    stopped = "interrupted"
                    break
                if self._early_stop():
                    stopped = "early_stopping"
                    self.log(f"early stopping: {self.monitor} has not improved for "
                             f"{train_cfg['early_stopping']['patience']} epochs")
                    break
        except DivergenceError as err:
            last = self.directory.checkpoints / LAST
            where = (f"the last good checkpoint is {last}" if last.is_file()
                     else "no checkpoint was written before it (nothing to resume)")
            message = f"{err}; {where}"
            self.directory.log(f"stopped: {message}")  # the caller reports the error itself: said once
            raise DivergenceError(message, self.run_dir, self.history) from None
        finally:
            if installed:
                signal.signal(signal.SIGINT, previous)
        if stopped == "interrupted":
            return stopped, Result(self.run_dir, self.history[-1] if self.history else {}, self.history, stopped)
        final = self.finish()
        result = Result(self.run_dir, final, self.history, stopped)
        self.manager.hook.rabbit_train_end(run=self, result=result)
        return stopped, result

    def _on_interrupt(self, signum, frame):
        if self.interrupted:  # a second Ctrl-C stops at once
            raise KeyboardInterrupt
        self.interrupted = True

    def _run_epoch(self, position):
        train_cfg = self.config["train"]
        epoch = self.epoch
        lr = self.schedule.lr_for(epoch)
        self.optimizer.lr = lr
        start_batch = position["batch"] + 1 if position else 0
        sums = dict(position["sums"]) if position else {"loss": 0.0, "correct": 0.0, "count": 0.0, "samples": 0.0,
                                                         "seconds": 0.0}
        limit = train_cfg["max_steps_per_epoch"] or None
        total = self.feeder.num_train_batches(limit)
        progress = bar(total, f"epoch {epoch + 1}/{train_cfg['epochs']}", self.progress_enabled, unit="batch",
                       initial=start_batch)
        self.model.reset_state()
        started = time.perf_counter()
        batch_index = start_batch - 1
        with progress:  # closed on any exit, a divergence included
            for batch_index, (xb, yb) in self.feeder.train_batches(epoch, start_batch, limit):
                self.model.seed(derived_seed(self.seed, 3, epoch, batch_index))
                loss_value, correct, count = self._train_step(xb, yb)
                sums["loss"] += loss_value * count
                sums["correct"] += correct
                sums["count"] += count
                sums["samples"] += len(yb)
                self.step += 1
                progress.update(1, **self._progress_postfix(sums, started))
                if self.interrupted:
                    sums["seconds"] += time.perf_counter() - started
                    progress.close()
                    self.save_checkpoint(LAST, {"batch": batch_index, "sums": sums})
                    self.log(f"interrupted: checkpoint saved at epoch {epoch + 1}, batch {batch_index + 1}; "
                             f"continue with: rabbit resume {self.run_dir}")
                    return None
        sums["seconds"] += time.perf_counter() - started
        metrics = {"epoch": epoch + 1, "lr": lr}
        metrics["train_loss"] = sums["loss"] / max(sums["count"], 1)
        if self.feeder.has_accuracy:
            metrics["train_accuracy"] = sums["correct"] / max(sums["count"], 1)
        if self.regularizers:
            metrics["reg_penalty"] = float(sum(r.penalty(self.params) for r in self.regularizers))
        for split in ("val",):
            if self.feeder.has_split(split):
                metrics.update({f"{split}_{k}": v for k, v in self.evaluate(split).items()})
        if self.task == "language_model":
            for key in [k for k in metrics if k.endswith("_loss")]:
                metrics[key.replace("_loss", "_bpc")] = metrics[key] / math.log(2)
        self._check_finite_divergence(metrics["train_loss"])
        metrics["samples_per_s"] = sums["samples"] / max(sums["seconds"], 1e-9)
        metrics["epoch_seconds"] = sums["seconds"]
        metrics["wall_seconds"] = (self.history[-1]["wall_seconds"] if self.history else 0.0) + sums["seconds"]
        self.epoch += 1
        self.history.append(metrics)
        improved = self._track_best(metrics)
        if isinstance(self.schedule, builder.get_schedule("plateau")):
            self.schedule.observe(metrics.get(self.monitor), self.higher_is_better)
        if improved:
            self.save_checkpoint(BEST)
        if self.epoch % self.config["output"]["checkpoint_every"] == 0 or self.epoch == train_cfg["epochs"]:
            self.save_checkpoint(LAST)
        self.directory.write_metrics(self.history)
        status.write_status(self.run_dir, epochs_done=self.epoch)
        self.log(self._epoch_line(metrics))
        self.manager.hook.rabbit_epoch_end(run=self, epoch=self.epoch, metrics=metrics)
        return metrics

    def _progress_postfix(self, sums, started):
        postfix = {"loss": sums["loss"] / max(sums["count"], 1)}
        if self.feeder.has_accuracy:
            postfix["acc"] = sums["correct"] / max(sums["count"], 1)
        elapsed = time.perf_counter() - started + sums["seconds"]
        postfix["samples/s"] = f"{sums['samples'] / max(elapsed, 1e-9):.0f}"
        return postfix

    def _check_finite_divergence(self, train_loss):
        """char-rnn's rule: an epoch whose training loss exceeds ``factor`` x the first step's has diverged."""
        factor = self.config["train"]["divergence_factor"]
        if not factor or self.initial_loss is None or self.initial_loss <= 0:
            return
        if train_loss > factor * self.initial_loss:
            raise DivergenceError(
                f"loss is {train_loss:.4g} at epoch {self.epoch + 1}, more than train.divergence_factor = {factor:g} "
                f"times the first step's {self.initial_loss:.4g}")

    def _train_step(self, xb, yb):
        model = self.model
        model.zero_grad()
        out = model.forward(xb, training=True)
        loss_value = self.loss.forward(out, yb)
        if not math.isfinite(loss_value):
            raise DivergenceError(f"loss is {loss_value} at epoch {self.epoch + 1}, step {self.step + 1}")
        if self.initial_loss is None:
            self.initial_loss = float(loss_value)
        model.backward(self.loss.backward())
        for regularizer in self.regularizers:
            regularizer.add_gradients(self.params)
        clip = self.config["train"]["clip_grad_norm"]
        if clip:
            clip_grad_norm(self.params, clip, return_norm=False)  # on CUDA: no host copy
        self.optimizer.step()
        for regularizer in self.regularizers:
            regularizer.after_step(self.params)
        correct, count = self.feeder.score(out, yb)
        return loss_value, correct, count

    def evaluate(self, split, collect=False):
        """Loss (and accuracy) of the current model on a split; ``collect`` keeps predictions."""
        self.model.reset_state()
        total_loss = correct = count = 0.0
        predictions, targets = [], []
        with bar(None, f"evaluating {split}", self.progress_enabled, unit="batch") as progress:
            for xb, yb in self.feeder.eval_batches(split):
                out = self.model.forward(xb, training=False)
                loss_value = self.loss.forward(out, yb)
                c, n = self.feeder.score(out, yb)
                total_loss += loss_value * n
                correct += c
                count += n
                if collect:
                    predictions.append(np.asarray(to_host(out)))
                    targets.append(np.asarray(yb))
                progress.update(1)
        metrics = {"loss": total_loss / max(count, 1)}
        if self.feeder.has_accuracy:
            metrics["accuracy"] = correct / max(count, 1)
        if hasattr(self.feeder, "extra_metrics"):
            metrics.update(self.feeder.extra_metrics(self.model, split))
        if collect:
            metrics["outputs"] = np.concatenate(predictions) if predictions else np.zeros((0,))
            metrics["targets"] = np.concatenate(targets) if targets else np.zeros((0,))
        return metrics

    def _track_best(self, metrics):
        value = metrics.get(self.monitor)
        if value is None:
            return False
        better = self.best is None or (value > self.best["value"] if self.higher_is_better else value < self.best["value"])
        if better:
            self.best = {"value": value, "epoch": metrics["epoch"], "metric": self.monitor}
        return better

    def _early_stop(self):
        rule = self.config["train"]["early_stopping"]
        if not rule or self.best is None:
            return False
        metric = rule["metric"] or self.monitor
        values = [h.get(metric) for h in self.history if h.get(metric) is not None]
        if len(values) <= rule["patience"]:
            return False
        higher = "accuracy" in metric
        best_before = max(values[:-rule["patience"]]) if higher else min(values[:-rule["patience"]])
        recent = values[-rule["patience"]:]
        if higher:
            return max(recent) <= best_before + rule["min_delta"]
        return min(recent) >= best_before - rule["min_delta"]

    def _epoch_line(self, m):
        parts = [f"epoch {m['epoch']:>3}", f"lr {m['lr']:.3g}", f"loss {m['train_loss']:.4f}"]
        if "train_accuracy" in m:
            parts.append(f"acc {m['train_accuracy']:.4f}")
        if "val_loss" in m:
            parts.append(f"val_loss {m['val_loss']:.4f}")
        if "val_accuracy" in m:
            parts.append(f"val_acc {m['val_accuracy']:.4f}")
        if "val_sequence_accuracy" in m:
            parts.append(f"val_seq_acc {m['val_sequence_accuracy']:.4f}")
        if "val_bpc" in m:
            parts.append(f"val_bpc {m['val_bpc']:.3f}")
        parts.append(f"{m['samples_per_s']:.0f} samples/s")
        parts.append(f"{m['epoch_seconds']:.1f}s")
        return "  ".join(parts)

    # -- the end ---------------------------------------------------------------------
    def _test_time_augmentation(self):
        """Test metrics with the views of ``[eval] tta`` (none unless configured), and their cost."""
        from .tta import parse_views, predict

        views = parse_views(self.config["eval"]["tta"])
        if len(views) == 1 and views[0].identity or self.task != "classification":
            return {}
        prediction = predict(self, "test", views)
        self.log(f"test with test-time augmentation ({len(views)} views): accuracy {prediction.accuracy:.4f}  "
                 f"loss {prediction.loss:.4f}  ({prediction.seconds:.1f}s)")
        return {"test_tta_accuracy": prediction.accuracy, "test_tta_loss": prediction.loss,
                "test_tta_seconds": prediction.seconds}

    def finish(self):
        """Test with the best (or, with ``train.test_checkpoint = "last"``, the last)
        checkpoint, write final metrics, run visualizers."""
        final = dict(self.history[-1]) if self.history else {}
        best_path = self.directory.checkpoints / BEST
        if best_path.exists() and self.best is not None:
            if self.config["train"]["test_checkpoint"] == "best":
                groups, _ = checkpoint.load(best_path)
                self.model.load_state_dict(groups["model"])
            final["best_epoch"] = self.best["epoch"]
            final[f"best_{self.monitor}"] = self.best["value"]
        final["tested_checkpoint"] = self.config["train"]["test_checkpoint"]
        if self.feeder.has_split("test"):
            test = self.evaluate("test")
            final.update({f"test_{k}": v for k, v in test.items()})
            if self.task == "language_model":
                final["test_bpc"] = final["test_loss"] / math.log(2)
            self.log("test: " + "  ".join(f"{k[5:]} {v:.4f}" for k, v in final.items() if k.startswith("test_")))
            final.update(self._test_time_augmentation())
        # With the test's shapes too (another batch size): a replay then tests as this run did.
        self.directory.write_json(tuning.CHOICES_FILE, tuning.used())
        self.directory.write_json("final_metrics.json", final)
        for name, visualizer in self.visualizers:
            try:
                written = visualizer(self)
                if written:
                    self.log(f"{name}: wrote {', '.join(str(pathlib.Path(p).name) for p in written)}")
            except RabbitError as err:
                self.log(f"visualizer '{name}' skipped: {err}")
        return final
