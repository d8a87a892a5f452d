"""Property-based checks (hypothesis) over random geometry, where hand-picked cases miss edges."""
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.signal import correlate

from rabbitkit.layers.conv2d import Conv2D
from rabbitkit.layers.pooling import AvgPool2D, MaxPool2D
from rabbitkit.train.config import apply_overrides, dump_toml, resolve

geometry = st.fixed_dictionaries({
    "batch": st.integers(1, 3), "channels": st.integers(1, 3), "out": st.integers(1, 3),
    "height": st.integers(1, 9), "width": st.integers(1, 9),
    "kh": st.integers(1, 4), "kw": st.integers(1, 4), "sh": st.integers(1, 3), "sw": st.integers(1, 3),
    "ph": st.integers(0, 2), "pw": st.integers(0, 2), "seed": st.integers(0, 2**16),
})


def reference_conv(x, w, b, stride, padding):
    xp = np.pad(x, ((0, 0), (0, 0), (padding[0],) * 2, (padding[1],) * 2))
    out = []
    for n in range(x.shape[0]):
        maps = [sum(correlate(xp[n, c], w[o, c], mode="valid") for c in range(x.shape[1])) + b[o]
                for o in range(w.shape[0])]
        out.append(np.stack(maps)[:, ::stride[0], ::stride[1]])
    return np.stack(out)


@settings(max_examples=60, deadline=None)
@given(geometry)
def test_conv2d_forward_matches_scipy_on_any_geometry(g):
    if g["height"] + 2 * g["ph"] < g["kh"] or g["width"] + 2 * g["pw"] < g["kw"]:
        return  # the kernel does not fit: Conv2D refuses it (tested elsewhere)
    rng = np.random.default_rng(g["seed"])
    layer = Conv2D(g["channels"], g["out"], (g["kh"], g["kw"]), (g["sh"], g["sw"]), (g["ph"], g["pw"]),
                   dtype=np.float64)
    x = rng.standard_normal((g["batch"], g["channels"], g["height"], g["width"]))
    expected = reference_conv(x, layer.params["weight"], layer.params["bias"], (g["sh"], g["sw"]), (g["ph"], g["pw"]))
    np.testing.assert_allclose(layer.forward(x), expected, rtol=1e-10, atol=1e-10)
    dy = rng.standard_normal(expected.shape)
    dx = layer.backward(dy)
    # adjoint identity: <conv(x), dy> is linear in x, so <dx, x> equals <conv(x) - b, dy>
    linear = expected - layer.params["bias"][None, :, None, None]
    np.testing.assert_allclose(np.sum(dx * x), np.sum(linear * dy), rtol=1e-9, atol=1e-9)


@settings(max_examples=60, deadline=None)
@given(geometry)
def test_pooling_routes_and_spreads_every_gradient(g):
    kernel = (min(g["kh"], g["height"] + 2 * min(g["ph"], g["kh"] // 2)), min(g["kw"], g["width"] + 2 * min(g["pw"], g["kw"] // 2)))
    padding = (min(g["ph"], kernel[0] // 2), min(g["pw"], kernel[1] // 2))
    rng = np.random.default_rng(g["seed"])
    x = rng.standard_normal((g["batch"], g["channels"], g["height"], g["width"]))
    for layer in (MaxPool2D(kernel, (g["sh"], g["sw"]), padding, dtype=np.float64),
                  AvgPool2D(kernel, (g["sh"], g["sw"]), padding, dtype=np.float64)):
        y = layer.forward(x)
        dy = rng.standard_normal(y.shape)
        dx = layer.backward(dy)
        assert dx.shape == x.shape
        # adjoint identity: both poolings are linear in x once the max's choice is fixed, so
        # <dx, x> = <dy, y> (an all-zero or misrouted backward fails it)
        np.testing.assert_allclose(np.sum(dx * x), np.sum(dy * y), rtol=1e-9, atol=1e-9)
        if isinstance(layer, MaxPool2D):
            # every output's gradient lands on exactly one input entry
            np.testing.assert_allclose(dx.sum(), dy.sum(), rtol=1e-9, atol=1e-9)
        else:
            # average pooling (padding counted): <dx, 1> = <dy, pool(1)>, the share of real cells per window
            np.testing.assert_allclose(dx.sum(), np.sum(dy * layer.forward(np.ones_like(x))), rtol=1e-9, atol=1e-9)


toml_values = st.recursive(
    st.one_of(st.booleans(), st.integers(-10**6, 10**6), st.floats(-1e6, 1e6, allow_nan=False).filter(lambda v: v == v),
              st.text(st.characters(blacklist_categories=("Cs",)), max_size=8)),
    lambda inner: st.lists(inner, max_size=3), max_leaves=6)


@settings(max_examples=80, deadline=None)
@given(st.dictionaries(st.from_regex(r"[a-z][a-z_]{0,8}", fullmatch=True), toml_values, max_size=4))
def test_plugin_options_survive_the_run_directory_round_trip(options):
    """Whatever a user puts in [model] comes back identical from the run's config.toml."""
    import tomllib

    raw = {"data": {"dataset": "function1d"}, "model": {"architecture": "mlp"}}
    raw = apply_overrides(raw, {f"model.{k}": v for k, v in options.items() if k not in ("architecture", "layers")})
    config = resolve(raw, "exp.toml")
    again = resolve(tomllib.loads(dump_toml(config)), "config.toml")
    assert again["model"] == config["model"]
