"""Committees of nets (Ciresan et al. 2012's multi-column net): train the members a
committee file lists, then average their class probabilities on the test set.

A committee file names a base experiment and one override table per member, so
members may differ in preprocessing, input size, architecture or seed::

    [committee]
    experiment = "gtsrb.toml"          # relative to this file
    tta = "none"                       # test-time augmentation of every member (the
                                       # members' own eval.tta is "none" unless they set it)

    [[committee.members]]
    name = "gray-lcn"
    set = { "experiment.seed" = 1 }

    [[committee.members]]
    name = "colour"
    set = { "data.grayscale" = false, "data.preprocess" = ["scale", "standardize"] }

``rabbit committee FILE [--dask ADDRESS]`` trains them (one after another, or on
a dask cluster as sweeps do) and prints each member's and the committee's test
accuracy; ``rabbit eval RUN... --committee`` evaluates finished runs.
``--replay FOLDER`` gives every member the kernel variants its run in FOLDER (an
earlier training of the committee) chose, so that training repeats bit for bit on
the same machine whatever the tuning cache has measured since.
"""
import dataclasses
import pathlib
import re

from ..backend import tuning
from ..errors import ConfigError
from . import config as config_module

MEMBER_KEYS = {"name", "set"}


@dataclasses.dataclass
class CommitteeSpec:
    experiment: pathlib.Path
    members: list  # [(name, {dotted key: value})]
    tta: object = "none"


def load_committee(path):
    """Read and check a committee file (one-line errors naming the file and key)."""
    path = pathlib.Path(path)
    raw = config_module.load_toml(path)
    table = raw.get("committee")
    if not isinstance(table, dict):
        raise ConfigError(f"{path}: expected a [committee] table")
    unknown = set(raw) - {"committee"} or set(table) - {"experiment", "tta", "members"}
    if unknown:
        raise ConfigError(f"{path}: unknown keys {sorted(unknown)}; a committee file has [committee] with "
                          f"experiment, tta and [[committee.members]]")
    if not isinstance(table.get("experiment"), str):
        raise ConfigError(f"{path}: committee.experiment must name the base experiment file")
    experiment = (path.parent / table["experiment"]).resolve()
    if not experiment.is_file():
        raise ConfigError(f"{path}: committee.experiment {table['experiment']!r} not found (looked at {experiment})")
    members = table.get("members")
    if not isinstance(members, list) or len(members) < 2:
        raise ConfigError(f"{path}: committee.members must list at least two [[committee.members]] tables")
    parsed = []
    for index, member in enumerate(members):
        where = f"{path}: committee.members[{index}]"
        if not isinstance(member, dict) or set(member) - MEMBER_KEYS or not isinstance(member.get("set", {}), dict):
            raise ConfigError(f"{where}: expected a table with 'name' and a 'set' table of dotted keys")
        name = str(member.get("name", f"member{index}"))
        parsed.append((name, dict(member.get("set", {}))))
    names = [name for name, _ in parsed]
    if len(set(names)) != len(names):
        raise ConfigError(f"{path}: committee member names repeat: {names}")
    return CommitteeSpec(experiment, parsed, table.get("tta", "none"))


# A member's run folder: committee-<member name>-<date>-<time>[-k] (rundir.new_run_directory)
_MEMBER_RUN = re.compile(r"committee-(?P<name>.+)-\d{8}-\d{6}(-\d+)?")


def replayed_choices(spec, folder):
    """{member name: the kernel-choices file of its latest run in ``folder``}, for every
    member of ``spec``; ConfigError naming the folder and the members it lacks."""
    folder = pathlib.Path(folder)
    if not folder.is_dir():
        raise ConfigError(f"{folder}: no such folder (--replay takes the folder of an earlier committee's runs)")
    latest = {}
    for run_dir in sorted(folder.iterdir()):  # one member's names sort by their date and time
        match = _MEMBER_RUN.fullmatch(run_dir.name)
        if match and (run_dir / tuning.CHOICES_FILE).is_file():
            latest[match["name"]] = (run_dir / tuning.CHOICES_FILE).resolve()
    missing = [name for name, _ in spec.members if name not in latest]
    if missing:
        raise ConfigError(f"{folder}: no run with {tuning.CHOICES_FILE} of committee member(s) "
                          f"{', '.join(missing)} (looked for committee-<name>-<date>-<time> folders)")
    return {name: latest[name] for name, _ in spec.members}


def train_committee(path, *, client=None, out=None, replay=None):
    """Train every member, then evaluate the committee; returns (member run dirs, report).
    ``replay``: the folder of an earlier training's member runs, whose kernel choices
    each member takes (:func:`replayed_choices`)."""
    from .api import run_points
    from .evaluate import evaluate_committee
    from .tta import parse_views

    spec = load_committee(path)
    parse_views(spec.tta, where=f"{path}: committee.tta")
    choices = replayed_choices(spec, replay) if replay is not None else {}
    # The committee measures every member under its own committee.tta below, so a
    # member's end-of-run test-time augmentation would be paid twice (on the full
    # GTSRB the dense views cost minutes per member); a member that sets eval.tta keeps it.
    points = [{"eval.tta": "none", **overrides, "experiment.name": f"committee-{name}",
               **({"experiment.kernel_choices": str(choices[name])} if name in choices else {})}
              for name, overrides in spec.members]
    run_options = {"out": out} if out else {}
    results = run_points(spec.experiment, points, client=client, desc="committee", **run_options)
    run_dirs = [result.run_dir for _, result in results]
    # Next to the members, named after the committee file: two committees in one runs folder keep their reports.
    report_dir = pathlib.Path(run_dirs[0]).parent / pathlib.Path(path).stem
    return run_dirs, evaluate_committee(run_dirs, tta=spec.tta, out=report_dir)
