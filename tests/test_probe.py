"""Layer names, freezing and the input-gradient probe (rabbitkit.probe)."""
import numpy as np
import pytest

from rabbitkit.errors import ConfigError
from rabbitkit.layers import freeze
from rabbitkit.layers.activations import ReLU
from rabbitkit.layers.batchnorm import BatchNorm
from rabbitkit.layers.branches import Concat
from rabbitkit.layers.conv2d import Conv2D
from rabbitkit.layers.dense import Dense
from rabbitkit.layers.flatten import Flatten
from rabbitkit.layers.pooling import AvgPool2D, MaxPool2D
from rabbitkit.layers.sequential import Sequential
from rabbitkit.probe import FeatureProbe
from rabbitkit.testing import numeric_gradient

F64 = np.float64


def small_net(dtype=F64):
    """conv -> relu -> [concat of two branches] -> bn -> relu -> pool -> flatten -> dense, with names."""
    features = Sequential(
        [
            Conv2D(2, 3, 3, padding=1, dtype=dtype), ReLU(dtype=dtype),
            Concat({"left": Sequential([Conv2D(3, 2, 1, dtype=dtype), ReLU(dtype=dtype)], dtype=dtype),
                    "right": Sequential([MaxPool2D(3, stride=1, padding=1, dtype=dtype),
                                         Conv2D(3, 2, 3, padding=1, dtype=dtype)], dtype=dtype)}, dtype=dtype),
            BatchNorm(4, dtype=dtype), ReLU(dtype=dtype), AvgPool2D(2, dtype=dtype),
        ],
        dtype=dtype,
    )
    model = Sequential({"features": features, "flatten": Flatten(dtype=dtype),
                        "classifier": Dense(4 * 2 * 3, 5, dtype=dtype)}, dtype=dtype)
    rng = np.random.default_rng(3)
    bn = features[3]
    bn.buffers["running_mean"][...] = rng.normal(0, 0.1, 4)
    bn.buffers["running_var"][...] = rng.uniform(0.5, 1.5, 4)
    bn.params["weight"][...] = rng.uniform(0.5, 1.5, 4)
    return model


def test_named_parameters_and_layers_follow_child_names():
    model = small_net()
    names = [name for name, _, _ in model.named_parameters()]
    assert names[:2] == ["features.0.weight", "features.0.bias"]
    assert "features.2.left.0.weight" in names and "features.2.right.1.bias" in names
    assert names[-2:] == ["classifier.weight", "classifier.bias"]
    layers = dict(model.named_layers())
    assert isinstance(layers["features.2.right.0"], MaxPool2D)
    assert model.get_layer("features.3") is model["features"][3]
    state = model.state_dict()
    other = small_net()
    other.load_state_dict(state)
    assert all(np.array_equal(other.state_dict()[k], v) for k, v in state.items())


def test_unknown_layer_name_lists_the_nearest():
    with pytest.raises(ConfigError, match=r"no layer named 'features\.22'.*nearest: features\.2"):
        small_net().get_layer("features.22")


def test_bad_child_names_are_refused():
    with pytest.raises(ConfigError, match="hold no '.'"):
        Sequential([ReLU()], names=["a.b"])
    with pytest.raises(ConfigError, match="repeat"):
        Sequential([ReLU(), ReLU()], names=["a", "a"])
    with pytest.raises(ConfigError, match="2 children, got 1"):
        Sequential([ReLU(), ReLU()], names=["a"])


def _loss_and_grads(model, x, training=True):
    y = model.forward(x, training)
    model.backward(np.ones_like(y))
    return {name: np.array(layer.grads[key]) for name, layer, key in model.named_parameters()}


def test_frozen_layers_keep_grads_untouched_and_give_the_same_input_gradient():
    x = np.random.default_rng(0).normal(size=(2, 2, 4, 6))
    reference = small_net()
    reference.zero_grad()
    y = reference.forward(x, training=False)
    dx_ref = reference.backward(np.ones_like(y))
    model = small_net()
    model.load_state_dict(reference.state_dict())
    model.zero_grad()
    frozen = freeze(model, ["features.*", "classifier"])
    assert "features.2.left.0" in frozen
    assert model.parameters() == []  # optimizers see nothing
    for _, layer, key in model.named_parameters():  # sentinel values show any write
        layer.grads[key][...] = 7.0
    y = model.forward(x, training=False)
    dx = model.backward(np.ones_like(y))
    np.testing.assert_allclose(dx, dx_ref, rtol=1e-12, atol=1e-12)
    for name, layer, key in model.named_parameters():
        assert np.all(layer.grads[key] == 7.0), name
    freeze(model, "*", frozen=False)
    assert len(model.parameters()) == len(list(model.named_parameters()))


def test_freeze_pattern_that_matches_nothing_is_refused():
    with pytest.raises(ConfigError, match="freeze pattern 'featurs.*' matches no layer; nearest"):
        freeze(small_net(), ["featurs.*"])


@pytest.mark.parametrize("targets", [["features.2"], ["features.0", "features.4"], ["features.2.left.0", ""]])
def test_probe_input_gradient_matches_finite_differences(targets):
    """Gradients injected at one or two depths (inside a branch too) through conv, ReLU,
    max/avg pooling, concat, batch norm (inference) and dense."""
    model = small_net()
    rng = np.random.default_rng(1)
    x = rng.normal(size=(2, 2, 4, 6))
    with FeatureProbe(model, targets) as probe:
        outputs = probe.forward(x)
        weights = {name: rng.normal(size=out.shape) for name, out in outputs.items()}

        def objective(z):
            outs = probe.forward(z)
            return sum(float(np.sum(weights[n] * outs[n])) for n in targets)

        probe.forward(x)
        dx = probe.backward(weights)
        numeric = numeric_gradient(objective, x.copy())
    np.testing.assert_allclose(dx, numeric, rtol=1e-5, atol=1e-7)


def test_probe_stops_at_the_deepest_layer_and_touches_no_grads():
    model = small_net()
    calls = []
    dense = model["classifier"]
    dense_forward = dense.forward
    dense.forward = lambda x, training=True: calls.append("dense") or dense_forward(x, training)
    for _, layer, key in model.named_parameters():
        layer.grads[key][...] = 3.0
    x = np.random.default_rng(2).normal(size=(1, 2, 4, 6))
    with FeatureProbe(model, ["features.1"]) as probe:
        out = probe.forward(x)["features.1"]
        assert out.shape == (1, 3, 4, 6)
        probe.backward({"features.1": np.ones_like(out)})
    assert calls == []
    for name, layer, key in model.named_parameters():
        assert np.all(layer.grads[key] == 3.0), name
    del dense.forward
    # the model is given back unchanged: training-mode backward fills grads again
    for _, layer, key in model.named_parameters():
        assert not layer.frozen
    model.zero_grad()
    grads = _loss_and_grads(model, x.repeat(2, axis=0))
    assert np.abs(grads["features.0.weight"]).sum() > 0


def test_probed_conv_output_is_not_the_fused_relu_output():
    """Conv2D + ReLU fuse on the CPU; probing the conv must see its own (signed) output."""
    model = Sequential([Conv2D(1, 2, 3, padding=1), ReLU(), Flatten()])
    x = np.random.default_rng(4).normal(size=(1, 1, 5, 5)).astype(np.float32)
    expected = model.forward(x, training=False)  # plans fusion
    with FeatureProbe(model, ["0"]) as probe:
        conv_out = probe.forward(x)["0"]
    assert (conv_out < 0).any()
    np.testing.assert_array_equal(model.forward(x, training=False), expected)
    np.testing.assert_array_equal(np.maximum(conv_out, 0).reshape(1, -1), expected)


def test_probed_relu_stays_fused_and_gives_the_unfused_results():
    """Probing the ReLU after a conv keeps the pair fused (one stored activation, no
    ReLU passes) while probing the conv unfuses it; either way the outputs and the
    input gradients equal those of the unfused net, gradients injected at two depths."""
    def net(fuse):
        model = Sequential([Conv2D(2, 3, 3, padding=1, dtype=F64), ReLU(dtype=F64),
                            Conv2D(3, 2, 3, padding=1, dtype=F64), ReLU(dtype=F64), Flatten(dtype=F64)],
                           dtype=F64, fuse_relu=fuse)
        for index, layer in enumerate([model.layers[0], model.layers[2]]):
            layer.load_state_dict({"weight": np.sin(np.arange(layer.params["weight"].size) + index).reshape(
                layer.params["weight"].shape), "bias": np.linspace(-0.2, 0.2, layer.out_channels)})
        return model

    x = np.random.default_rng(5).normal(size=(2, 2, 6, 5))
    results = {}
    for fuse in (True, False):
        model = net(fuse)
        with FeatureProbe(model, ["1", "2"]) as probe:
            outputs = probe.forward(x)
            first, second = model.layers[0], model.layers[2]
            assert first.fused_relu == fuse and model.layers[1].absorbed == fuse  # ReLU probed: fused
            assert not second.fused_relu  # conv probed: its own signed output
            gradients = {"1": np.cos(np.arange(outputs["1"].size)).reshape(outputs["1"].shape),
                         "2": np.sin(np.arange(outputs["2"].size)).reshape(outputs["2"].shape)}
            results[fuse] = (outputs["1"].copy(), outputs["2"].copy(), probe.backward(gradients))
        assert (results[fuse][1] < 0).any()
    for fused, unfused in zip(results[True], results[False]):
        np.testing.assert_allclose(fused, unfused, rtol=1e-12, atol=1e-12)


def test_gradients_made_on_demand_equal_given_arrays_and_are_made_once():
    """A callable gradient is called when the backward pass reaches its layer, once; the
    input gradient equals the one from the same arrays given up front, and a wrong
    shape from a callable is refused too."""
    model = small_net()
    x = np.random.default_rng(6).normal(size=(2, 2, 4, 6))
    names = ["features.1", "features.2.left.0", "features.4"]
    with FeatureProbe(model, names) as probe:
        outputs = probe.forward(x)
        arrays = {n: np.sin(np.arange(outputs[n].size) + k).reshape(outputs[n].shape) for k, n in enumerate(names)}
        expected = probe.backward({n: a.copy() for n, a in arrays.items()})
        probe.forward(x)
        calls = []

        def maker(name):
            return lambda: calls.append(name) or arrays[name].copy()

        got = probe.backward({n: maker(n) for n in names})
        assert sorted(calls) == sorted(names) and len(calls) == 3
        assert calls[0] == "features.4"  # the deepest first: made as the backward pass reaches it
        np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-12)
        probe.forward(x)
        with pytest.raises(ValueError, match="features.1"):
            probe.backward({"features.1": lambda: np.zeros((1, 1))})


def test_probe_refuses_wrong_gradient_shape():
    model = small_net()
    with FeatureProbe(model, ["features.1"]) as probe:
        probe.forward(np.zeros((1, 2, 4, 6)))
        with pytest.raises(ValueError, match="has shape"):
            probe.backward({"features.1": np.zeros((1, 3))})
