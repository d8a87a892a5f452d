"""Losses: values against numpy, finite-difference gradients, stability, CUDA parity."""
import numpy as np
import pytest

from rabbitkit.backend import device_of, get_backend
from rabbitkit.errors import DataError
from rabbitkit.losses import SoftmaxCrossEntropy, SquaredError
from rabbitkit.plugins import registry
from rabbitkit.testing import check_loss_gradients


def cross_entropy_reference(logits, targets, ignore_index=None):
    """Mean -log softmax(logits)[target] over the kept positions, in float64 with log-sum-exp."""
    logits = np.asarray(logits, dtype=np.float64).reshape(-1, logits.shape[-1])
    targets = np.asarray(targets).reshape(-1)
    keep = np.ones(targets.shape, bool) if ignore_index is None else targets != ignore_index
    top = logits.max(axis=1, keepdims=True)
    log_probs = logits - top - np.log(np.exp(logits - top).sum(axis=1, keepdims=True))
    picked = log_probs[np.arange(len(targets))[keep], targets[keep]]
    return -picked.mean()


def test_losses_are_registered():
    losses = registry("losses")
    assert losses.get("softmax_cross_entropy") is SoftmaxCrossEntropy
    assert losses.get("squared_error") is SquaredError


@pytest.mark.parametrize("shape", [(1, 3), (4, 5), (3, 2, 4)])
def test_cross_entropy_value_and_gradients(shape, rng):
    logits = rng.standard_normal(shape) * 3
    targets = rng.integers(0, shape[-1], size=shape[:-1])
    loss = SoftmaxCrossEntropy()
    value = loss.forward(logits, targets)
    assert isinstance(value, float)
    np.testing.assert_allclose(value, cross_entropy_reference(logits, targets), rtol=1e-12)
    check_loss_gradients(loss, logits, targets)


def test_cross_entropy_gradient_is_softmax_minus_onehot_over_count(rng):
    logits = rng.standard_normal((3, 4))
    targets = np.array([0, 3, 1])
    loss = SoftmaxCrossEntropy()
    loss.forward(logits, targets)
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    p[np.arange(3), targets] -= 1
    np.testing.assert_allclose(loss.backward(), p / 3, rtol=1e-12)


def smoothed_reference(logits, targets, smoothing, ignore_index=None):
    """Mean of -sum_j q_j log p_j with q = (1 - s) onehot + s / V (PyTorch's label_smoothing)."""
    logits = np.asarray(logits, dtype=np.float64).reshape(-1, logits.shape[-1])
    targets = np.asarray(targets).reshape(-1)
    keep = np.ones(targets.shape, bool) if ignore_index is None else targets != ignore_index
    top = logits.max(axis=1, keepdims=True)
    log_probs = (logits - top - np.log(np.exp(logits - top).sum(axis=1, keepdims=True)))[keep]
    q = np.full(log_probs.shape, smoothing / logits.shape[1])
    q[np.arange(len(q)), targets[keep]] += 1 - smoothing
    return -(q * log_probs).sum(axis=1).mean()


@pytest.mark.parametrize("shape", [(1, 3), (4, 5), (3, 2, 4)])
def test_label_smoothing_value_and_gradients(shape, rng):
    logits = rng.standard_normal(shape) * 3
    targets = rng.integers(0, shape[-1], size=shape[:-1])
    if targets.size > 1:
        targets.flat[0] = -7  # one ignored position
    loss = SoftmaxCrossEntropy(ignore_index=-7, label_smoothing=0.1)
    np.testing.assert_allclose(loss.forward(logits, targets), smoothed_reference(logits, targets, 0.1, -7),
                               rtol=1e-12)
    check_loss_gradients(loss, logits, targets)
    assert SoftmaxCrossEntropy(label_smoothing=0.0).forward(logits, targets.clip(0)) == pytest.approx(
        cross_entropy_reference(logits, targets.clip(0)), rel=1e-12)


def test_label_smoothing_out_of_range_is_refused():
    from rabbitkit.errors import ConfigError

    with pytest.raises(ConfigError, match=r"label_smoothing must be in \[0, 1\), got 1.5"):
        SoftmaxCrossEntropy(label_smoothing=1.5)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_cross_entropy_is_stable_for_huge_logits(dtype):
    logits = np.array([[1e4, 0.0, -1e4], [1e4, 1e4, 0.0], [-1e4, 1e4, 5.0]], dtype=dtype)
    targets = np.array([0, 2, 0])
    loss = SoftmaxCrossEntropy()
    value = loss.forward(logits, targets)
    dy = loss.backward()
    assert np.isfinite(value) and np.all(np.isfinite(dy))
    # row 0 is certain and right (0), row 1 misses by 1e4 (+log 2), row 2 misses by 2e4
    np.testing.assert_allclose(value, (0.0 + (1e4 + np.log(2)) + 2e4) / 3, rtol=1e-6)
    np.testing.assert_allclose(dy, np.array([[0, 0, 0], [0.5, 0.5, -1], [-1, 1, 0]]) / 3, atol=1e-7)


def test_cross_entropy_ignore_index_averages_over_the_rest(rng):
    logits = rng.standard_normal((2, 4, 5))
    targets = np.array([[1, 4, -100, -100], [0, -100, 2, 3]])
    loss = SoftmaxCrossEntropy(ignore_index=-100)
    value = loss.forward(logits, targets)
    np.testing.assert_allclose(value, cross_entropy_reference(logits, targets, ignore_index=-100), rtol=1e-12)
    dy = loss.backward()
    assert not dy[targets == -100].any()
    check_loss_gradients(loss, logits, targets)


def test_cross_entropy_rejects_bad_targets():
    loss = SoftmaxCrossEntropy()
    with pytest.raises(DataError, match="outside the 3 classes"):
        loss.forward(np.zeros((2, 3)), np.array([0, 3]))
    with pytest.raises(DataError, match="targets of shape"):
        loss.forward(np.zeros((2, 3)), np.array([[0, 1]]))


def test_squared_error_is_half_the_summed_squares_per_sample(rng):
    y = rng.standard_normal((4, 3))
    t = rng.standard_normal((4, 3))
    loss = SquaredError()
    value = loss.forward(y, t)
    np.testing.assert_allclose(value, 0.5 * ((y - t) ** 2).sum() / 4, rtol=1e-12)
    np.testing.assert_allclose(loss.backward(), (y - t) / 4, rtol=1e-12)


@pytest.mark.parametrize("shape", [(1, 1), (5, 2), (2, 3, 2)])
def test_squared_error_gradients(shape, rng):
    check_loss_gradients(SquaredError(), rng.standard_normal(shape), rng.standard_normal(shape))


def test_squared_error_accepts_flat_targets_for_one_output(rng):
    y = rng.standard_normal((6, 1)).astype(np.float32)
    t = rng.standard_normal(6).astype(np.float32)
    loss = SquaredError()
    np.testing.assert_allclose(loss.forward(y, t), 0.5 * ((y[:, 0] - t) ** 2).sum() / 6, rtol=1e-6)
    assert loss.backward().shape == (6, 1) and loss.backward().dtype == np.float32
    with pytest.raises(DataError, match="shaped like"):
        loss.forward(y, t[:5])


def test_backward_before_forward_is_an_error():
    with pytest.raises(RuntimeError, match="before forward"):
        SquaredError().backward()


def test_parallel_kernels_on_a_large_batch(rng):
    # above the sized_kernel threshold, so the parallel reductions run
    logits = rng.standard_normal((4096, 10))
    targets = rng.integers(0, 10, size=4096)
    np.testing.assert_allclose(SoftmaxCrossEntropy().forward(logits, targets),
                               cross_entropy_reference(logits, targets), rtol=1e-12)
    y, t = rng.standard_normal((2, 40000, 1))
    np.testing.assert_allclose(SquaredError().forward(y, t), 0.5 * ((y - t) ** 2).sum() / 40000, rtol=1e-12)


CUDA_CASES = [
    (lambda: SoftmaxCrossEntropy(), (3, 4), "classes"),
    (lambda: SoftmaxCrossEntropy(), (2, 3, 4), "classes"),
    (lambda: SoftmaxCrossEntropy(ignore_index=-1), (2, 3, 4), "classes"),
    (lambda: SoftmaxCrossEntropy(ignore_index=-1, label_smoothing=0.2), (2, 3, 4), "classes"),
    (lambda: SquaredError(), (3, 2), "values"),
    (lambda: SquaredError(), (2, 2, 2), "values"),
]


@pytest.mark.parametrize("make,shape,kind", CUDA_CASES)
def test_cuda_matches_cpu(make, shape, kind):
    rng = np.random.default_rng(7)
    y = (rng.standard_normal(shape) * 3).astype(np.float32)
    if kind == "classes":
        t = rng.integers(0, shape[-1], size=shape[:-1])
        if make().ignore_index == -1:
            t.flat[1] = -1  # one padded position
    else:
        t = rng.standard_normal(shape).astype(np.float32)
    cpu_loss, cuda_loss = make(), make()
    cpu_value = cpu_loss.forward(y, t)
    cpu_dy = cpu_loss.backward().copy()
    device_y = get_backend("cuda").asarray(y)
    cuda_value = cuda_loss.forward(device_y, t)
    cuda_dy = cuda_loss.backward()
    assert device_of(cuda_dy) == "cuda"
    np.testing.assert_allclose(cuda_value, cpu_value, rtol=1e-5)
    np.testing.assert_allclose(cuda_dy.copy_to_host(), cpu_dy, rtol=1e-5, atol=1e-7)


def test_cuda_cross_entropy_rejects_bad_targets_and_takes_device_targets():
    backend = get_backend("cuda")
    y = backend.asarray(np.zeros((2, 3), dtype=np.float32))
    with pytest.raises(DataError, match="outside the 3 classes"):
        SoftmaxCrossEntropy().forward(y, np.array([0, 5]))
    value = SoftmaxCrossEntropy().forward(y, backend.asarray(np.array([0, 2], dtype=np.int64)))
    np.testing.assert_allclose(value, np.log(3), rtol=1e-6)
