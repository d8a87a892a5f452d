"""Gram matrix, style, content and total-variation losses (rabbitkit.layers.style_losses)."""
import numpy as np
import pytest

from rabbitkit.backend import device_of, get_backend
from rabbitkit.errors import ConfigError
from rabbitkit.testing import numeric_gradient
from rabbitkit.layers.style_losses import (ContentLoss, GramMatrix, StyleLoss, TotalVariationLoss, blend_grams,
                                           gram_matrix, normalised_blend)


def reference_gram(f):
    n, c, h, w = f.shape
    flat = f.reshape(n, c, h * w).astype(np.float64)
    return np.einsum("ncp,ndp->ncd", flat, flat) / (c * h * w)


def reference_tv(x, weight):
    right = x[:, :, :-1, :-1] - x[:, :, :-1, 1:]
    down = x[:, :, :-1, :-1] - x[:, :, 1:, :-1]
    return 0.5 * weight * float(np.sum(right ** 2 + down ** 2))


def reference_tv_gradient(x, weight):
    """neural-style's TVLoss:updateGradInput, transcribed."""
    g = np.zeros_like(x)
    right = x[:, :, :-1, :-1] - x[:, :, :-1, 1:]
    down = x[:, :, :-1, :-1] - x[:, :, 1:, :-1]
    g[:, :, :-1, :-1] += right + down
    g[:, :, :-1, 1:] -= right
    g[:, :, 1:, :-1] -= down
    return weight * g


@pytest.fixture
def features():
    return np.random.default_rng(0).normal(size=(2, 3, 4, 5))


def test_gram_matrix_values(features):
    np.testing.assert_allclose(gram_matrix(features), reference_gram(features), rtol=1e-13, atol=1e-15)
    single = gram_matrix(features.astype(np.float32))
    assert single.dtype == np.float32
    np.testing.assert_allclose(single, reference_gram(features), rtol=1e-5, atol=1e-6)


def test_gram_matrix_is_invariant_under_permuting_spatial_positions(features):
    n, c, h, w = features.shape
    permutation = np.random.default_rng(1).permutation(h * w)
    assert (permutation != np.arange(h * w)).any()
    shuffled = features.reshape(n, c, h * w)[:, :, permutation].reshape(n, c, h, w)
    np.testing.assert_allclose(gram_matrix(shuffled), gram_matrix(features), rtol=1e-12, atol=1e-14)
    # ... and not under permuting channels (the test can fail)
    channels = features[:, [1, 0, 2]]
    assert not np.allclose(gram_matrix(channels), gram_matrix(features))


def test_gram_backward_matches_finite_differences(features):
    probe = np.random.default_rng(2).normal(size=(2, 3, 3))  # not symmetric: the general backward
    gram = GramMatrix()
    gram.forward(features)
    analytic = gram.backward(probe)
    numeric = numeric_gradient(lambda f: float(np.sum(GramMatrix().forward(f) * probe)), features.copy())
    np.testing.assert_allclose(analytic, numeric, rtol=1e-6, atol=1e-9)


def test_style_loss_value_and_gradient(features):
    rng = np.random.default_rng(3)
    target = reference_gram(rng.normal(size=(1, 3, 6, 2)))[0]
    loss = StyleLoss(target, weight=7.0)
    value = loss.forward(features)
    expected = 7.0 * sum(np.mean((g - target) ** 2) for g in reference_gram(features))
    np.testing.assert_allclose(value, expected, rtol=1e-12)
    analytic = loss.backward().copy()
    numeric = numeric_gradient(lambda f: StyleLoss(target, weight=7.0).forward(f), features.copy())
    np.testing.assert_allclose(analytic, numeric, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(loss.gram, reference_gram(features), rtol=1e-12)


def test_style_loss_with_a_non_symmetric_target_still_has_the_exact_gradient(features):
    target = np.random.default_rng(4).normal(size=(3, 3))
    loss = StyleLoss(target, weight=0.5)
    loss.forward(features)
    numeric = numeric_gradient(lambda f: StyleLoss(target, weight=0.5).forward(f), features.copy())
    np.testing.assert_allclose(loss.backward(), numeric, rtol=1e-6, atol=1e-9)


def test_style_blend_is_the_normalised_weighted_sum_of_grams():
    rng = np.random.default_rng(5)
    a, b = rng.normal(size=(1, 4, 3, 3)), rng.normal(size=(1, 4, 5, 2))
    loss = StyleLoss.from_features([a, b], weight=2.0, blend=[0.7, 0.3])
    np.testing.assert_allclose(loss.target, 0.7 * reference_gram(a)[0] + 0.3 * reference_gram(b)[0], rtol=1e-12)
    same = StyleLoss.from_features([a, b], blend=[7, 3])
    np.testing.assert_allclose(same.target, loss.target, rtol=1e-12)
    equal = StyleLoss.from_features([a, b])
    np.testing.assert_allclose(equal.target, 0.5 * (reference_gram(a)[0] + reference_gram(b)[0]), rtol=1e-12)
    x = rng.normal(size=(1, 4, 3, 4))
    loss.forward(x)
    numeric = numeric_gradient(lambda f: StyleLoss(loss.target, weight=2.0).forward(f), x.copy())
    np.testing.assert_allclose(loss.backward(), numeric, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("blend,message", [
    ([0.7], "1 weight.*for 2 style image"),
    ([0.2, 0.3, 0.5], "3 weight.*for 2 style image"),
    ([1.0, -1.0], "non-negative"),
    ([0.0, 0.0], "positive sum"),
])
def test_blend_weights_that_do_not_match_are_refused(blend, message):
    with pytest.raises(ConfigError, match=message):
        normalised_blend(blend, 2)


def test_blending_grams_of_different_layers_is_refused():
    with pytest.raises(ConfigError, match="cannot be blended"):
        blend_grams([np.eye(3), np.eye(4)])


def test_content_loss_value_and_gradient(features):
    target = np.random.default_rng(6).normal(size=features.shape)
    loss = ContentLoss(target, weight=5.0)
    value = loss.forward(features)
    np.testing.assert_allclose(value, 5.0 * np.mean((features - target) ** 2), rtol=1e-12)
    numeric = numeric_gradient(lambda f: ContentLoss(target, weight=5.0).forward(f), features.copy())
    np.testing.assert_allclose(loss.backward(), numeric, rtol=1e-6, atol=1e-9)
    with pytest.raises(ConfigError, match="shape"):
        loss.forward(features[:, :2])


@pytest.mark.parametrize("shape", [(1, 3, 5, 6), (2, 2, 2, 3), (1, 1, 1, 4)])
def test_total_variation_matches_neural_style_and_finite_differences(shape):
    x = np.random.default_rng(7).normal(size=shape)
    loss = TotalVariationLoss(weight=1e-3)
    value = loss.forward(x)
    np.testing.assert_allclose(value, reference_tv(x, 1e-3), rtol=1e-12, atol=1e-18)
    np.testing.assert_allclose(loss.backward(), reference_tv_gradient(x, 1e-3), rtol=1e-12, atol=1e-18)
    numeric = numeric_gradient(lambda z: TotalVariationLoss(weight=1e-3).forward(z), x.copy())
    np.testing.assert_allclose(loss.backward(), numeric, rtol=1e-6, atol=1e-12)


def test_total_variation_of_a_constant_image_is_zero_and_of_an_edge_is_not():
    flat = np.full((1, 3, 4, 4), 0.3)
    assert TotalVariationLoss().forward(flat) == 0.0
    edge = flat.copy()
    edge[:, :, :, 2:] = 0.8
    assert TotalVariationLoss().forward(edge) > 0


def test_parallel_kernels_agree_with_the_serial_ones():
    """A large input runs the prange variants; their sums match the float64 references."""
    rng = np.random.default_rng(8)
    x = rng.normal(size=(1, 3, 256, 200))
    np.testing.assert_allclose(TotalVariationLoss(0.5).forward(x), reference_tv(x, 0.5), rtol=1e-10)
    target = rng.normal(size=x.shape)
    np.testing.assert_allclose(ContentLoss(target, 2.0).forward(x), 2.0 * np.mean((x - target) ** 2), rtol=1e-10)


# -- CUDA parity (simulator) ----------------------------------------------------
def _on_cuda(array):
    return get_backend("cuda").asarray(array.astype(np.float32))


def assert_same_on_cuda(cpu_value, cpu_grad, cuda_value, cuda_grad):
    assert device_of(cuda_grad) == "cuda"
    np.testing.assert_allclose(cuda_value, cpu_value, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(cuda_grad.copy_to_host(), cpu_grad, rtol=1e-4, atol=1e-6)


def test_cuda_gram_matches_cpu():
    f = np.random.default_rng(9).normal(size=(2, 3, 3, 4)).astype(np.float32)
    probe = np.random.default_rng(10).normal(size=(2, 3, 3)).astype(np.float32)
    cpu, gpu = GramMatrix(), GramMatrix()
    g_cpu = cpu.forward(f)
    g_gpu = gpu.forward(_on_cuda(f))
    assert device_of(g_gpu) == "cuda"
    np.testing.assert_allclose(g_gpu.copy_to_host(), g_cpu, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(gpu.backward(probe).copy_to_host(), cpu.backward(probe), rtol=1e-5, atol=1e-6)


def test_cuda_style_loss_matches_cpu():
    rng = np.random.default_rng(11)
    f = rng.normal(size=(1, 5, 3, 4)).astype(np.float32)
    target = reference_gram(rng.normal(size=(1, 5, 4, 4)))[0]
    cpu, gpu = StyleLoss(target, 100.0), StyleLoss(target, 100.0)
    assert_same_on_cuda(cpu.forward(f), cpu.backward(), gpu.forward(_on_cuda(f)), gpu.backward())


def test_cuda_content_loss_matches_cpu():
    rng = np.random.default_rng(12)
    f = rng.normal(size=(1, 3, 4, 3)).astype(np.float32)
    target = rng.normal(size=f.shape).astype(np.float32)
    cpu, gpu = ContentLoss(target, 5.0), ContentLoss(target, 5.0)
    assert_same_on_cuda(cpu.forward(f), cpu.backward(), gpu.forward(_on_cuda(f)), gpu.backward())


def test_cuda_total_variation_matches_cpu():
    x = np.random.default_rng(13).normal(size=(1, 3, 5, 4)).astype(np.float32)
    cpu, gpu = TotalVariationLoss(1e-3), TotalVariationLoss(1e-3)
    assert_same_on_cuda(cpu.forward(x), cpu.backward(), gpu.forward(_on_cuda(x)), gpu.backward())


def test_style_loss_makes_its_gradient_afresh_at_each_backward():
    """StyleLoss.backward makes a new array from the last forward (style transfer asks
    for it only when its backward pass reaches the layer, and may overwrite it)."""
    rng = np.random.default_rng(15)
    f, g = rng.normal(size=(1, 3, 4, 5)), rng.normal(size=(1, 3, 4, 5))
    loss, fresh = StyleLoss(reference_gram(g)[0], 3.0), StyleLoss(reference_gram(g)[0], 3.0)
    loss.forward(g)
    first = loss.backward()
    value = loss.forward(f)
    second = loss.backward()
    assert not np.shares_memory(second, first)
    second[...] = 0  # the caller's to overwrite: the next call makes it again
    assert value == fresh.forward(f)
    np.testing.assert_array_equal(loss.backward(), fresh.backward())


def test_a_second_forward_reuses_the_gradient_buffer_and_gives_the_same_numbers():
    rng = np.random.default_rng(14)
    f, g = rng.normal(size=(1, 3, 4, 5)), rng.normal(size=(1, 3, 4, 5))
    for make in (lambda: ContentLoss(g, 2.0), lambda: TotalVariationLoss(0.5)):
        loss, fresh = make(), make()
        loss.forward(g)
        first = loss.backward()
        value = loss.forward(f)
        assert np.shares_memory(loss.backward(), first)  # the same memory, overwritten
        assert value == fresh.forward(f)
        np.testing.assert_array_equal(loss.backward(), fresh.backward())
        if not isinstance(loss, ContentLoss):  # (its target fixes the shape)
            loss.forward(f[:, :, :3])  # another shape: a new array
            assert not np.shares_memory(loss.backward(), first)
