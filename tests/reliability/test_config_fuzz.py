"""Launchpad config fuzz: boundary and random values for every field of the `upgrade` and
`promote` jobs' config, resolved by `dagster.validate_run_config`, which builds the run config
the way a launch from the UI or the GraphQL client does (types, unknown keys, config mappings)
and creates no run. FCT_CONFIG_FUZZ=N adds N random cases to the boundary ones (default 20).

Each case must be refused with one line naming the field: at launch (a type, an unknown key, a
backfill value out of range: nothing is created) or, for the training fields whose range only
the asset's own config class knows, by that class when the step starts, before it trains."""

from __future__ import annotations

import json
import math
import os
import random

import dagster as dg
import pytest

from fct_assets.definitions import build_defs
from fct_assets.lib import config as cfg

# field -> (the op that owns it, its config class, values that cannot be right)
NAN, INF = float("nan"), float("inf")
BAD = {
    ("backfilled_gallery", "reembed_fraction"): [-0.1, 1.5, NAN, INF, -INF, 1e308, "half", [0.1]],
    ("backfilled_gallery", "rows_per_batch"): [0, -1, -(2**40), "many", 1.5, None],
    ("backfilled_gallery", "shards"): [0, -1, 257, 10**12, "4", 2.5, True and "x"],
    ("backfilled_gallery", "ann_min_rows"): [0, 255, -5, "x", 1e9],
    ("new_model", "embed_dim"): [0, -1, 10**9, "128", 1.5],
    ("new_model", "epochs"): [0, -3, 10**9, "ten", NAN],
    ("new_model", "seed"): [-1, "zero", 0.5, 10**12 + 1],
    ("new_model", "arch"): [5, ["cnn-s"]],
    ("transformation", "inner_width"): [0, -8, 10**9, "wide"],
    ("transformation", "inner_depth"): [0, -1, 65, "deep"],
    ("transformation", "inner_rank"): [-1, 65537, "low"],
    ("transformation", "epochs"): [0, -1, "x"],
    ("transformation", "side_info"): ["maybe", 2],
    ("transformation", "seed"): [-2, "s", 2**64],
    ("eval_report", "table_version"): [0, -1, "latest", 1.5],
}
CLASSES = {
    "backfilled_gallery": cfg.BackfillConfig,
    "new_model": cfg.ModelTrainingConfig,
    "transformation": cfg.TransformationTrainingConfig,
    "eval_report": cfg.EvalReportConfig,
}


def _cases() -> list[tuple[str, str, object]]:
    cases = [(op, field, value) for (op, field), values in BAD.items() for value in values]
    cases += [(op, "no_such_field", 1) for op in CLASSES]  # unknown keys
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
    fields = [k for k in BAD if k[1] not in ("arch", "side_info")]
    for _ in range(int(os.environ.get("FCT_CONFIG_FUZZ", "20"))):
        op, field = rng.choice(fields)
        cases.append((op, field, rng.choice(pool)()))
    return cases


def _shown(value: object) -> set[str]:
    """How a refusal may show `value`: as given, or as the float a float field coerced an int
    to (10**25 given to reembed_fraction is the float 1e+25)."""
    if isinstance(value, float) and math.isnan(value):
        return {"NaN"}
    shown = {repr(value)}
    if isinstance(value, int) and not isinstance(value, bool):
        shown.add(repr(float(value)))
    return shown


def _refusal(job: dg.JobDefinition, op: str, field: str, value: object) -> tuple[str, str]:
    """(where it was refused: "launch" | "step start", the one line the user sees)."""
    run_config = {"ops": {op: {"config": {field: value}}}}
    try:
        dg.validate_run_config(job, run_config)
    except cfg.LaunchConfigError as err:
        return "launch", str(err)
    except dg.DagsterInvalidConfigError as err:
        # Dagster's typed errors: one per offending path, each one line naming it.
        lines = [e.message for e in err.errors]
        return "launch", lines[0] if len(lines) == 1 else " / ".join(lines)
    # Types fit; the range is the asset's config class's to refuse, as its step starts.
    with pytest.raises(cfg.LaunchConfigError) as err:
        cfg.validated(CLASSES[op], {field: value}, op)
    return "step start", str(err.value)


def test_every_launchpad_field_refuses_what_cannot_be_right(reliability):
    job = build_defs().resolve_job_def("upgrade")
    cases = _cases()
    where = {"launch": 0, "step start": 0}
    one_line = 0
    for op, field, value in cases:
        stage, line = _refusal(job, op, field, value)
        where[stage] += 1
        assert "\n" not in line, line
        assert field in line, (field, line)
        if stage == "step start" or "out of range" in line or "refused" in line:
            assert any(text in line for text in _shown(value)), (value, line)
        one_line += 1
    assert where["launch"] >= 50
    promote = build_defs().resolve_job_def("promote")
    for value in (5, None, ["v2"]):
        with pytest.raises(dg.DagsterInvalidConfigError) as err:
            dg.validate_run_config(
                promote, {"ops": {"promote_version": {"config": {"version": value}}}}
            )
        assert "version" in err.value.errors[0].message
        where["launch"] += 1
        one_line += 1
    figures = {"cases": len(cases) + 3, "refused_with_one_line": one_line, **where}
    reliability(
        "config fuzz",
        f"{figures['cases']} launchpad values (boundary, random, wrong type, unknown key)",
        f"{one_line} refused with one line naming the field: {where['launch']} at launch (no run"
        f" created), {where['step start']} by the asset's config class when its step starts",
        json.dumps(figures),
    )


def test_an_out_of_range_backfill_value_names_field_bound_and_value():
    job = build_defs().resolve_job_def("upgrade")
    for field, value, bound in (("reembed_fraction", 1.5, "<= 1.0"), ("shards", 0, ">= 1")):
        with pytest.raises(cfg.LaunchConfigError) as err:
            dg.validate_run_config(job, {"ops": {"backfilled_gallery": {"config": {field: value}}}})
        assert str(err.value) == (
            f"backfilled_gallery.{field}: {value!r} refused: expected {field} {bound}"
        )
