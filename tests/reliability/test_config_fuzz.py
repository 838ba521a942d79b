"""Launchpad config fuzz: every field of every launchpad config (fct_assets.lib.config.LAUNCHPAD),
at its bounds, with boundary and random values, refused at launch with one line naming the field.

A launch is checked twice before anything runs, as the UI and the GraphQL client launch:
`dagster.validate_run_config` (Dagster's own config types: types, unknown keys, enumerated
values; what the launchpad marks as it is typed) and `launch_refusals` (each step's config class:
ranges and formats, which Dagster's types cannot carry; what the run coordinator refuses at
submission, fct_assets/lib/submission.py). FCT_CONFIG_FUZZ=N adds N random cases (default 20).
"""

from __future__ import annotations

import enum
import json
import math
import os
import random
import types
import typing

import annotated_types as at
import dagster as dg
import pytest

from fct_assets.definitions import build_defs
from fct_assets.lib import config as cfg

# The job whose launchpad carries each step's config.
JOB_OF = {
    "dataset": "base",
    "old_model": "base",
    "side_info_model": "base",
    "new_model": "upgrade",
    "transformation": "upgrade",
    "backfilled_gallery": "upgrade",
    "eval_report": "upgrade",
    # No launchpad field: the version is the run's partition (test_the_serving_jobs_...).
    "promote_version": "promote",
    "rollback_deployment": "rollback",
}
NAN, INF = float("nan"), float("inf")
# Values of the wrong type or format, beside the bounds (which are derived from the classes).
BAD = {
    ("backfilled_gallery", "reembed_fraction"): [NAN, INF, -INF, 1e308, "half", [0.1]],
    ("backfilled_gallery", "rows_per_batch"): [-(2**40), "many", 1.5, None],
    ("backfilled_gallery", "shards"): [10**12, "4", 2.5],
    ("backfilled_gallery", "ann_min_rows"): [-5, "x", 1e9],
    ("new_model", "embed_dim"): [10**9, "128", 1.5],
    ("new_model", "epochs"): [-3, 10**9, "ten", NAN],
    ("new_model", "seed"): ["zero", 0.5],
    ("new_model", "arch"): [5, ["cnn-s"], "cnn-q", "resnet"],
    ("new_model", "source"): ["trained", "checkpoint:", "torchscript", "file:/x"],
    ("new_model", "sha256"): ["abc", "A" * 64, "g" * 64],
    ("new_model", "preprocess_channels"): [2],
    ("new_model", "preprocess_mean"): [NAN, INF],
    ("new_model", "preprocess_std"): [0.0, -1.0, NAN],
    ("transformation", "inner_width"): [-8, 10**9, "wide"],
    ("transformation", "inner_depth"): [-1, "deep"],
    ("transformation", "inner_rank"): [-1, "low"],
    ("transformation", "epochs"): [-1, "x"],
    ("transformation", "side_info"): ["maybe", 2],
    ("transformation", "source"): ["deploy", "new", 1],
    ("transformation", "seed"): [-2, "s", 2**64],
    ("eval_report", "table_version"): [-1, "latest", 1.5],
    ("eval_report", "query_sample"): [0, "all", 0.5],
    ("dataset", "dataset"): ["mnist", "imagefolder", "digits:/x", 3],
    ("dataset", "old_classes"): ["0..4", "a,b", "1,,2", "-1"],
}


def _bounds(cls: type[dg.Config], field: str) -> dict[str, float]:
    return {
        kind: getattr(m, kind)
        for m in cls.model_fields[field].metadata
        for kind in ("ge", "gt", "le", "lt")
        if isinstance(m, (at.Ge, at.Gt, at.Le, at.Lt)) and hasattr(m, kind)
    }


def _base_type(cls: type[dg.Config], field: str):
    """The field's type without `| None`."""
    annotation = cls.model_fields[field].annotation
    if typing.get_origin(annotation) not in (typing.Union, types.UnionType):
        return annotation
    return next(t for t in typing.get_args(annotation) if t is not type(None))


def _enumerated(cls: type[dg.Config], field: str) -> list[str] | None:
    kind = _base_type(cls, field)
    if isinstance(kind, type) and issubclass(kind, enum.Enum):
        return [member.name for member in kind]
    if typing.get_origin(kind) is typing.Literal:
        return list(typing.get_args(kind))
    return None


def _numeric_fields() -> list[tuple[str, str, type]]:
    return [
        (step, field, _base_type(cls, field))
        for step, cls in cfg.LAUNCHPAD.items()
        for field in cls.model_fields
        if _base_type(cls, field) in (int, float)
    ]


def _edges(kind: type, bounds: dict) -> list[tuple[object, bool]]:
    """(value, is it inside) just inside and just outside each bound."""
    if kind is int:
        step = {"ge": (0, -1), "gt": (1, 0), "le": (0, 1), "lt": (-1, 0)}
        return [
            (bounds[k] + d, inside)
            for k, (d_in, d_out) in step.items()
            if k in bounds
            for d, inside in ((d_in, True), (d_out, False))
        ]

    def nudge(x: float, toward: float) -> float:
        return math.nextafter(float(x), toward)

    edges = {
        "ge": lambda b: [(float(b), True), (nudge(b, -INF), False)],
        "gt": lambda b: [(nudge(b, INF), True), (float(b), False)],
        "le": lambda b: [(float(b), True), (nudge(b, INF), False)],
        "lt": lambda b: [(nudge(b, -INF), True), (float(b), False)],
    }
    return [pair for k, make in edges.items() if k in bounds for pair in make(bounds[k])]


def _shown(value: object) -> set[str]:
    """How a refusal may show `value`: as given, or as the float a float field coerced an int
    to (10**25 given to reembed_fraction is the float 1e+25)."""
    if isinstance(value, float) and math.isnan(value):
        return {"NaN"}
    shown = {repr(value)}
    if isinstance(value, int) and not isinstance(value, bool):
        shown.add(repr(float(value)))
    return shown


@pytest.fixture(scope="module")
def jobs() -> dict[str, dg.JobDefinition]:
    defs = build_defs()
    return {name: defs.resolve_job_def(name) for name in set(JOB_OF.values())}


def _launch(jobs, step: str, config: dict) -> tuple[str, str] | None:
    """How a launch with `config` for `step` ends: None (launched), or (who refused it:
    "dagster" | "submission", the one line the user sees)."""
    run_config = {"ops": {step: {"config": config}}}
    try:
        dg.validate_run_config(jobs[JOB_OF[step]], run_config)
    except cfg.LaunchConfigError as err:  # never expected: a config mapping refusing
        return "config mapping", str(err)
    except dg.DagsterInvalidConfigError as err:
        # Dagster's typed errors: one per offending path, each one line naming it.
        return "dagster", " / ".join(e.message for e in err.errors)
    found = cfg.launch_refusals(run_config)
    return ("submission", " / ".join(r.line for r in found)) if found else None


def test_every_numeric_launchpad_field_is_bounded_on_both_sides():
    # A numeric field with no bound is one a fuzz cannot reach the edge of, and one a typo can
    # set to anything.
    unbounded = [
        (step, field)
        for step, field, _ in _numeric_fields()
        if not ({"ge", "gt"} & set(_bounds(cfg.LAUNCHPAD[step], field)))
        or not ({"le", "lt"} & set(_bounds(cfg.LAUNCHPAD[step], field)))
    ]
    assert unbounded == []
    assert len(_numeric_fields()) >= 18


def test_every_bound_is_just_inside_accepted_and_just_outside_refused(jobs, reliability):
    checked = 0
    for step, field, kind in _numeric_fields():
        for value, inside in _edges(kind, _bounds(cfg.LAUNCHPAD[step], field)):
            outcome = _launch(jobs, step, {field: value})
            if inside:
                assert outcome is None, (step, field, value, outcome)
                continue
            assert outcome is not None, (step, field, value)
            who, line = outcome
            assert who in ("dagster", "submission") and "\n" not in line, outcome
            assert (f"{step}.{field}: " in line) if who == "submission" else (field in line)
            if who == "submission":
                assert any(f": {text} refused: expected {field} " in line for text in _shown(value))
            checked += 1
    assert checked >= 2 * 18
    reliability(
        "config fuzz",
        f"every bound of the {len(_numeric_fields())} numeric launchpad fields",
        f"{checked} values just inside accepted and just outside refused at launch, naming the"
        " field and the bound",
    )


def test_every_enumerated_value_is_accepted_and_another_is_refused_by_dagster(jobs):
    enumerated = [
        (step, field, values)
        for step, cls in cfg.LAUNCHPAD.items()
        for field in cls.model_fields
        if (values := _enumerated(cls, field))
    ]
    assert {(s, f) for s, f, _ in enumerated} >= {
        ("new_model", "arch"),
        ("transformation", "source"),
    }
    for step, field, values in enumerated:
        for value in values:
            assert _launch(jobs, step, {field: value}) is None, (step, field, value)
        # Refused by Dagster's own Enum type: the launchpad marks it as it is typed.
        who, line = _launch(jobs, step, {field: "no-such-" + field})
        assert who == "dagster" and f"config:{field} not in enum type" in line, line


def _cases() -> list[tuple[str, str, object]]:
    cases = [(step, field, value) for (step, field), values in BAD.items() for value in values]
    cases += [(step, "no_such_field", 1) for step in cfg.LAUNCHPAD]  # unknown keys
    rng = random.Random(0)
    pool = [
        # Beyond 2**64 either way: no field takes that (ann_min_rows takes up to 2**63 - 1, so
        # a huge value below that is right for it, not a refusal to expect).
        lambda: rng.choice([-1, 1]) * 10 ** rng.randint(20, 30),
        lambda: -rng.randint(1, 10**6),
        lambda: rng.choice([NAN, INF, -INF]),
        lambda: "".join(rng.choice("abc;/.. ") for _ in range(rng.randint(1, 8))),
        lambda: [rng.random()],
    ]
    fields = [(step, field) for step, field, _ in _numeric_fields()]
    for _ in range(int(os.environ.get("FCT_CONFIG_FUZZ", "20"))):
        step, field = rng.choice(fields)
        cases.append((step, field, rng.choice(pool)()))
    return cases


def test_every_launchpad_field_refuses_what_cannot_be_right(jobs, reliability):
    cases = _cases()
    where = {"dagster": 0, "submission": 0}
    for step, field, value in cases:
        outcome = _launch(jobs, step, {field: value})
        assert outcome is not None, (step, field, value)
        who, line = outcome
        assert who in where and "\n" not in line, outcome
        assert field in line, (field, line)
        if who == "submission":
            assert line.startswith(f"{step}.{field}: ")
            assert any(text in line for text in _shown(value)), (value, line)
        where[who] += 1
    assert where["dagster"] >= 40 and where["submission"] >= 30
    figures = {"cases": len(cases), "refused_with_one_line": len(cases), **where}
    reliability(
        "config fuzz",
        f"{figures['cases']} launchpad values (boundary, random, wrong type, format, unknown key)",
        f"{len(cases)} refused at launch with one line naming the field, none after a step"
        f" started: {where['dagster']} by Dagster's config types (the launchpad marks them),"
        f" {where['submission']} by the steps' config classes at submission",
        json.dumps(figures),
    )


def test_the_serving_jobs_take_no_version_in_their_config(jobs):
    # Promote and rollback took `version` as typed config; it is the run's partition now, picked
    # among the registered versions. A config document that still names it (a saved launchpad
    # document, a client's request) is refused by Dagster in one line, even with a good version,
    # rather than launched with the version ignored.
    for step in ("promote_version", "rollback_deployment"):
        for value in ("v2", 5, "../v2", None):
            who, line = _launch(jobs, step, {"version": value})
            assert who == "dagster", (step, value)
            assert line.startswith(
                f'Received unexpected config entry "version" at path root:ops:{step}:config.'
            ), line
        assert _launch(jobs, step, {}) is None
    assert _launch(jobs, "rollback_deployment", {"force": True}) is None
    assert "promote_version" not in cfg.LAUNCHPAD


def test_an_out_of_range_value_names_field_bound_and_value(jobs):
    for step, field, value, bound in (
        ("backfilled_gallery", "reembed_fraction", 1.5, "<= 1.0"),
        ("backfilled_gallery", "shards", 0, ">= 1"),
        ("new_model", "epochs", -1, ">= 1"),
        ("transformation", "inner_width", 0, ">= 1"),
    ):
        assert _launch(jobs, step, {field: value}) == (
            "submission",
            f"{step}.{field}: {value!r} refused: expected {field} {bound}",
        )
