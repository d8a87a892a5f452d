"""Regularizers: penalties, gradients against finite differences, max-norm, roles, CUDA parity."""
import numpy as np
import pytest

import rabbitkit
from rabbitkit.errors import ConfigError
from rabbitkit.layers import Dense, PReLU, Tanh
from rabbitkit.plugins import registry
from rabbitkit.regularizers import L1, L2, MaxNorm


def make_model(dtype=np.float64):
    rabbitkit.manual_seed(3)
    return rabbitkit.Sequential([Dense(3, 5, dtype=dtype), Tanh(dtype=dtype), Dense(5, 2, dtype=dtype), PReLU(dtype=dtype)])


def snapshot(model, what="value"):
    return {p.name: np.array(getattr(p, what), copy=True) for p in model.parameters()}


def test_registered():
    regularizers = registry("regularizers")
    assert regularizers.get("l2") is L2 and regularizers.get("l1") is L1 and regularizers.get("max_norm") is MaxNorm


def test_penalties_against_numpy():
    model = make_model()
    weights = [p.value for p in model.parameters() if p.role == "weight"]
    assert len(weights) == 2
    assert L2(strength=0.3).penalty(model.parameters()) == pytest.approx(0.15 * sum((w**2).sum() for w in weights), rel=1e-12)
    assert L1(strength=0.3).penalty(model.parameters()) == pytest.approx(0.3 * sum(np.abs(w).sum() for w in weights), rel=1e-12)
    assert MaxNorm(1.0).penalty(model.parameters()) == 0.0


@pytest.mark.parametrize("regularizer", [L2(strength=0.7), L1(strength=0.7)], ids=["l2", "l1"])
def test_gradients_match_finite_differences_and_skip_biases(regularizer):
    model = make_model()
    model.zero_grad()
    regularizer.add_gradients(model.parameters())
    eps = 1e-6
    for p in model.parameters():
        if p.role != "weight":
            assert not p.grad.any(), f"{p.name} ({p.role}) must not be regularised"
            continue
        for index in np.ndindex(p.value.shape):
            saved = p.value[index]
            p.value[index] = saved + eps
            plus = regularizer.penalty(model.parameters())
            p.value[index] = saved - eps
            minus = regularizer.penalty(model.parameters())
            p.value[index] = saved
            assert p.grad[index] == pytest.approx((plus - minus) / (2 * eps), rel=1e-6, abs=1e-9), (p.name, index)


def test_gradients_add_to_existing_ones_and_l1_subgradient_is_zero_at_zero():
    layer = Dense(2, 2, dtype=np.float64)
    layer.params["weight"][...] = [[0.0, -2.0], [3.0, 0.5]]
    layer.grads["weight"][...] = 1.0
    L1(strength=0.1).add_gradients(layer.parameters())
    np.testing.assert_allclose(layer.grads["weight"], [[1.0, 0.9], [1.1, 1.1]])
    L2(strength=0.5).add_gradients(layer.parameters())
    np.testing.assert_allclose(layer.grads["weight"], [[1.0, -0.1], [2.6, 1.35]])


def test_max_norm_bounds_rows_and_leaves_small_rows_and_biases():
    rng = np.random.default_rng(0)
    layer = Dense(4, 6, dtype=np.float64)
    weight = rng.standard_normal((6, 4)) * 2
    weight[0] *= 0.01  # one row already inside the ball
    layer.params["weight"][...] = weight
    layer.params["bias"][...] = 50.0
    MaxNorm(max_value=1.5).after_step(layer.parameters())
    norms = np.linalg.norm(layer.params["weight"], axis=1)
    assert np.all(norms <= 1.5 * (1 + 1e-12))
    np.testing.assert_array_equal(layer.params["weight"][0], weight[0])
    big = np.linalg.norm(weight, axis=1) > 1.5
    np.testing.assert_allclose(norms[big], 1.5, rtol=1e-12)
    # rescaled, not clipped elementwise: directions are kept
    np.testing.assert_allclose(layer.params["weight"][big] / norms[big, None],
                               weight[big] / np.linalg.norm(weight[big], axis=1, keepdims=True), rtol=1e-12)
    np.testing.assert_array_equal(layer.params["bias"], 50.0)


def test_max_norm_flattens_higher_rank_weights_per_output_unit():
    from rabbitkit.layers import Param
    from rabbitkit.backend import get_backend

    weight = np.random.default_rng(1).standard_normal((3, 2, 2, 2)) * 3
    original = weight.copy()
    param = Param("conv.weight", weight, np.zeros_like(weight), "weight", get_backend("cpu"))
    MaxNorm(max_value=1.0).after_step([param])
    norms = np.linalg.norm(weight.reshape(3, -1), axis=1)
    np.testing.assert_allclose(norms, np.minimum(np.linalg.norm(original.reshape(3, -1), axis=1), 1.0), rtol=1e-12)


def test_after_step_is_a_no_op_for_penalties_and_bad_options_are_config_errors():
    model = make_model()
    before = snapshot(model)
    L2(0.1).after_step(model.parameters())
    L1(0.1).after_step(model.parameters())
    for name, value in snapshot(model).items():
        np.testing.assert_array_equal(value, before[name])
    with pytest.raises(ConfigError):
        L2(strength=-1)
    with pytest.raises(ConfigError):
        MaxNorm(max_value=0)


def test_parallel_kernels_on_a_large_weight():
    layer = Dense(400, 100, dtype=np.float64)  # 40,000 entries: above the parallel threshold
    w = layer.params["weight"]
    assert L1(1.0).penalty(layer.parameters()) == pytest.approx(np.abs(w).sum(), rel=1e-12)
    assert L2(2.0).penalty(layer.parameters()) == pytest.approx((w**2).sum(), rel=1e-12)
    w *= 100
    MaxNorm(0.5).after_step(layer.parameters())
    np.testing.assert_allclose(np.linalg.norm(w, axis=1), 0.5, rtol=1e-12)


@pytest.mark.parametrize("regularizer", [L2(strength=0.2), L1(strength=0.2), MaxNorm(max_value=0.4)],
                         ids=["l2", "l1", "max_norm"])
def test_cuda_matches_cpu(regularizer):
    results = {}
    for device in ("cpu", "cuda"):
        model = make_model(np.float32).to(device)
        model.zero_grad()
        penalty = regularizer.penalty(model.parameters())
        regularizer.add_gradients(model.parameters())
        regularizer.after_step(model.parameters())
        host = {p.name: (p.backend.to_host(p.value), p.backend.to_host(p.grad)) for p in model.parameters()}
        results[device] = (penalty, host)
    assert results["cuda"][0] == pytest.approx(results["cpu"][0], rel=1e-5)
    for name, (value, grad) in results["cpu"][1].items():
        np.testing.assert_allclose(results["cuda"][1][name][0], value, rtol=1e-5, atol=1e-7, err_msg=name)
        np.testing.assert_allclose(results["cuda"][1][name][1], grad, rtol=1e-5, atol=1e-7, err_msg=name)
