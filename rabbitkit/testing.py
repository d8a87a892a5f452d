"""Public checks for layer authors: finite-difference gradients and CPU/CUDA parity.

Used by rabbitkit's own tests and offered to plugin authors::

    from rabbitkit.testing import check_gradients
    check_gradients(MyLayer(3, 4, dtype="float64"), (2, 3))

Both raise ``AssertionError`` listing the first mismatches (tensor, index,
analytic, numeric), as llm.c's kernel checks print them, and return a report.
"""
from dataclasses import dataclass, field

import numpy as np

from .backend import to_host

__all__ = ["check_gradients", "check_loss_gradients", "check_cuda_parity", "numeric_gradient", "GradientReport"]


@dataclass
class GradientReport:
    """What a check compared: entries per tensor, entries skipped at kinks, worst error."""

    checked: dict = field(default_factory=dict)
    skipped: dict = field(default_factory=dict)
    max_error: float = 0.0
    mismatches: list = field(default_factory=list)

    def add(self, name, index, analytic, numeric, rtol, atol):
        error = abs(analytic - numeric)
        scale = max(abs(analytic), abs(numeric))
        self.max_error = max(self.max_error, error / max(scale, 1.0))
        self.checked[name] = self.checked.get(name, 0) + 1
        if error > atol + rtol * scale:
            self.mismatches.append((name, index, analytic, numeric))

    def raise_if_failed(self, what):
        if self.mismatches:
            lines = [f"{what}: {len(self.mismatches)} gradient entries differ (first ones):"]
            for name, index, analytic, numeric in self.mismatches[:8]:
                lines.append(f"  {name}{list(index)}: analytic {analytic:.9g}, numeric {numeric:.9g}")
            raise AssertionError("\n".join(lines))


def _sample_indices(shape, max_checks, rng):
    total = int(np.prod(shape))
    flat = np.arange(total) if total <= max_checks else rng.choice(total, size=max_checks, replace=False)
    return [np.unravel_index(i, shape) for i in flat]


def check_gradients(
    layer,
    input_shape=None,
    *,
    inputs=None,
    seed=0,
    eps=1e-6,
    rtol=1e-4,
    atol=1e-6,
    kink=None,
    kink_range=1e-3,
    max_checks=150,
    training=True,
    input_range=(-1.0, 1.0),
    check_input=True,
):
    """Compare a layer's backward pass against central finite differences (float64).

    The scalar probed is ``sum(forward(x) * r)`` for a fixed random ``r``, so every
    output contributes.  ``kink``: input value where the layer is not smooth (0 for
    ReLU); input entries within ``kink_range`` of it are skipped, as Caffe's
    checker does.  Stochastic layers are re-seeded before every forward pass, so
    dropout keeps one mask.  ``inputs`` replaces the random input (e.g. integer
    indices for an embedding, with ``check_input=False``).
    """
    if layer.dtype != np.float64:
        raise ValueError(f"check_gradients needs a float64 layer, got {layer.dtype} for {type(layer).__name__}")
    rng = np.random.default_rng(seed)
    if inputs is None:
        x = rng.uniform(*input_range, size=input_shape)
    else:
        x = np.array(inputs, copy=True)
    float_input = np.issubdtype(x.dtype, np.floating)
    x = x.astype(np.float64) if float_input else x

    def forward(values):
        layer.seed(seed)
        return np.array(to_host(layer.forward(values, training=training)), dtype=np.float64)

    y = forward(x)
    probe = rng.standard_normal(y.shape)

    def objective(values):
        return float(np.sum(forward(values) * probe))

    layer.zero_grad()
    forward(x)
    dx = np.array(to_host(layer.backward(probe.copy())), dtype=np.float64)
    analytic = {name: np.array(to_host(owner.grads[key])) for name, owner, key in layer.named_parameters()}

    report = GradientReport()
    if check_input and float_input:
        for index in _sample_indices(x.shape, max_checks, rng):
            if kink is not None and abs(x[index] - kink) < kink_range:
                report.skipped["input"] = report.skipped.get("input", 0) + 1
                continue
            numeric = _central_difference(objective, x, index, eps)
            report.add("input", index, dx[index], numeric, rtol, atol)

    for name, owner, key in layer.named_parameters():
        param = owner.params[key]
        for index in _sample_indices(param.shape, max_checks, rng):
            numeric = _central_difference(lambda _: objective(x), param, index, eps)
            report.add(name, index, analytic[name][index], numeric, rtol, atol)

    report.raise_if_failed(f"gradient check of {type(layer).__name__}")
    return report


def _central_difference(objective, array, index, eps):
    saved = array[index]
    array[index] = saved + eps
    plus = objective(array)
    array[index] = saved - eps
    minus = objective(array)
    array[index] = saved
    return (plus - minus) / (2 * eps)


def numeric_gradient(objective, x, eps=1e-6):
    """Central-difference gradient of the scalar ``objective(x)`` at every entry of x
    (float64; x is perturbed in place and restored): for checking whole chains, such
    as an input gradient through a model, that :func:`check_gradients` does not cover."""
    grad = np.zeros_like(x)
    for index in np.ndindex(x.shape):
        grad[index] = _central_difference(objective, x, index, eps)
    return grad


def check_loss_gradients(loss, outputs, targets, *, eps=1e-6, rtol=1e-4, atol=1e-7, max_checks=150, seed=0):
    """Finite-difference check of ``loss.backward()`` against ``loss.forward(y, t)``."""
    rng = np.random.default_rng(seed)
    y = np.array(outputs, dtype=np.float64)
    loss.forward(y, targets)
    dy = np.array(to_host(loss.backward()), dtype=np.float64)
    report = GradientReport()
    for index in _sample_indices(y.shape, max_checks, rng):
        numeric = _central_difference(lambda values: float(loss.forward(values, targets)), y, index, eps)
        report.add("output", index, dy[index], numeric, rtol, atol)
    report.raise_if_failed(f"gradient check of {type(loss).__name__}")
    return report


def check_cuda_parity(make_layer, input_shape, *, seed=0, rtol=1e-4, atol=1e-5, training=True, inputs=None):
    """Run one layer's CPU and CUDA kernels on the same data and compare everything.

    ``make_layer()`` builds a fresh float32 layer; the CUDA copy gets the CPU
    copy's parameters.  Compares the output, the input gradient and every
    parameter gradient, listing the first mismatches.
    """
    cpu_layer = make_layer()
    cuda_layer = make_layer()
    cuda_layer.load_state_dict(cpu_layer.state_dict())
    cuda_layer.to("cuda")
    rng = np.random.default_rng(seed)
    x = rng.uniform(-1, 1, size=input_shape).astype(cpu_layer.dtype) if inputs is None else np.asarray(inputs)
    results = {}
    for device, layer in (("cpu", cpu_layer), ("cuda", cuda_layer)):
        layer.seed(seed)
        layer.zero_grad()
        y = np.array(to_host(layer.forward(x, training=training)))
        results.setdefault("probe", np.random.default_rng(seed + 1).standard_normal(y.shape).astype(y.dtype))
        dx = layer.backward(results["probe"])
        results[device] = {"output": y}
        if dx is not None and np.issubdtype(x.dtype, np.floating):
            results[device]["input grad"] = np.array(to_host(dx))
        for name, owner, key in layer.named_parameters():
            results[device][f"grad {name}"] = np.array(to_host(owner.grads[key]))
    problems = []
    for name, expected in results["cpu"].items():
        actual = results["cuda"][name]
        if actual.shape != expected.shape:
            problems.append(f"  {name}: shape {actual.shape} on cuda, {expected.shape} on cpu")
            continue
        bad = np.argwhere(~np.isclose(actual, expected, rtol=rtol, atol=atol))
        for index in bad[:5]:
            index = tuple(index)
            problems.append(f"  {name}{list(index)}: cuda {actual[index]:.7g}, cpu {expected[index]:.7g}")
    if problems:
        raise AssertionError(f"CUDA/CPU mismatch for {type(cpu_layer).__name__}:\n" + "\n".join(problems))
    return results
