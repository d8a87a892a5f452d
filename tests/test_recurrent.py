"""RNN, LSTM and GRU layers: numpy references, gradient checks, states, layout."""
import numba
import numpy as np
import pytest

from rabbitkit.errors import BackendError, ConfigError
from rabbitkit.layers.recurrent import GRU, LSTM, RNN
from rabbitkit.testing import check_gradients
from test_dropout import masked, within_binomial_bound


# -- plain numpy references (one cell step at a time, batch-first) --------------------
def sigmoid(v):
    return 1.0 / (1.0 + np.exp(-v))


def reference_rnn_layer(x, p, k, h):
    outs = []
    for t in range(x.shape[1]):
        h = np.tanh(x[:, t] @ p[f"weight_ih_l{k}"].T + p[f"bias_ih_l{k}"] + h @ p[f"weight_hh_l{k}"].T + p[f"bias_hh_l{k}"])
        outs.append(h)
    return np.stack(outs, 1), (h,)


def reference_lstm_layer(x, p, k, h, c):
    hidden = h.shape[1]
    peep = {g: p.get(f"weight_{g}_l{k}", np.zeros(hidden)) for g in ("ci", "cf", "co")}
    outs = []
    for t in range(x.shape[1]):
        a = x[:, t] @ p[f"weight_ih_l{k}"].T + p[f"bias_ih_l{k}"] + h @ p[f"weight_hh_l{k}"].T + p[f"bias_hh_l{k}"]
        a_i, a_f, a_g, a_o = np.split(a, 4, axis=1)
        i = sigmoid(a_i + peep["ci"] * c)
        f = sigmoid(a_f + peep["cf"] * c)
        c = f * c + i * np.tanh(a_g)
        o = sigmoid(a_o + peep["co"] * c)
        h = o * np.tanh(c)
        outs.append(h)
    return np.stack(outs, 1), (h, c)


def reference_gru_layer(x, p, k, h):
    outs = []
    for t in range(x.shape[1]):
        xi = np.split(x[:, t] @ p[f"weight_ih_l{k}"].T + p[f"bias_ih_l{k}"], 3, axis=1)
        hi = np.split(h @ p[f"weight_hh_l{k}"].T + p[f"bias_hh_l{k}"], 3, axis=1)
        r = sigmoid(xi[0] + hi[0])
        z = sigmoid(xi[1] + hi[1])
        n = np.tanh(xi[2] + r * hi[2])
        h = (1 - z) * n + z * h
        outs.append(h)
    return np.stack(outs, 1), (h,)


REFERENCES = {RNN: reference_rnn_layer, LSTM: reference_lstm_layer, GRU: reference_gru_layer}


def reference_forward(layer, x, initial=None):
    """Stacked reference: returns (outputs (N, T, H), final state arrays (L, N, H))."""
    params = {k: np.asarray(v, dtype=np.float64) for k, v in layer.state_dict().items()}
    n = x.shape[0]
    arrays = layer.state_arrays
    if initial is None:
        initial = [np.zeros((layer.num_layers, n, layer.hidden_size))] * arrays
    finals = [[] for _ in range(arrays)]
    inp = np.asarray(x, dtype=np.float64)
    for k in range(layer.num_layers):
        inp, final = REFERENCES[type(layer)](inp, params, k, *[s[k] for s in initial])
        for store, value in zip(finals, final):
            store.append(value)
    return inp, [np.stack(f) for f in finals]


CELLS = [(RNN, {}), (GRU, {}), (LSTM, {}), (LSTM, {"peephole": True})]
CELL_IDS = ["rnn", "gru", "lstm", "lstm-peephole"]


def random_state(layer, batch, rng):
    arrays = [rng.uniform(-0.8, 0.8, (layer.num_layers, batch, layer.hidden_size)) for _ in range(layer.state_arrays)]
    return arrays[0] if layer.state_arrays == 1 else tuple(arrays)


# -- forward against the references -------------------------------------------------
@pytest.mark.parametrize("cls,options", CELLS, ids=CELL_IDS)
@pytest.mark.parametrize("dtype,tol", [(np.float64, 1e-12), (np.float32, 2e-5)])
def test_forward_matches_numpy_reference(cls, options, dtype, tol, rng):
    layer = cls(3, 5, num_layers=2, dtype=dtype, **options)
    x = rng.uniform(-1.5, 1.5, (4, 7, 3))
    y = layer.forward(x, training=False)
    expected, finals = reference_forward(layer, x)
    assert y.shape == (4, 7, 5) and y.dtype == dtype
    np.testing.assert_allclose(y, expected, atol=tol, rtol=tol)
    final = layer.final_state if layer.state_arrays == 2 else (layer.final_state,)
    for got, want in zip(final, finals):
        np.testing.assert_allclose(got, want, atol=tol, rtol=tol)


@pytest.mark.parametrize("cls,options", CELLS, ids=CELL_IDS)
def test_initial_state_and_last_step_output(cls, options, rng):
    layer = cls(2, 3, num_layers=2, return_sequences=False, dtype=np.float64, **options)
    x = rng.uniform(-1, 1, (3, 4, 2))
    state = random_state(layer, 3, rng)
    layer.initial_state = state
    y = layer.forward(x)
    initial = [state] if layer.state_arrays == 1 else list(state)
    expected, finals = reference_forward(layer, x, initial)
    assert y.shape == (3, 3)
    np.testing.assert_allclose(y, expected[:, -1], atol=1e-12)
    np.testing.assert_allclose(y, finals[0][-1], atol=1e-12)
    # A set initial state stays in force until changed (the layer is not stateful).
    np.testing.assert_allclose(layer.forward(x), y, atol=1e-12)
    layer.initial_state = None
    assert not np.allclose(layer.forward(x), y)


@pytest.mark.parametrize("cls,options", CELLS, ids=CELL_IDS)
def test_batch_split_over_threads_matches_reference(cls, options, rng):
    """Batches of >= 8 rows run as row blocks on separate threads (uneven split here)."""
    layer = cls(3, 6, num_layers=2, dtype=np.float64, **options)
    assert layer._split(9)[0] == min(2, numba.get_num_threads())
    x = rng.uniform(-1, 1, (9, 4, 3))
    np.testing.assert_allclose(layer.forward(x), reference_forward(layer, x)[0], atol=1e-12)
    report = check_gradients(layer, (9, 4, 3), max_checks=60)
    assert set(report.checked) == {"input"} | set(layer.params)


@pytest.mark.parametrize("transposed", [False, True], ids=["direct", "transposed"])
@pytest.mark.parametrize("cls,options", CELLS, ids=CELL_IDS)
def test_recurrent_products_in_small_row_blocks_match_reference(cls, options, transposed, rng, monkeypatch):
    """Each thread's per-step product may go to BLAS a few rows at a time (OpenBLAS's
    unpacked small-product path), as ``rows @ W`` or as the transposed ``W^T @ rows^T``;
    2 rows per call on uneven blocks of 9 rows."""
    import rabbitkit.layers.recurrent as recurrent

    monkeypatch.setattr(recurrent, "rows_per_product", lambda inner, columns, rows: 2)
    layer = cls(3, 6, num_layers=2, dtype=np.float64, **options)
    assert layer._split(9)[1] == 2
    if transposed:
        layer.row_block, layer.transposed_product = 2, True
    x = rng.uniform(-1, 1, (9, 4, 3))
    np.testing.assert_allclose(layer.forward(x), reference_forward(layer, x)[0], atol=1e-12)
    report = check_gradients(layer, (9, 4, 3), max_checks=60)
    assert set(report.checked) == {"input"} | set(layer.params)


@pytest.mark.parametrize("cls,options", CELLS, ids=CELL_IDS)
def test_one_hot_input_takes_the_gather_path_with_identical_results(cls, options, rng):
    layer = cls(5, 4, num_layers=2, dtype=np.float64, **options)
    codes = np.eye(5)[rng.integers(0, 5, (3, 6))]
    y = layer.forward(codes)
    assert "one_hot" in layer._cache["caches"][0]
    np.testing.assert_allclose(y, reference_forward(layer, codes)[0], atol=1e-12)
    report = check_gradients(layer, inputs=codes)  # parameter gradients go through the scatter-add
    assert set(report.checked) == {"input"} | set(layer.params)
    layer.forward(codes * 0.5)
    assert "one_hot" not in layer._cache["caches"][0]


def test_skipping_the_input_gradient_keeps_parameter_gradients(rng):
    full = LSTM(5, 4, num_layers=2, dtype=np.float64)
    lean = LSTM(5, 4, num_layers=2, dtype=np.float64)
    lean.load_state_dict(full.state_dict())
    lean.needs_input_grad = False
    x = rng.uniform(-1, 1, (2, 3, 5))
    dy = rng.standard_normal((2, 3, 4))
    full.forward(x)
    lean.forward(x)
    assert full.backward(dy).shape == x.shape and lean.backward(dy) is None
    for key in full.grads:
        np.testing.assert_allclose(lean.grads[key], full.grads[key], atol=1e-12)


# -- gradient checks (float64, central differences) ------------------------------------
@pytest.mark.parametrize("cls,options", CELLS, ids=CELL_IDS)
@pytest.mark.parametrize("num_layers", [1, 2])
@pytest.mark.parametrize("return_sequences", [True, False])
@pytest.mark.parametrize("shape", [(1, 5, 3), (3, 6, 2)])
def test_gradients(cls, options, num_layers, return_sequences, shape):
    layer = cls(shape[2], 4, num_layers=num_layers, return_sequences=return_sequences, dtype=np.float64, **options)
    report = check_gradients(layer, shape)
    expected = {"input"} | set(layer.params)
    assert set(report.checked) == expected
    if options.get("peephole"):
        assert {f"weight_{g}_l{k}" for g in ("ci", "cf", "co") for k in range(num_layers)} <= set(report.checked)


@pytest.mark.parametrize("cls,options", CELLS, ids=CELL_IDS)
def test_gradients_with_initial_state_and_dropout(cls, options, rng):
    layer = cls(3, 4, num_layers=3, dropout=0.3, dtype=np.float64, **options)
    layer.initial_state = random_state(layer, 2, rng)
    report = check_gradients(layer, (2, 5, 3))
    assert set(report.checked) == {"input"} | set(layer.params)


def _finite_difference(objective, array, eps=1e-6):
    grad = np.zeros_like(array)
    for index in np.ndindex(array.shape):
        saved = array[index]
        array[index] = saved + eps
        plus = objective()
        array[index] = saved - eps
        minus = objective()
        array[index] = saved
        grad[index] = (plus - minus) / (2 * eps)
    return grad


@pytest.mark.parametrize("cls,options", CELLS, ids=CELL_IDS)
def test_initial_state_gradient_and_final_state_gradient(cls, options, rng):
    """The seq2seq contract: gradient in at the final state, out at the initial state."""
    layer = cls(2, 3, num_layers=2, dtype=np.float64, **options)
    x = rng.uniform(-1, 1, (2, 5, 2))
    initial = [a.copy() for a in layer._state_tuple(random_state(layer, 2, rng))]
    probe_y = rng.standard_normal((2, 5, 3))
    probe_state = [rng.standard_normal(a.shape) for a in initial]

    def objective():
        layer.initial_state = initial[0] if layer.state_arrays == 1 else tuple(initial)
        y = layer.forward(x)
        final = layer._state_tuple(layer.final_state)
        return float(np.sum(y * probe_y) + sum(np.sum(f * p) for f, p in zip(final, probe_state)))

    objective()
    state_grad = probe_state[0] if layer.state_arrays == 1 else tuple(probe_state)
    layer.backward(probe_y, state_grad=state_grad)
    analytic = layer._state_tuple(layer.initial_state_grad)
    for got, array in zip(analytic, initial):
        np.testing.assert_allclose(got, _finite_difference(objective, array), rtol=1e-5, atol=1e-8)


def test_state_gradient_alone_with_no_output_gradient(rng):
    """An encoder whose outputs are unused: backward(None, state_grad)."""
    layer = LSTM(2, 3, dtype=np.float64)
    x = rng.uniform(-1, 1, (2, 4, 2))
    dh, dc = rng.standard_normal((1, 2, 3)), rng.standard_normal((1, 2, 3))

    def objective():
        layer.forward(x)
        h, c = layer.final_state
        return float(np.sum(h * dh) + np.sum(c * dc))

    objective()
    dx = layer.backward(None, state_grad=(dh, dc))
    np.testing.assert_allclose(dx, _finite_difference(objective, x), rtol=1e-5, atol=1e-8)


# -- stateful layers (truncated BPTT) ---------------------------------------------------
@pytest.mark.parametrize("cls,options", CELLS, ids=CELL_IDS)
def test_stateful_carries_detached_state_until_reset(cls, options, rng):
    x = rng.uniform(-1, 1, (2, 8, 3))
    whole = cls(3, 4, num_layers=2, dtype=np.float64, **options)
    stateful = cls(3, 4, num_layers=2, stateful=True, dtype=np.float64, **options)
    stateful.load_state_dict(whole.state_dict())
    expected = whole.forward(x)
    first = stateful.forward(x[:, :5])
    second = stateful.forward(x[:, 5:])
    np.testing.assert_allclose(np.concatenate([first, second], axis=1), expected, atol=1e-12)

    # The second chunk's gradients equal those of a plain layer started from the carried
    # state: nothing flows back past the chunk boundary.
    for carried, final in zip(stateful._state_tuple(stateful.initial_state), stateful._state_tuple(stateful.final_state)):
        np.testing.assert_array_equal(carried, final)
        assert not np.shares_memory(carried, final)  # a detached copy
    stateful.reset_state()
    stateful.forward(x[:, :5])
    stateful.zero_grad()
    stateful.forward(x[:, 5:])
    dy = rng.standard_normal(second.shape)
    dx = stateful.backward(dy)
    plain = cls(3, 4, num_layers=2, dtype=np.float64, **options)
    plain.load_state_dict(whole.state_dict())
    whole.forward(x[:, :5])
    plain.initial_state = whole.final_state
    plain.forward(x[:, 5:])
    np.testing.assert_allclose(dx, plain.backward(dy), atol=1e-12)
    for key in plain.grads:
        np.testing.assert_allclose(stateful.grads[key], plain.grads[key], atol=1e-12)

    stateful.reset_state()
    np.testing.assert_allclose(stateful.forward(x[:, 5:]), whole.forward(x[:, 5:]), atol=1e-12)


def test_stateful_new_batch_size_starts_fresh_but_explicit_state_must_match(rng):
    layer = LSTM(2, 3, stateful=True, dtype=np.float64)
    layer.forward(rng.uniform(-1, 1, (4, 3, 2)))
    fresh = LSTM(2, 3, dtype=np.float64)
    fresh.load_state_dict(layer.state_dict())
    x1 = rng.uniform(-1, 1, (1, 3, 2))
    np.testing.assert_allclose(layer.forward(x1), fresh.forward(x1), atol=1e-12)
    fresh.initial_state = (np.zeros((1, 4, 3)), np.zeros((1, 4, 3)))
    with pytest.raises(ConfigError, match="batch size 4"):
        fresh.forward(x1)


# -- dropout between layers -------------------------------------------------------------
def test_dropout_only_in_training_and_between_layers(rng):
    layer = LSTM(3, 16, num_layers=2, dropout=0.5, dtype=np.float64)
    x = rng.uniform(-1, 1, (4, 5, 3))
    eval_out = layer.forward(x, training=False)
    np.testing.assert_allclose(layer.forward(x, training=False), eval_out)
    expected, _ = reference_forward(layer, x)
    np.testing.assert_allclose(eval_out, expected, atol=1e-12)
    layer.seed(3)
    a = layer.forward(x, training=True)
    b = layer.forward(x, training=True)
    assert not np.allclose(a, b) and not np.allclose(a, eval_out)
    layer.seed(3)
    np.testing.assert_allclose(layer.forward(x, training=True), a)
    # the second layer reads the first one's states zeroed where the Philox mask of
    # (key, stream 0) drops them and doubled elsewhere
    below, above = layer._cache["caches"]
    states = below["hs"][1:]
    kept = masked(layer.dropout_masks.key, 0, 0.5, states.size, np.float64).reshape(states.shape)
    np.testing.assert_array_equal(above["input"], np.where(kept, states * 2.0, 0.0))
    assert 0.2 < kept.mean() < 0.8
    single = LSTM(3, 4, num_layers=1, dropout=0.5, dtype=np.float64)
    np.testing.assert_allclose(single.forward(x, training=True), single.forward(x, training=False))


def dropped_between_layers(layer):
    """The latest forward's masks between stacked layers, as bools (kept), one a boundary:
    where the layer above read a zero (a cell's state is never exactly zero here)."""
    return [cache["input"] != 0 for cache in layer._cache["caches"][1:]]


@pytest.mark.parametrize("cls,options", CELLS, ids=CELL_IDS)
def test_dropout_between_layers_keeps_one_minus_p_with_a_stream_a_boundary(cls, options, rng):
    p = 0.3
    layer = cls(3, 32, num_layers=3, dropout=p, dtype=np.float32, **options)
    x = rng.uniform(-1, 1, (8, 20, 3)).astype(np.float32)
    layer.seed(5)
    assert layer.dropout_masks.stream == 0
    layer.forward(x, training=True)
    first, second = dropped_between_layers(layer)
    size = first.size  # 5,120 elements a boundary
    for stream, kept in enumerate((first, second)):
        assert within_binomial_bound(kept.sum(), size, 1 - p), stream
        np.testing.assert_array_equal(kept.reshape(-1), masked(layer.dropout_masks.key, stream, p, size))
    # the two boundaries' masks are unrelated: they agree only by chance
    assert within_binomial_bound((first == second).sum(), size, p ** 2 + (1 - p) ** 2)
    assert layer.dropout_masks.stream == 2
    layer.forward(x, training=False)  # evaluation takes no stream
    assert layer.dropout_masks.stream == 2
    layer.forward(x, training=True)
    np.testing.assert_array_equal(dropped_between_layers(layer)[0].reshape(-1),
                                  masked(layer.dropout_masks.key, 2, p, size))


def test_reseeding_restarts_the_dropout_masks(rng):
    """What exact resume rests on: the trainer reseeds the model before every step, and
    a layer whose streams have moved on then drops what a fresh one does."""
    x = rng.uniform(-1, 1, (4, 6, 3)).astype(np.float32)
    used = LSTM(3, 8, num_layers=3, dropout=0.4)
    fresh = LSTM(3, 8, num_layers=3, dropout=0.4)
    fresh.load_state_dict(used.state_dict())
    for _ in range(2):
        used.forward(x, training=True)
    used.seed(11)
    fresh.seed(11)
    for _ in range(2):
        np.testing.assert_array_equal(used.forward(x, training=True), fresh.forward(x, training=True))
    assert used.dropout_masks.key == fresh.dropout_masks.key


# -- layout, errors, shapes ---------------------------------------------------------------
def test_parameter_names_and_shapes_follow_pytorch():
    lstm = LSTM(7, 5, num_layers=2)
    assert list(lstm.params) == [
        "weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0",
        "weight_ih_l1", "weight_hh_l1", "bias_ih_l1", "bias_hh_l1",
    ]
    assert lstm.params["weight_ih_l0"].shape == (20, 7)
    assert lstm.params["weight_hh_l1"].shape == (20, 5)
    assert lstm.params["weight_ih_l1"].shape == (20, 5)
    assert GRU(7, 5).params["weight_ih_l0"].shape == (15, 7)
    assert RNN(7, 5).params["bias_hh_l0"].shape == (5,)
    peep = LSTM(7, 5, peephole=True)
    assert peep.params["weight_co_l0"].shape == (5,) and peep.param_roles["weight_co_l0"] == "other"
    assert lstm.param_roles["bias_ih_l0"] == "bias" and lstm.param_roles["weight_hh_l0"] == "weight"
    bound = 1 / np.sqrt(5)
    assert all(np.abs(v).max() <= bound for v in lstm.params.values())


def test_shapes_flops_repr_and_errors():
    layer = LSTM(6, 8, num_layers=2, return_sequences=False, stateful=True)
    assert layer.output_shape((10, 6)) == (8,)
    assert LSTM(6, 8).output_shape((10, 6)) == (10, 8)
    assert layer.flops((10, 6)) == 2 * 10 * 32 * (6 + 8) + 2 * 10 * 32 * (8 + 8)
    assert "return_sequences=False" in repr(layer) and "stateful=True" in repr(layer)
    with pytest.raises(ConfigError, match=r"\(N, T, 6\)"):
        layer.forward(np.zeros((2, 3, 5)))
    with pytest.raises(ConfigError, match="dropout"):
        GRU(2, 2, dropout=1.0)
    with pytest.raises(ConfigError, match="2 arrays"):
        LSTM(2, 3).initial_state = np.zeros((1, 1, 3))
    with pytest.raises(ConfigError, match="num_layers, N, hidden"):
        RNN(2, 3).initial_state = np.zeros((2, 1, 3))
    assert LSTM(2, 3).supports_cuda() and GRU(2, 3).supports_cuda() and RNN(2, 3).supports_cuda()


def test_gradients_accumulate_until_zero_grad(rng):
    layer = GRU(3, 4)
    x = rng.uniform(-1, 1, (2, 5, 3)).astype(np.float32)
    dy = rng.standard_normal((2, 5, 4)).astype(np.float32)
    layer.forward(x)
    layer.backward(dy)
    once = {k: v.copy() for k, v in layer.grads.items()}
    layer.forward(x)
    layer.backward(dy)
    for key, value in layer.grads.items():
        np.testing.assert_allclose(value, 2 * once[key], rtol=1e-5, atol=1e-6)
    layer.zero_grad()
    assert not any(v.any() for v in layer.grads.values())
