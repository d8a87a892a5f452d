"""Initializers: statistics (with tolerances from the sampling error), orthogonality, initialize()."""
import math

import numpy as np
import pytest

import rabbitkit
from rabbitkit import initializers as init
from rabbitkit.errors import ConfigError, PluginError
from rabbitkit.layers import Dense, PReLU, ReLU, fans
from rabbitkit.plugins import registry

SIGMAS = 5  # tolerance in standard errors of the estimate: false alarms ~1e-6


def assert_variance(sample, expected, kurtosis=3.0):
    """Sample second moment vs ``expected``; the estimate's relative standard error is
    sqrt((kurtosis - 1) / n) (kurtosis 3 for a normal, 9/5 for a uniform)."""
    n = sample.size
    relative_error = math.sqrt((kurtosis - 1) / n)
    measured = float(np.mean(sample.astype(np.float64) ** 2))
    assert abs(measured / expected - 1) < SIGMAS * relative_error, (measured, expected)
    assert abs(float(np.mean(sample))) < SIGMAS * math.sqrt(expected / n)


def test_all_initializers_are_registered():
    names = set(registry("initializers").names())
    assert {"xavier_uniform", "xavier_normal", "orthogonal_qr", "orthogonal_svd", "msr",
            "zeros", "constant", "normal", "uniform"} <= names


@pytest.mark.parametrize("shape", [(256, 512), (64, 32, 3, 3)])
def test_msr_variance_is_two_over_fan_in(shape):
    w = init.msr(shape, np.random.default_rng(0), np.float32)
    assert w.shape == shape and w.dtype == np.float32
    assert_variance(w, 2.0 / fans(shape)[0])


def test_msr_fan_out_and_negative_slope():
    shape = (128, 64, 3, 3)
    fan_in, fan_out = fans(shape)
    assert_variance(init.msr(shape, np.random.default_rng(1), np.float64, mode="fan_out"), 2.0 / fan_out)
    leaky = init.msr(shape, np.random.default_rng(2), np.float64, negative_slope=0.25)
    assert_variance(leaky, 2.0 / ((1 + 0.25**2) * fan_in))
    with pytest.raises(ConfigError, match="mode"):
        init.msr(shape, np.random.default_rng(0), np.float32, mode="fan_avg")


def test_xavier_uniform_bounds_and_variance():
    shape = (300, 500)
    bound = math.sqrt(6.0 / 800)
    w = init.xavier_uniform(shape, np.random.default_rng(0), np.float64)
    assert np.abs(w).max() <= bound
    assert np.abs(w).max() > 0.999 * bound  # the bound is reached, not just respected
    assert_variance(w, bound**2 / 3, kurtosis=9 / 5)
    doubled = init.xavier_uniform(shape, np.random.default_rng(0), np.float64, gain=2.0)
    np.testing.assert_allclose(doubled, 2 * w, rtol=1e-12)


def test_xavier_normal_variance_with_gain():
    shape = (400, 200)
    w = init.xavier_normal(shape, np.random.default_rng(0), np.float64, gain=math.sqrt(2))
    assert_variance(w, 2 * 2.0 / 600)


@pytest.mark.parametrize("method", [init.orthogonal_qr, init.orthogonal_svd])
@pytest.mark.parametrize("shape", [(5, 9), (9, 5), (6, 6), (4, 2, 3, 3), (20, 3)])
def test_orthogonal_on_the_flattened_matrix(method, shape):
    w = method(shape, np.random.default_rng(0), np.float64, gain=1.5)
    assert w.shape == shape
    flat = w.reshape(shape[0], -1)
    rows, cols = flat.shape
    gram = flat @ flat.T if rows <= cols else flat.T @ flat
    np.testing.assert_allclose(gram, 1.5**2 * np.eye(min(rows, cols)), atol=1e-12)


@pytest.mark.parametrize("method", [init.orthogonal_qr, init.orthogonal_svd])
def test_orthogonal_signs_are_not_biased(method):
    # LAPACK's Householder QR alone always makes Q[0, 0] negative and U or V^T of
    # its SVD are biased too; a uniformly random orthogonal matrix is symmetric.
    rng = np.random.default_rng(0)
    firsts = np.array([method((3, 3), rng, np.float64)[0, 0] for _ in range(400)])
    positive = np.mean(firsts > 0)
    assert abs(positive - 0.5) < SIGMAS * math.sqrt(0.25 / 400)


def test_orthogonal_needs_two_dimensions():
    with pytest.raises(ConfigError, match="at least 2"):
        init.orthogonal_qr((5,), np.random.default_rng(0), np.float32)


def test_simple_initializers():
    rng = np.random.default_rng(0)
    assert not init.zeros((3, 2), rng, np.float32).any()
    np.testing.assert_array_equal(init.constant((4,), rng, np.float64, value=0.5), 0.5)
    w = init.normal((200, 300), rng, np.float64, mean=1.0, std=0.5)
    assert_variance(w - 1.0, 0.25)
    u = init.uniform((200, 300), rng, np.float32, low=2.0, high=3.0)
    assert u.dtype == np.float32 and u.min() >= 2.0 and u.max() <= 3.0
    assert abs(u.mean() - 2.5) < SIGMAS * math.sqrt(1 / 12 / u.size)


@pytest.mark.parametrize("name", ["xavier_uniform", "xavier_normal", "orthogonal_qr", "orthogonal_svd", "msr",
                                  "normal", "uniform"])
def test_same_seed_same_weights(name):
    method = registry("initializers").get(name)
    a = method((7, 5), np.random.default_rng(42), np.float32)
    b = method((7, 5), np.random.default_rng(42), np.float32)
    c = method((7, 5), np.random.default_rng(43), np.float32)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def make_model():
    return rabbitkit.Sequential([Dense(20, 30), ReLU(), Dense(30, 10), PReLU(), Dense(10, 40)])


def test_initialize_defaults_biases_and_roles():
    model = make_model()
    slope = model[3].params["weight"].copy()
    init.initialize(model, default={"name": "constant", "value": 0.25}, bias=0.1)
    for index in (0, 2, 4):
        np.testing.assert_array_equal(model[index].params["weight"], 0.25)
        np.testing.assert_allclose(model[index].params["bias"], 0.1)
    np.testing.assert_array_equal(model[3].params["weight"], slope)  # role "other" untouched


def test_initialize_overrides_by_pattern_first_match_wins():
    model = make_model()
    init.initialize(model, default="zeros", rng=0, overrides={
        "2.weight": {"name": "constant", "value": 3.0},
        "*.weight": "orthogonal_qr",
        "4.bias": {"name": "constant", "value": -1.0},
    })
    np.testing.assert_array_equal(model[2].params["weight"], 3.0)
    for index in (0, 4):
        w = model[index].params["weight"].astype(np.float64)
        gram = w @ w.T if w.shape[0] <= w.shape[1] else w.T @ w
        np.testing.assert_allclose(gram, np.eye(min(w.shape)), atol=1e-5)
    np.testing.assert_array_equal(model[4].params["bias"], -1.0)
    np.testing.assert_array_equal(model[0].params["bias"], 0.0)


def test_initialize_msr_default_is_reproducible():
    a, b = make_model(), make_model()
    init.initialize(a, rng=7)
    init.initialize(b, rng=np.random.default_rng(7))
    for name, value in a.state_dict().items():
        np.testing.assert_array_equal(b.state_dict()[name], value)
    rabbitkit.manual_seed(11)
    init.initialize(a)
    rabbitkit.manual_seed(11)
    init.initialize(b)
    np.testing.assert_array_equal(a[0].params["weight"], b[0].params["weight"])


def test_initialize_errors():
    model = make_model()
    with pytest.raises(PluginError, match="did you mean 'xavier_normal'"):
        init.initialize(model, default="xavier_normall")
    with pytest.raises(ConfigError, match="'msr'.*gian"):
        init.initialize(model, default={"name": "msr", "gian": 2})
    before = model.state_dict()
    with pytest.raises(ConfigError, match="match no weight"):
        init.initialize(model, overrides={"9.weight": "zeros"})
    for name, value in model.state_dict().items():  # nothing changed before the error
        np.testing.assert_array_equal(value, before[name])
    with pytest.raises(ConfigError, match="name"):
        init.initialize(model, default={"value": 3})


def test_initialize_a_cuda_model():
    model = rabbitkit.Sequential([Dense(3, 4), ReLU()]).to("cuda")
    init.initialize(model, default={"name": "constant", "value": 0.5}, bias=0.25)
    np.testing.assert_array_equal(model[0].params["weight"].copy_to_host(), 0.5)
    np.testing.assert_array_equal(model[0].params["bias"].copy_to_host(), 0.25)


def test_init_overrides_without_a_default_keep_every_other_parameter(tmp_path):
    """docs/experiments.md: an unset init.default keeps each layer's own initialisation."""
    import rabbitkit
    from rabbitkit.train import builder, config as cfg

    raw = {"data": {"dataset": "function1d", "n_train": 16, "n_val": 8, "n_test": 8},
           "model": {"architecture": "mlp", "hidden": [5, 5]}, "init": {"overrides": {"0.weight": "zeros"}}}
    config = cfg.resolve(raw)
    plain = cfg.resolve({k: v for k, v in raw.items() if k != "init"})

    def initialised(config):
        rabbitkit.manual_seed(0)
        model = builder.build_model(config, (1,), 1)
        builder.initialize(config, model, np.random.default_rng(0))
        return model.state_dict()

    overridden, own = initialised(config), initialised(plain)
    assert not overridden["0.weight"].any() and own["0.weight"].any()
    for name in own:
        if name != "0.weight":
            np.testing.assert_array_equal(overridden[name], own[name], err_msg=name)
    result = rabbitkit.run(raw, {"train.epochs": 1, "output.visualizers": []}, out=tmp_path, quiet=True)
    assert result.stopped == "completed"
