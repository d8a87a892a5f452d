"""Training on CUDA (simulator): the GTSRB net's first steps give the CPU's losses,
a step moves nothing but the batch in and scalars out, checkpoints cross devices,
results are deterministic, and a layer without CUDA kernels is refused by name."""
import numpy as np
import pytest

import rabbitkit
from rabbitkit.backend import cuda as cuda_backend
from rabbitkit.backend import device_of, get_backend
from rabbitkit.errors import BackendError
from rabbitkit.plugins import get_manager
from test_main_job import write_official_gtsrb


# The GTSRB net's layer types without pooling (which has CUDA kernels on another
# branch): strided and padded convolutions, batch norm on images and features, ReLU
# (fused into the layer before it), LCN, flatten, dense.
POOL_FREE = [
    {"type": "Conv2D", "out_channels": 3, "kernel_size": 3, "padding": 1, "bias": False},
    {"type": "BatchNorm"}, {"type": "ReLU"},
    {"type": "Conv2D", "out_channels": 4, "kernel_size": 3, "stride": 2},
    {"type": "BatchNorm"}, {"type": "ReLU"},
    {"type": "LocalContrastNorm", "kernel_size": 3},
    {"type": "Flatten"},
    {"type": "Dense", "out_features": 6, "bias": False}, {"type": "BatchNorm"}, {"type": "ReLU"},
    {"type": "Dense", "out_features": 43},
]
# The real architecture at its smallest: spatial transformer (its localization net has
# pooling), one conv per block, dropout.
GTSRB_CNN = {"architecture": "gtsrb_cnn", "channels": [[3], [4]], "fc_width": 6, "spatial_transformer": True}


@pytest.fixture(scope="module")
def gtsrb_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("gtsrb")
    write_official_gtsrb(root, tracks=2, per_track=4, tests_per_class=2)
    return root


def config(data, model, device):
    return {
        "experiment": {"name": "g", "seed": 3, "device": device},
        "data": {"dataset": "gtsrb", "path": str(data), "image_size": 6, "val_fraction": 0.5,
                 "preprocess": ["scale", "standardize"]},
        "model": model,
        # no clipping: on this branch clip_grad_norm copies one scalar per parameter to
        # the host; the device-resident clipping of branch 'cudarnn' copies none
        "train": {"epochs": 1, "max_steps_per_epoch": 2, "batch_size": 4, "lr": 0.05,
                  "optimizer": {"name": "sgd", "momentum": 0.9}},
        "output": {"visualizers": [], "progress": False},
    }


class Transfers:
    """Counts host<->device copies by wrapping the copy functions everything goes
    through (numba.cuda.to_device, the device array's copy_to_host / copy_to_device,
    the last only from a host array: device-to-device copies, such as the recurrent
    layers' state copies, stay on the device), and checks that no kernel is launched
    with a host array (an implicit copy)."""

    def __init__(self, monkeypatch):
        self.active = False
        self.log = []
        backend = get_backend("cuda")
        array_type = type(backend.empty(1, np.float32))
        module = backend.cuda
        record = self._record

        def wrap(original, direction, size_of):
            def wrapper(*args, **kwargs):
                record(direction, size_of(*args))
                return original(*args, **kwargs)
            return wrapper

        monkeypatch.setattr(module, "to_device", wrap(module.to_device, "in", lambda ary, *a: np.shape(ary)))
        monkeypatch.setattr(array_type, "copy_to_host",
                            wrap(array_type.copy_to_host, "out", lambda self, *a: tuple(self.shape)))
        monkeypatch.setattr(array_type, "copy_to_device", wrap(
            array_type.copy_to_device, "in", lambda self, ary, *a: None if device_of(ary) == "cuda" else np.shape(ary)))
        compiled = cuda_backend.CudaKernel.compiled

        def checked(kernel):
            launcher = compiled(kernel)
            if kernel.device:  # device functions are called from kernels, not launched
                return launcher

            class Checked:
                def __getitem__(self, config):
                    def launch(*args):
                        hosts = [a for a in args if isinstance(a, np.ndarray) and self_active()]
                        assert not hosts, f"kernel {kernel.__name__} launched with a host array"
                        return launcher[config](*args)
                    return launch
            return Checked()

        def self_active():
            return self.active

        monkeypatch.setattr(cuda_backend.CudaKernel, "compiled", checked)

    def _record(self, direction, shape):
        if self.active and shape is not None:
            self.log.append((direction, tuple(shape)))


class StepRecorder:
    """A plugin: records each training step's loss (and its transfers, if counting),
    and the drop probabilities of the model's Dropout layers."""

    def __init__(self, transfers=None):
        self.losses = []
        self.transfers = transfers
        self.per_step = []
        self.dropout = []

    @rabbitkit.hookimpl
    def rabbit_train_start(self, run):
        from rabbitkit.layers.dropout import Dropout

        self.dropout = [layer.p for _, layer in run.model.named_layers() if isinstance(layer, Dropout)]
        original = run._train_step

        def step(xb, yb):
            if self.transfers is not None:
                self.transfers.active = True
                self.transfers.log = []
            try:
                result = original(xb, yb)
            finally:
                if self.transfers is not None:
                    self.transfers.active = False
                    self.per_step.append((list(self.transfers.log), xb.shape, yb.shape))
            self.losses.append(result[0])
            return result

        run._train_step = step


def train(tmp_path, data, model, device, transfers=None):
    recorder = StepRecorder(transfers)
    manager = get_manager()
    manager.register(recorder)
    try:
        result = rabbitkit.run(config(data, model, device), out=tmp_path / "runs", quiet=True)
    finally:
        manager.unregister(recorder)
    return result, recorder


def check_two_steps_and_checkpoint(tmp_path, data, model, monkeypatch):
    transfers = Transfers(monkeypatch)
    on_cpu, cpu_steps = train(tmp_path, data, model, "cpu")
    on_cuda, cuda_steps = train(tmp_path, data, model, "cuda", transfers)
    # the CPU's losses, step by step, to float32 tolerance
    assert len(cuda_steps.losses) == 2
    np.testing.assert_allclose(cuda_steps.losses, cpu_steps.losses, rtol=1e-5)
    assert on_cuda.history[0]["train_accuracy"] == on_cpu.history[0]["train_accuracy"]
    # inside a step: the batch goes in (images for the model, labels for the loss and
    # for the accuracy count) and nothing else (Dropout makes its mask in its kernel),
    # and only scalars come out
    # (the first step also uploads, once, LCN's window taps and border weights for the
    # image size it meets: constants, cached on the device for every later step)
    for log, x_shape, y_shape in cuda_steps.per_step[1:]:
        inputs = [shape for direction, shape in log if direction == "in"]
        outputs = [shape for direction, shape in log if direction == "out"]
        assert sorted(inputs) == sorted([x_shape, y_shape, y_shape]), log
        assert all(int(np.prod(shape)) <= 3 for shape in outputs), log
        assert len(outputs) == 2, log  # the loss (one copy of its 3 sums) and the accuracy count
    # checkpoints are device-independent: the CUDA run's weights evaluated on the CPU
    from rabbitkit.train.evaluate import load_run

    on_host = load_run(on_cuda.run_dir, which="last", device="cpu")
    assert on_host.evaluate("test")["loss"] == pytest.approx(on_cuda.metrics["test_loss"], rel=1e-5)
    return cuda_steps


def test_gtsrb_layers_two_steps_on_cuda_match_cpu(tmp_path, gtsrb_data, monkeypatch):
    check_two_steps_and_checkpoint(tmp_path, gtsrb_data, {"layers": POOL_FREE}, monkeypatch)


def test_gtsrb_cnn_two_steps_on_cuda_match_cpu(tmp_path, gtsrb_data, monkeypatch):
    """With dropout in training mode: the CUDA run drops the CPU run's units (the same
    losses) and uploads no mask."""
    cuda_steps = check_two_steps_and_checkpoint(tmp_path, gtsrb_data, GTSRB_CNN, monkeypatch)
    assert cuda_steps.dropout and all(p > 0 for p in cuda_steps.dropout)


def char_rnn_config(corpus, device):
    return {
        "experiment": {"name": "c", "seed": 3, "device": device},
        "data": {"dataset": "text", "path": str(corpus), "split": [0.8, 0.1, 0.1]},
        "model": {"architecture": "char_rnn", "cell": "lstm", "hidden_size": 4, "num_layers": 2, "dropout": 0.5},
        "train": {"epochs": 1, "max_steps_per_epoch": 3, "batch_size": 2, "seq_len": 3, "optimizer": "adam",
                  "lr": 0.01, "clip_grad_norm": 1.0},
        "output": {"visualizers": [], "progress": False},
    }


def test_char_rnn_steps_on_cuda_move_only_the_batch_in_and_scalars_out(tmp_path, monkeypatch):
    """char-rnn's 2-layer stateful LSTM with dropout between its layers, clipping and
    Adam: the CUDA run gives the CPU run's losses (it drops the same units), and inside
    a step only the batch goes in (no dropout mask) and only scalars come out."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the cat sat on the mat. " * 20)
    recorders = {}
    transfers = Transfers(monkeypatch)
    manager = get_manager()
    for device in ("cpu", "cuda"):
        recorders[device] = StepRecorder(transfers if device == "cuda" else None)
        manager.register(recorders[device])
        try:
            rabbitkit.run(char_rnn_config(corpus, device), out=tmp_path / device, quiet=True)
        finally:
            manager.unregister(recorders[device])
    cpu_steps, cuda_steps = recorders["cpu"], recorders["cuda"]
    assert len(cuda_steps.losses) == 3
    np.testing.assert_allclose(cuda_steps.losses, cpu_steps.losses, rtol=1e-5)
    for log, x_shape, y_shape in cuda_steps.per_step:
        inputs = [shape for direction, shape in log if direction == "in"]
        outputs = [shape for direction, shape in log if direction == "out"]
        # the character ids for the OneHot layer (flattened) and the targets for the loss
        assert sorted(inputs) == sorted([(int(np.prod(x_shape)),), y_shape]), log
        assert outputs and all(int(np.prod(shape)) <= 3 for shape in outputs), log


def test_third_party_layer_is_refused_in_one_line_naming_it():
    from rabbitkit.layers.base import Layer
    from rabbitkit.layers.conv2d import Conv2D

    class LabNorm(Layer):  # a plugin layer with CPU kernels only
        def forward_cpu(self, x, training):
            return x

    with pytest.raises(BackendError) as info:
        rabbitkit.Sequential([Conv2D(1, 2, 3), LabNorm()]).to("cuda")
    message = str(info.value)
    assert "\n" not in message and message.startswith("layer LabNorm has no CUDA kernels")


def test_cuda_step_is_deterministic():
    """The same inputs give the same bits twice: outputs, every gradient and the
    gradient norm (all reductions are fixed-order trees, no atomics)."""
    from rabbitkit.layers.activations import ReLU
    from rabbitkit.layers.batchnorm import BatchNorm
    from rabbitkit.layers.conv2d import Conv2D
    from rabbitkit.layers.dense import Dense
    from rabbitkit.layers.flatten import Flatten
    from rabbitkit.losses import SoftmaxCrossEntropy
    from rabbitkit.optim import clip_grad_norm

    def make():
        rabbitkit.random.manual_seed(5)
        return rabbitkit.Sequential([Conv2D(2, 3, 3, padding=1), BatchNorm(3), ReLU(), Flatten(),
                                     Dense(3 * 5 * 4, 4)]).to("cuda")

    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 2, 5, 4)).astype(np.float32)
    y = np.array([0, 3, 1])
    runs = []
    for _ in range(2):
        model = make()
        model.zero_grad()
        out = model.forward(x)
        loss = SoftmaxCrossEntropy()
        value = loss.forward(out, y)
        model.backward(loss.backward())
        norm = clip_grad_norm(model.parameters(), 1e9)
        runs.append((value, norm, out.copy_to_host(), [p.grad.copy_to_host() for p in model.parameters()]))
    (v1, n1, o1, g1), (v2, n2, o2, g2) = runs
    assert v1 == v2 and n1 == n2
    np.testing.assert_array_equal(o1, o2)
    for a, b in zip(g1, g2):
        np.testing.assert_array_equal(a, b)


def test_cuda_benchmark_without_a_gpu_says_so():
    import os
    import pathlib
    import subprocess
    import sys

    script = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "bench_cuda.py"
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")  # no device, even on a machine with one
    done = subprocess.run([sys.executable, str(script), "--quick"], capture_output=True, text=True, env=env,
                          timeout=120)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "no CUDA GPU or driver found" in done.stdout
