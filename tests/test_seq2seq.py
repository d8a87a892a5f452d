"""Seq2Seq: the encoder's final state feeds the decoder; gradients, decoding, the reversal task."""
import numpy as np
import pytest

import rabbitkit
from rabbitkit.errors import ConfigError
from rabbitkit.models.seq2seq import EOS, GO, PAD, ReverseTask, Seq2Seq, sequence_accuracy, train_seq2seq


def test_task_data_layout_and_held_out_strings():
    task = ReverseTask("abc", 2, 4, held_out=20, seed=1)
    assert task.vocab_size == 6 and len(task.held_out) == 20
    assert all(2 <= len(s) <= 4 and set(s) <= set("abc") for s in task.held_out)
    source, decoder_input, decoder_target = task.arrays(["abc", "cab"])
    np.testing.assert_array_equal(source, [[3, 4, 5], [5, 3, 4]])
    np.testing.assert_array_equal(decoder_input, [[GO, 5, 4, 3], [GO, 4, 3, 5]])
    np.testing.assert_array_equal(decoder_target, [[5, 4, 3, EOS], [4, 3, 5, EOS]])
    assert task.decode([5, 4, EOS, 3]) == "cb" and task.decode([PAD, 3]) == "a"
    rng = np.random.default_rng(0)
    held = set(task.held_out)
    for _ in range(50):
        src, _, _ = task.training_batch(16, rng)
        assert src.shape[1] in (2, 3, 4)
        assert not any(task.decode(np.append(row, EOS)) in held for row in src)
    with pytest.raises(ConfigError):
        ReverseTask("ab", 4, 3)


def test_gradients_reach_the_encoder_through_the_summary_vector(rng):
    """Finite differences on every parameter of encoder, decoder and head (float64)."""
    model = Seq2Seq(6, hidden_size=3, embedding_dim=2, num_layers=2, dtype=np.float64)
    source = rng.integers(3, 6, (2, 4))
    decoder_input = rng.integers(0, 6, (2, 3))
    probe = rng.standard_normal((2, 3, 6))

    def objective():
        return float(np.sum(model.forward((source, decoder_input)) * probe))

    objective()
    model.zero_grad()
    assert model.backward(probe) is None
    names = [name for name, _, _ in model.named_parameters()]
    assert "1.weight_hh_l1" in names and "0.weight" in names  # encoder side is included
    for name, owner, key in model.named_parameters():
        value, grad = owner.params[key], owner.grads[key]
        for index in list(np.ndindex(value.shape))[:: max(1, value.size // 12)]:
            saved = value[index]
            value[index] = saved + 1e-6
            plus = objective()
            value[index] = saved - 1e-6
            minus = objective()
            value[index] = saved
            numeric = (plus - minus) / 2e-6
            assert abs(grad[index] - numeric) <= 1e-6 + 1e-4 * abs(numeric), (name, index, grad[index], numeric)
    assert np.abs(model.encoder.grads["weight_ih_l0"]).max() > 0


def test_greedy_decoding_matches_teacher_forcing_on_its_own_output(rng):
    model = Seq2Seq(7, hidden_size=8, embedding_dim=4)
    source = rng.integers(3, 7, (3, 5))
    decoded = model.greedy_decode(source, 6)
    assert decoded.shape == (3, 6)
    # Feeding the decoded tokens back with teacher forcing gives the same argmaxes.
    for row, tokens in zip(source, decoded):
        stop = int(np.argmax(tokens == EOS)) + 1 if (tokens == EOS).any() else len(tokens)
        decoder_input = np.concatenate([[GO], tokens[: stop - 1]])[None]
        logits = model.forward((row[None], decoder_input), training=False)
        np.testing.assert_array_equal(np.argmax(logits[0], axis=-1), tokens[:stop])
        assert (tokens[stop:] == PAD).all()


def blas_threads():
    from rabbitkit.layers.conv2d import SINGLE_THREADED_BLAS

    return [library.num_threads for library in SINGLE_THREADED_BLAS._blas()]


def test_reverses_held_out_strings_after_training():
    threads_before = blas_threads()
    rabbitkit.manual_seed(0)
    task = ReverseTask("abcdef", 3, 6, held_out=300, seed=0)
    model = Seq2Seq(task.vocab_size, hidden_size=64, embedding_dim=16)
    assert sequence_accuracy(model, task) < 0.05
    result = train_seq2seq(model, task, steps=1500, batch_size=64, lr=1e-2, eval_every=50, target_accuracy=0.95)
    assert result["accuracy"] > 0.9, result["accuracy"]
    assert result["losses"][-1] < 0.2 * result["losses"][0]
    assert sequence_accuracy(model, task) == result["accuracy"]
    assert blas_threads() == threads_before  # training ran with BLAS single-threaded, then restored


def test_seq2seq_experiment_reaches_90_percent_held_out_sequence_accuracy(tmp_path):
    import pathlib

    import rabbitkit

    experiment = pathlib.Path(__file__).resolve().parents[1] / "experiments" / "seq2seq.toml"
    result = rabbitkit.run(experiment, {"train.epochs": 3, "output.visualizers": []}, out=tmp_path, quiet=True)
    assert result.metrics["test_sequence_accuracy"] > 0.9
    assert result.history[-1]["val_sequence_accuracy"] > 0.5
