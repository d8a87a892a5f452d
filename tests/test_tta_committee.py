"""Test-time augmentation, committees and the worst-classified picture (issue 16)."""
import json

import numpy as np
import pytest

import rabbitkit
from rabbitkit.errors import ConfigError
from rabbitkit.train.evaluate import evaluate_committee, evaluate_run, load_run
from rabbitkit.train.tta import PRESETS, View, parse_views, predict, softmax, warp_view
from rabbitkit.viz.worst import worst_indices
from test_main_job import EXPERIMENT, SMALL, rabbit, write_official_gtsrb


def test_presets_and_bad_view_lists():
    assert parse_views("none") == [View()]
    assert len(parse_views("standard")) == 9 and parse_views("standard")[0].identity
    assert parse_views([{}, {"shift": [1, -1]}, {"scale": 1.1, "rotate": 5}])[1] == View((1.0, -1.0))
    with pytest.raises(ConfigError, match="unknown preset 'strong'; known: none, shifts, standard, dense"):
        parse_views("strong")
    with pytest.raises(ConfigError, match=r"eval.tta\[0\].shift: expected \[dx, dy\]"):
        parse_views([{"shift": 2}])
    with pytest.raises(ConfigError, match="scale: expected a positive number"):
        parse_views([{"scale": 0}])
    with pytest.raises(ConfigError, match="expected a table with shift, scale, rotate"):
        parse_views([{"shear": 3}])


def test_dense_views_are_distinct_and_inside_the_main_jobs_training_augmentation():
    import tomllib

    with open(EXPERIMENT, "rb") as handle:
        augment = tomllib.load(handle)["data"]["augment"]
    dense = parse_views("dense")
    assert len(dense) == len(set(dense)) == 29 and dense[0].identity
    assert set(parse_views("standard")) <= set(dense)
    for view in dense:
        assert max(abs(view.shift[0]), abs(view.shift[1])) <= augment["translate"]
        assert abs(view.scale - 1.0) <= augment["scale"] + 1e-12
        assert abs(view.rotate) <= augment["rotate"]
        # one ingredient at a time: a view shifts, or scales, or rotates
        assert sum((view.shift != (0.0, 0.0), view.scale != 1.0, view.rotate != 0.0)) <= 1


def test_views_move_the_image_as_named():
    x = np.zeros((1, 1, 11, 11), np.float32)
    x[0, 0, 5, 5] = 1.0
    right = warp_view(x, View((2.0, 0.0)))
    assert right[0, 0, 5, 7] == pytest.approx(1.0) and right.sum() == pytest.approx(1.0)
    down = warp_view(x, View((0.0, -3.0)))
    assert down[0, 0, 2, 5] == pytest.approx(1.0)
    turned = warp_view(x, View(rotate=90.0))  # the centre stays where it is
    assert turned[0, 0, 5, 5] == pytest.approx(1.0)
    assert warp_view(x, View()) is x


def test_worst_indices_rank_by_true_class_probability():
    p = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.5, 0.5]])
    assert list(worst_indices(p, np.array([0, 0, 0, 1]), count=3)) == [1, 3, 2]


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """Two tiny GTSRB-format runs (different seeds) with test-time augmentation at the end."""
    root = tmp_path_factory.mktemp("committee")
    data = root / "gtsrb"
    write_official_gtsrb(data)
    overrides = {"data.path": str(data), "train.epochs": 3, "output.dir": str(root / "runs"), "eval.tta": "shifts",
                 "output.visualizers": []}
    for text in SMALL[1::2]:
        key, value = text.split("=", 1)
        overrides[key] = json.loads(value)
    runs = [rabbitkit.run(EXPERIMENT, dict(overrides, **{"experiment.seed": seed})).run_dir for seed in (0, 1)]
    return data, runs


def test_run_end_reports_tta_accuracy_and_cost(two_runs):
    _, runs = two_runs
    final = json.loads((runs[0] / "final_metrics.json").read_text())
    assert 0.0 <= final["test_tta_accuracy"] <= 1.0 and final["test_tta_seconds"] > 0
    assert "test with test-time augmentation (5 views)" in (runs[0] / "log.txt").read_text()


def test_predict_without_views_is_the_plain_evaluation(two_runs):
    _, runs = two_runs
    live = load_run(runs[0])
    plain = live.evaluate("test", collect=True)
    prediction = predict(live, "test", PRESETS["none"])
    np.testing.assert_allclose(prediction.probabilities, softmax(plain["outputs"].astype(np.float64)), rtol=1e-6)
    assert prediction.accuracy == pytest.approx(plain["accuracy"])
    shifted = predict(live, "test", PRESETS["shifts"])
    assert not np.allclose(shifted.probabilities, prediction.probabilities)


def test_eval_with_tta_draws_the_worst_images(two_runs):
    _, runs = two_runs
    report = evaluate_run(runs[0], tta="shifts", worst=6)
    assert "with test-time augmentation (5 views" in report.text
    assert (runs[0] / "worst_test.png").is_file()
    assert 0.0 <= report.metrics["tta_accuracy"] <= 1.0


def test_committee_averages_member_probabilities(two_runs):
    _, runs = two_runs
    report = evaluate_committee(runs, worst=5)
    members = [predict(load_run(r), "test") for r in runs]
    average = (members[0].probabilities + members[1].probabilities) / 2
    expected = float(np.mean(average.argmax(axis=1) == members[0].targets))
    assert report.metrics["accuracy"] == pytest.approx(expected)
    assert report.metrics["member_accuracy"] == pytest.approx([m.accuracy for m in members])
    assert "committee of 2: test accuracy" in report.text
    # What a single run's evaluation writes, for the committee: next to the members by default.
    out = runs[0].parent / "committee"
    assert report.files == [out / "confusion_test.csv", out / "confusion_test.png", out / "worst_test.png",
                            out / "committee_test.json"]
    matrix = np.loadtxt(out / "confusion_test.csv", delimiter=",", skiprows=1, dtype=int)[:, 1:]
    np.testing.assert_array_equal(matrix, report.confusion)
    assert np.trace(matrix) == round(expected * len(members[0].targets))
    assert "per-class accuracy:" in report.text and "stop" in report.text.lower()
    summary = json.loads((out / "committee_test.json").read_text())
    assert summary["members"] == [str(r) for r in runs] and summary["accuracy"] == report.metrics["accuracy"]


def test_committee_cli_and_its_errors(two_runs, tmp_path):
    import os

    _, runs = two_runs
    env = dict(os.environ, RABBIT_OFFLINE="1")
    done = rabbit(["eval", *runs, "--committee", "--out", tmp_path / "mine", "--worst", "0"], env, tmp_path)
    assert done.returncode == 0, done.stderr
    assert "committee of 2" in done.stdout
    assert sorted(p.name for p in (tmp_path / "mine").iterdir()) == [
        "committee_test.json", "confusion_test.csv", "confusion_test.png"]
    refused = rabbit(["eval", *runs], env, tmp_path)
    assert refused.returncode == 2 and "pass --committee" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1
    with pytest.raises(ConfigError, match="at least two runs"):
        evaluate_committee(runs[:1])
    shipped = EXPERIMENT.parent / "gtsrb_committee.toml"
    refused = rabbit(["committee", shipped, "--replay", tmp_path / "nothing"], env, tmp_path)
    assert refused.returncode == 2 and len(refused.stderr.strip().splitlines()) == 1
    assert f"{tmp_path / 'nothing'}: no such folder (--replay takes the folder of an earlier committee's runs)" \
        in refused.stderr


def _committee_file(tmp_path, body):
    path = tmp_path / "committee.toml"
    path.write_text(body)
    return path


def test_committee_file_errors(tmp_path):
    from rabbitkit.train.committee import load_committee

    cases = [
        ("[other]\nx = 1\n", "expected a \\[committee\\] table"),
        ("[committee]\nexperiment = \"missing.toml\"\n", "committee.experiment 'missing.toml' not found"),
        (f"[committee]\nexperiment = \"{EXPERIMENT}\"\nmembers = [{{ name = \"a\" }}]\n", "at least two"),
        (f"[committee]\nexperiment = \"{EXPERIMENT}\"\nmembers = [{{ name = \"a\" }}, {{ name = \"a\" }}]\n",
         "names repeat"),
        (f"[committee]\nexperiment = \"{EXPERIMENT}\"\nmembers = [{{ nam = \"a\" }}, {{ name = \"b\" }}]\n",
         r"members\[0\]: expected a table with 'name'"),
        (f"[committee]\nexperiment = \"{EXPERIMENT}\"\ncolumns = 3\n", "unknown keys \\['columns'\\]"),
    ]
    for body, message in cases:
        with pytest.raises(ConfigError, match=message):
            load_committee(_committee_file(tmp_path, body))


def test_shipped_committee_file_is_valid():
    from rabbitkit.train import config as config_module
    from rabbitkit.train.committee import load_committee

    spec = load_committee(EXPERIMENT.parent / "gtsrb_committee.toml")
    assert len(spec.members) == 5
    for _, overrides in spec.members:  # every member resolves against the base experiment
        config_module.load(spec.experiment, overrides=overrides)


def test_rabbit_committee_trains_members_and_reports(tmp_path):
    import os

    data = tmp_path / "gtsrb"
    write_official_gtsrb(data, tracks=3, per_track=4, tests_per_class=3)
    small = "".join(f", \"{t.split('=', 1)[0]}\" = {t.split('=', 1)[1]}" for t in SMALL[1::2])
    body = (f"[committee]\nexperiment = \"{EXPERIMENT}\"\ntta = \"shifts\"\n"
            f"[[committee.members]]\nname = \"gray\"\nset = {{ \"data.path\" = \"{data}\", \"train.epochs\" = 2, "
            f"\"eval.tta\" = \"standard\", \"experiment.name\" = \"renamed\"{small} }}\n"
            f"[[committee.members]]\nname = \"colour\"\nset = {{ \"data.path\" = \"{data}\", \"train.epochs\" = 2, "
            f"\"data.grayscale\" = false, \"data.preprocess\" = [\"equalize\", \"standardize\"]{small} }}\n")
    path = _committee_file(tmp_path, body)
    env = dict(os.environ, RABBIT_OFFLINE="1")
    done = rabbit(["committee", path, "--out", tmp_path / "runs"], env, tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("member ") == 2
    assert "committee of 2, test-time augmentation 5 views: test accuracy" in done.stdout
    runs = {p.name.split("-2")[0]: p for p in (tmp_path / "runs").iterdir()}
    # The committee names its members, and its own report is named after its file.
    assert sorted(runs) == ["committee", "committee-colour", "committee-gray"]
    assert (runs["committee"] / "worst_test.png").is_file() and (runs["committee"] / "committee_test.json").is_file()
    del runs["committee"]
    # The committee's own views replace a member's end-of-run TTA, unless the member sets eval.tta.
    finals = {name: json.loads((run / "final_metrics.json").read_text()) for name, run in runs.items()}
    assert "test_tta_accuracy" not in finals["committee-colour"] and "test_accuracy" in finals["committee-colour"]
    assert "test_tta_accuracy" in finals["committee-gray"]


def test_a_run_can_test_its_last_checkpoint(two_runs, tmp_path):
    data, _ = two_runs
    overrides = {"data.path": str(data), "train.epochs": 3, "output.dir": str(tmp_path), "output.visualizers": [],
                 "train.test_checkpoint": "last"}
    for text in SMALL[1::2]:
        key, value = text.split("=", 1)
        overrides[key] = json.loads(value)
    result = rabbitkit.run(EXPERIMENT, overrides)
    final = json.loads((result.run_dir / "final_metrics.json").read_text())
    assert final["tested_checkpoint"] == "last"
    last = evaluate_run(result.run_dir, worst=0)  # rabbit eval follows the run's choice
    assert last.metrics["accuracy"] == pytest.approx(final["test_accuracy"])
    assert last.metrics["loss"] == pytest.approx(final["test_loss"])
    best = load_run(result.run_dir, "best").evaluate("test")
    last_model = load_run(result.run_dir, "last").evaluate("test")
    assert last_model["loss"] == pytest.approx(final["test_loss"])
    assert (best["loss"] == pytest.approx(final["test_loss"])) == (final["best_epoch"] == 3)


def read_history(run_dir):
    import csv

    with open(run_dir / "metrics.csv") as handle:
        return list(csv.DictReader(handle))


def test_a_committee_trained_again_with_replay_repeats_the_earlier_training(tmp_path, monkeypatch):
    """`rabbit committee FILE --replay FOLDER`: every member takes the kernel variants of its
    run in FOLDER, so after the tuning cache changed its mind the committee trains as before."""
    from rabbitkit.backend import tuning
    from rabbitkit.train.committee import load_committee, replayed_choices, train_committee

    from test_trainer import history_without_timing
    from test_tuning import cache_changes_its_mind

    monkeypatch.setenv("RABBIT_TUNE", "1")
    monkeypatch.setenv("RABBIT_CACHE", str(tmp_path / "cache"))
    tuning.forget()
    data = tmp_path / "gtsrb"
    write_official_gtsrb(data, tracks=2, per_track=3, tests_per_class=2)
    small = "".join(f", \"{t.split('=', 1)[0]}\" = {t.split('=', 1)[1]}" for t in SMALL[1::2])
    common = f"\"data.path\" = \"{data}\", \"train.epochs\" = 1, \"output.visualizers\" = []{small}"
    path = _committee_file(tmp_path, f"[committee]\nexperiment = \"{EXPERIMENT}\"\n"
                                     f"[[committee.members]]\nname = \"a\"\nset = {{ {common} }}\n"
                                     f"[[committee.members]]\nname = \"a-48\"\nset = {{ \"experiment.seed\" = 5, {common} }}\n")
    try:
        first, first_report = train_committee(path, out=tmp_path / "first")
        chosen = {}
        for run_dir in first:
            chosen.update(json.loads((run_dir / tuning.CHOICES_FILE).read_text()))
        assert chosen
        cache_changes_its_mind(tmp_path / "cache" / "tuning.json", chosen)
        again, again_report = train_committee(path, out=tmp_path / "again", replay=tmp_path / "first")
    finally:
        tuning.forget()
    for before, after in zip(first, again):
        assert json.loads((after / tuning.CHOICES_FILE).read_text()) == json.loads((before / tuning.CHOICES_FILE).read_text())
        assert history_without_timing(read_history(after)) == history_without_timing(read_history(before))
        finals = [json.loads((run / "final_metrics.json").read_text()) for run in (before, after)]
        assert [(f["test_loss"], f["test_accuracy"]) for f in finals] == [(finals[0]["test_loss"],
                                                                          finals[0]["test_accuracy"])] * 2
    accuracy = [next(line for line in report.text.splitlines() if line.startswith("committee of"))
                for report in (first_report, again_report)]
    assert accuracy[0] == accuracy[1]
    # Members are found by name: "a" is not taken for "a-48", and a missing member is named.
    spec = load_committee(path)
    assert replayed_choices(spec, tmp_path / "first") == {
        name: (run_dir / tuning.CHOICES_FILE).resolve() for (name, _), run_dir in zip(spec.members, first)}
    (first[1] / tuning.CHOICES_FILE).unlink()
    with pytest.raises(ConfigError, match=r"first: no run with kernel_choices.json of committee member\(s\) a-48"):
        replayed_choices(spec, tmp_path / "first")
