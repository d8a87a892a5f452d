"""Embedding and OneHot: lookups against numpy, scatter-add gradients, index checks."""
import numpy as np
import pytest

from rabbitkit.errors import ConfigError, DataError
from rabbitkit.layers.embedding import Embedding, OneHot
from rabbitkit.layers.sequential import Sequential
from rabbitkit.layers.dense import Dense
from rabbitkit.testing import check_gradients


def test_embedding_lookup_matches_numpy_indexing(rng):
    layer = Embedding(11, 4)
    x = rng.integers(0, 11, (3, 7))
    y = layer.forward(x)
    assert y.shape == (3, 7, 4) and y.dtype == np.float32
    np.testing.assert_array_equal(y, layer.params["weight"][x])
    assert layer.params["weight"].shape == (11, 4)
    assert layer.output_shape((7,)) == (7, 4)


@pytest.mark.parametrize("shape", [(1, 1), (2, 5), (3, 4)])
def test_embedding_gradients_with_repeated_indices(shape, rng):
    layer = Embedding(5, 3, dtype=np.float64)
    x = rng.integers(0, 5, shape)
    x.flat[0] = x.flat[-1] = 2  # a row used twice must get both contributions
    report = check_gradients(layer, inputs=x, check_input=False)
    assert report.checked["weight"] == 15


def test_embedding_scatter_add_against_numpy(rng):
    layer = Embedding(6, 2)
    x = rng.integers(0, 6, (4, 9))
    layer.forward(x)
    dy = rng.standard_normal((4, 9, 2)).astype(np.float32)
    assert layer.backward(dy) is None
    expected = np.zeros((6, 2))
    np.add.at(expected, x.reshape(-1), dy.reshape(-1, 2))
    np.testing.assert_allclose(layer.grads["weight"], expected, rtol=1e-5, atol=1e-6)


def test_one_hot_encoding_and_no_gradient(rng):
    layer = OneHot(5)
    x = rng.integers(0, 5, (2, 3))
    y = layer.forward(x)
    assert y.shape == (2, 3, 5) and y.dtype == np.float32
    np.testing.assert_array_equal(y, np.eye(5, dtype=np.float32)[x])
    assert layer.backward(np.ones_like(y)) is None
    assert layer.num_parameters() == 0
    report = check_gradients(OneHot(5, dtype=np.float64), inputs=x, check_input=False)
    assert report.checked == {}


def test_indices_as_whole_floats_are_accepted_others_refused():
    layer = OneHot(4)
    np.testing.assert_array_equal(layer.forward(np.array([[1.0, 3.0]])), layer.forward(np.array([[1, 3]])))
    with pytest.raises(ConfigError, match="non-integral"):
        layer.forward(np.array([[0.5]]))
    with pytest.raises(DataError, match=r"index 4 is out of range \[0, 4\)"):
        layer.forward(np.array([[1, 4]]))
    with pytest.raises(DataError, match="index -1"):
        Embedding(3, 2).forward(np.array([[-1]]))
    with pytest.raises(ConfigError, match="dtype"):
        Embedding(3, 2).forward(np.array([["a"]]))


def test_embedding_trains_inside_a_sequential(rng):
    """Gradient flows from a Dense layer into the embedding table; the model input gets None."""
    model = Sequential([Embedding(7, 3, dtype=np.float64), Dense(3, 2, dtype=np.float64)])
    report = check_gradients(model, inputs=rng.integers(0, 7, (2, 4)), check_input=False)
    assert {"0.weight", "1.weight", "1.bias"} == set(report.checked)
    assert model.backward(np.ones((2, 4, 2))) is None
