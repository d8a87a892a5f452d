"""Optimizers against numpy references of PyTorch's update rules; state dicts; clipping; CUDA parity."""
import math

import numpy as np
import pytest

import rabbitkit
from rabbitkit.errors import CheckpointError, ConfigError
from rabbitkit.layers import Dense, PReLU, Tanh
from rabbitkit.optim import SGD, Adam, RMSprop, clip_grad_norm
from rabbitkit.plugins import registry


def make_model(dtype=np.float64):
    rabbitkit.manual_seed(0)
    return rabbitkit.Sequential([Dense(3, 4, dtype=dtype), Tanh(dtype=dtype), Dense(4, 2, dtype=dtype), PReLU(dtype=dtype)])


def gradient_sequence(model, steps, seed=1):
    """Fixed pseudo-gradients per step and parameter (the optimizers only see grads)."""
    rng = np.random.default_rng(seed)
    return [{p.name: rng.standard_normal(p.value.shape) for p in model.parameters()} for _ in range(steps)]


# -- numpy references of torch.optim's single-tensor update rules ---------------
# Weight decay applies to role "weight" only (rabbitkit's documented difference).
def reference_sgd(w, g, state, step, lr, wd, momentum=0.0, dampening=0.0, nesterov=False):
    g = g + wd * w
    if momentum:
        if step == 1:
            state["buf"] = g.copy()
        else:
            state["buf"] = momentum * state["buf"] + (1 - dampening) * g
        g = g + momentum * state["buf"] if nesterov else state["buf"]
    return w - lr * g


def reference_rmsprop(w, g, state, step, lr, wd, alpha=0.99, eps=1e-8, momentum=0.0):
    g = g + wd * w
    state["sq"] = alpha * state.get("sq", 0.0) + (1 - alpha) * g * g
    avg = np.sqrt(state["sq"]) + eps
    if momentum > 0:
        state["buf"] = momentum * state.get("buf", 0.0) + g / avg
        return w - lr * state["buf"]
    return w - lr * g / avg


def reference_adam(w, g, state, step, lr, wd, betas=(0.9, 0.999), eps=1e-8):
    g = g + wd * w
    state["m"] = betas[0] * state.get("m", 0.0) + (1 - betas[0]) * g
    state["v"] = betas[1] * state.get("v", 0.0) + (1 - betas[1]) * g * g
    step_size = lr / (1 - betas[0] ** step)
    denom = np.sqrt(state["v"]) / math.sqrt(1 - betas[1] ** step) + eps
    return w - step_size * state["m"] / denom


CASES = [
    ("sgd", SGD, reference_sgd, {}),
    ("sgd-momentum", SGD, reference_sgd, {"momentum": 0.9}),
    ("sgd-dampening", SGD, reference_sgd, {"momentum": 0.8, "dampening": 0.3}),
    ("sgd-nesterov", SGD, reference_sgd, {"momentum": 0.9, "nesterov": True}),
    ("rmsprop", RMSprop, reference_rmsprop, {}),
    ("rmsprop-momentum", RMSprop, reference_rmsprop, {"momentum": 0.5, "alpha": 0.9}),
    ("adam", Adam, reference_adam, {}),
    ("adam-betas", Adam, reference_adam, {"betas": (0.8, 0.95), "eps": 1e-6}),
]


# Multipliers for make_model()'s parameters and the factors they give, worked out by hand:
# "0.bias" matches "0" and "*.bias", and the first pattern wins; "2.weight" alone gets decay 0.5.
MULTIPLIERS = {"lr_mult": {"0": 0.1, "*.bias": 2.0}, "decay_mult": {"2": 0.5}}
LR_FACTORS = {"0.weight": 0.1, "0.bias": 0.1, "2.weight": 1.0, "2.bias": 2.0, "3.weight": 1.0}
DECAY_FACTORS = {"0.weight": 1.0, "2.weight": 0.5}  # the weights; nothing else is decayed


def run_and_compare(optimizer_class, reference, hyper, lr, wd, steps=5, multipliers=None):
    """Steps the optimizer against the reference (each parameter at its own lr and decay when
    ``multipliers`` is :data:`MULTIPLIERS`); returns the model and the optimizer."""
    lr_factors, decay_factors = (LR_FACTORS, DECAY_FACTORS) if multipliers else ({}, {})
    model = make_model()
    opt = optimizer_class(model.parameters(), lr=lr, weight_decay=wd, **hyper, **(multipliers or {}))
    expected = {p.name: p.value.copy() for p in model.parameters()}
    roles = {p.name: p.role for p in model.parameters()}
    states = {name: {} for name in expected}
    for step, grads in enumerate(gradient_sequence(model, steps), start=1):
        for p in model.parameters():
            p.grad[...] = grads[p.name]
            decay = wd * decay_factors.get(p.name, 1.0) if roles[p.name] == "weight" else 0.0
            expected[p.name] = reference(expected[p.name], grads[p.name], states[p.name], step,
                                         lr * lr_factors.get(p.name, 1.0), decay, **hyper)
        opt.step()
    for p in model.parameters():
        np.testing.assert_allclose(p.value, expected[p.name], rtol=1e-12, atol=1e-14, err_msg=p.name)
    return model, opt


@pytest.mark.parametrize("name,optimizer_class,reference,hyper", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("wd", [0.0, 0.1])
def test_matches_the_pytorch_rule(name, optimizer_class, reference, hyper, wd):
    _, optimizer = run_and_compare(optimizer_class, reference, hyper, lr=0.05, wd=wd)  # compares every step
    assert optimizer.steps > 1


@pytest.mark.parametrize("name,optimizer_class,reference,hyper", CASES, ids=[c[0] for c in CASES])
def test_multipliers_give_each_parameter_its_own_lr_and_decay(name, optimizer_class, reference, hyper):
    _, optimizer = run_and_compare(optimizer_class, reference, hyper, lr=0.05, wd=0.1, multipliers=MULTIPLIERS)
    assert optimizer.lr_factors == [LR_FACTORS[p.name] for p in optimizer.params]


def test_one_sgd_step_at_a_tenth_of_the_lr_by_hand():
    model = make_model()
    params = {p.name: p for p in model.parameters()}
    before = {name: p.value.copy() for name, p in params.items()}
    grads = gradient_sequence(model, 1)[0]
    opt = SGD(model.parameters(), lr=0.5, lr_mult={"0": 0.1, "2.bias": 0.0})
    for name, p in params.items():
        p.grad[...] = grads[name]
    opt.step()
    np.testing.assert_allclose(params["0.weight"].value, before["0.weight"] - 0.05 * grads["0.weight"], rtol=1e-15)
    np.testing.assert_allclose(params["2.weight"].value, before["2.weight"] - 0.5 * grads["2.weight"], rtol=1e-15)
    np.testing.assert_array_equal(params["2.bias"].value, before["2.bias"])  # lr_mult 0: Caffe's way to hold one still
    opt.lr = 0.2  # what a schedule does between steps: the factor stays on top of the new lr
    before = params["0.weight"].value.copy()
    opt.step()
    np.testing.assert_allclose(params["0.weight"].value, before - 0.02 * grads["0.weight"], rtol=1e-15)


def test_one_adam_step_at_a_tenth_of_the_lr_by_hand():
    # Adam's first step: m_hat = g and v_hat = g^2, so w -= lr * g / (|g| + eps)
    model = make_model()
    params = {p.name: p for p in model.parameters()}
    before = {name: p.value.copy() for name, p in params.items()}
    grads = gradient_sequence(model, 1)[0]
    opt = Adam(model.parameters(), lr=0.01, eps=1e-8, lr_mult={"0.weight": 0.1})
    for name, p in params.items():
        p.grad[...] = grads[name]
    opt.step()
    for name, lr in (("0.weight", 0.001), ("2.weight", 0.01)):
        g = grads[name]
        np.testing.assert_allclose(params[name].value, before[name] - lr * g / (np.abs(g) + 1e-8), rtol=1e-13)


def test_decay_mult_scales_weight_decay_by_hand():
    model = make_model()
    before = {p.name: p.value.copy() for p in model.parameters()}
    opt = SGD(model.parameters(), lr=0.1, weight_decay=0.5, decay_mult={"0": 0.2})
    opt.zero_grad()
    opt.step()  # zero gradients: only weight decay moves anything
    after = {p.name: p.value for p in model.parameters()}
    np.testing.assert_allclose(after["0.weight"], before["0.weight"] * (1 - 0.1 * 0.5 * 0.2), rtol=1e-15)
    np.testing.assert_allclose(after["2.weight"], before["2.weight"] * (1 - 0.1 * 0.5), rtol=1e-15)
    np.testing.assert_array_equal(after["0.bias"], before["0.bias"])  # matched, but biases are never decayed
    assert opt.decay_factors == [0.2, 0.0, 1.0, 0.0, 0.0]


@pytest.mark.parametrize("multipliers,message", [
    ({"lr_mult": {"1.weight": 0.1}}, "lr_mult pattern '1.weight' matches no trained layer or parameter; nearest names: "
                                     "3.weight, 2.weight, 0.weight"),
    ({"lr_mult": {"features.*": 0.1}}, "lr_mult pattern 'features.*' matches no trained layer or parameter; "
                                       "names look like: 0, 0.weight, 0.bias, 2, 2.weight"),
    ({"decay_mult": {"2.bais": 0.1}}, "decay_mult pattern '2.bais' matches no trained layer or parameter; nearest names: 2.bias, 0.bias"),
    ({"decay_mult": {"*.bias": 0.0}}, "decay_mult pattern '*.bias' matches only parameters weight decay leaves alone "
                                      "(it decays weights only): 0.bias, 2.bias"),
    ({"lr_mult": {"0": -0.1}}, "lr_mult '0': expected a number >= 0, got -0.1"),
    ({"lr_mult": {"0": "0.1"}}, "lr_mult '0': expected a number >= 0, got '0.1'"),
    ({"decay_mult": {"0": math.inf}}, "decay_mult '0': expected a number >= 0, got inf"),
])
def test_bad_multipliers_are_refused_in_one_line(multipliers, message):
    with pytest.raises(ConfigError) as info:
        SGD(make_model().parameters(), **multipliers)
    assert str(info.value) == message


def test_a_multiplier_on_a_frozen_layer_is_refused():
    from rabbitkit.layers import freeze

    model = make_model()
    freeze(model, ["0"])  # frozen parameters never reach the optimizer, so nothing would scale
    with pytest.raises(ConfigError, match="lr_mult pattern '0' matches no trained layer or parameter"):
        SGD(model.parameters(), lr_mult={"0": 0.1})


def test_optimizers_are_registered():
    optimizers = registry("optimizers")
    assert optimizers.get("sgd") is SGD and optimizers.get("rmsprop") is RMSprop and optimizers.get("adam") is Adam


def test_weight_decay_leaves_biases_and_other_roles_alone():
    model = make_model()
    before = {p.name: p.value.copy() for p in model.parameters()}
    opt = SGD(model.parameters(), lr=0.1, weight_decay=0.5)
    opt.zero_grad()
    opt.step()  # zero gradients: only weight decay can move anything
    for p in model.parameters():
        if p.role == "weight":
            np.testing.assert_allclose(p.value, before[p.name] * (1 - 0.1 * 0.5), rtol=1e-15)
        else:
            np.testing.assert_array_equal(p.value, before[p.name])
    assert {p.role for p in model.parameters()} == {"weight", "bias", "other"}


def test_nesterov_differs_from_plain_momentum():
    # both already match their references; this guards against the flag being ignored
    plain = run_and_compare(SGD, reference_sgd, {"momentum": 0.9}, lr=0.05, wd=0.0)[0]
    nesterov = run_and_compare(SGD, reference_sgd, {"momentum": 0.9, "nesterov": True}, lr=0.05, wd=0.0)[0]
    assert np.abs(plain[0].params["weight"] - nesterov[0].params["weight"]).max() > 1e-3


def test_lr_can_change_between_steps():
    model = make_model()
    opt = SGD(model.parameters(), lr=0.1)
    weight = model[0].params["weight"]
    before = weight.copy()
    model[0].grads["weight"][...] = 1.0
    opt.lr = 0.5
    opt.step()
    np.testing.assert_allclose(weight, before - 0.5)


@pytest.mark.parametrize("optimizer_class,hyper", [(SGD, {"momentum": 0.9}), (RMSprop, {"momentum": 0.3}), (Adam, {})])
@pytest.mark.parametrize("multipliers", [{}, MULTIPLIERS], ids=["plain", "multipliers"])
def test_state_dict_round_trip_continues_identically(optimizer_class, hyper, multipliers):
    # multipliers come from the configuration, so the state holds nothing new: the resumed
    # optimizer, given the same ones, must continue bit for bit
    hyper = dict(hyper, **multipliers)
    grads = gradient_sequence(make_model(), 6)

    def train(model, opt, steps):
        for g in steps:
            for p in model.parameters():
                p.grad[...] = g[p.name]
            opt.step()

    model = make_model()
    opt = optimizer_class(model.parameters(), lr=0.01, weight_decay=0.01, **hyper)
    train(model, opt, grads[:3])
    saved_model, saved_opt = model.state_dict(), opt.state_dict()
    assert saved_opt["step"].tolist() == [3]
    assert all(isinstance(v, np.ndarray) for v in saved_opt.values())
    train(model, opt, grads[3:])

    resumed = make_model()
    resumed.load_state_dict(saved_model)
    resumed_opt = optimizer_class(resumed.parameters(), lr=0.01, weight_decay=0.01, **hyper)
    resumed_opt.load_state_dict({k: v.copy() for k, v in saved_opt.items()})
    train(resumed, resumed_opt, grads[3:])
    for name, value in model.state_dict().items():
        np.testing.assert_array_equal(resumed.state_dict()[name], value, err_msg=name)


def test_state_dict_names_and_errors():
    model = make_model()
    opt = Adam(model.parameters())
    state = opt.state_dict()
    assert "0.weight.exp_avg" in state and "3.weight.exp_avg_sq" in state and "step" in state
    assert set(SGD(model.parameters(), momentum=0.9).state_dict()) == {"step"} | {
        f"{p.name}.momentum" for p in model.parameters()}
    del state["0.bias.exp_avg"]
    with pytest.raises(CheckpointError, match="0.bias.exp_avg"):
        opt.load_state_dict(state)
    state = opt.state_dict()
    state["0.bias.exp_avg"] = np.zeros(7)
    with pytest.raises(CheckpointError, match="shape"):
        opt.load_state_dict(state)


def test_bad_arguments_are_config_errors():
    model = make_model()
    with pytest.raises(ConfigError, match="nesterov"):
        SGD(model.parameters(), nesterov=True)
    with pytest.raises(ConfigError, match="lr"):
        Adam(model.parameters(), lr=-1)
    with pytest.raises(ConfigError, match="Param"):
        SGD([np.zeros(3)])


def test_clip_grad_norm_scales_to_max_norm():
    model = make_model()
    grads = gradient_sequence(model, 1)[0]
    for p in model.parameters():
        p.grad[...] = grads[p.name]
    norm = math.sqrt(sum((g**2).sum() for g in grads.values()))
    returned = clip_grad_norm(model.parameters(), 0.5)
    assert returned == pytest.approx(norm, rel=1e-12)
    for p in model.parameters():
        np.testing.assert_allclose(p.grad, grads[p.name] * 0.5 / (norm + 1e-6), rtol=1e-12)
    clipped = math.sqrt(sum((p.grad**2).sum() for p in model.parameters()))
    assert clipped <= 0.5
    # below the threshold nothing changes
    before = {p.name: p.grad.copy() for p in model.parameters()}
    assert clip_grad_norm(model.parameters(), 10.0) == pytest.approx(clipped, rel=1e-12)
    for p in model.parameters():
        np.testing.assert_array_equal(p.grad, before[p.name])


def test_large_parameters_use_the_parallel_kernels():
    rng = np.random.default_rng(0)
    layer = Dense(300, 200, dtype=np.float64)  # 60,000 entries: above the parallel threshold
    grad = rng.standard_normal(layer.params["weight"].shape)
    expected = layer.params["weight"].copy()
    opt = Adam(layer.parameters(), lr=0.01, weight_decay=0.1)
    state = {}
    for step in (1, 2):
        layer.grads["weight"][...] = grad
        layer.grads["bias"][...] = 0
        expected = reference_adam(expected, grad, state, step, 0.01, 0.1)
        opt.step()
    # atol: entries that cancel to ~1e-6 differ in the last bits (FMA contraction in the kernel)
    np.testing.assert_allclose(layer.params["weight"], expected, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("optimizer_class,hyper", [
    (SGD, {"momentum": 0.9, "nesterov": True}), (SGD, {}), (RMSprop, {"momentum": 0.5}), (Adam, {}),
    (SGD, dict(MULTIPLIERS, momentum=0.9)), (RMSprop, MULTIPLIERS), (Adam, MULTIPLIERS)],
    ids=["sgd-nesterov", "sgd", "rmsprop", "adam", "sgd-multipliers", "rmsprop-multipliers", "adam-multipliers"])
def test_cuda_matches_cpu(optimizer_class, hyper):
    grads = gradient_sequence(make_model(np.float32), 3)
    results = {}
    for device in ("cpu", "cuda"):
        model = make_model(np.float32).to(device)
        opt = optimizer_class(model.parameters(), lr=0.05, weight_decay=0.1, **hyper)
        for g in grads:
            for p in model.parameters():
                p.backend.copy_into(p.grad, g[p.name].astype(np.float32))
            clip_grad_norm(model.parameters(), 2.0)
            opt.step()
        results[device] = (model.state_dict(), opt.state_dict())
    for cpu, cuda in zip(results["cpu"], results["cuda"]):
        assert set(cpu) == set(cuda)
        for name in cpu:
            np.testing.assert_allclose(cuda[name], cpu[name], rtol=1e-5, atol=1e-6, err_msg=name)
