"""One `fct reproduce` tiny run on digits (seed 0), shared by the CLI and reproduction tests."""

from __future__ import annotations

import contextlib
import io
import json
from typing import Any

import pytest

from fct_ml import reproduce
from fct_ml.cli import main


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """{code, stdout, stderr, result, out, test_split} of `fct reproduce --preset tiny`.

    `test_split`: what reproduce.evaluate_split received for the test split (the real function,
    wrapped to record its inputs and given to the CLI as `evaluate`): {"new", "old", "bct",
    "bct (paper)", "labels", "h": {variant: (gallery, sigma)}} as numpy arrays (sigma None for
    variants without one)."""
    calls: list[tuple] = []
    real = reproduce.evaluate_split

    def evaluate_split(new, others, transformed, labels, *args, **kwargs):
        calls.append((new, others, transformed, labels))
        return real(new, others, transformed, labels, *args, **kwargs)

    out_path = tmp_path_factory.mktemp("run") / "sub" / "result.json"
    argv = ["reproduce", "--dataset", "digits", "--preset", "tiny", "--seed", "0"]
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = main([*argv, "--out", str(out_path), "--quiet"], evaluate=evaluate_split)
    test_split = None
    if calls:
        new, others, transformed, labels = calls[0]  # the test split is evaluated first

        def array(t):
            return None if t is None else t.numpy()

        test_split = {
            "new": new.numpy(),
            "old": others["old"].numpy(),
            "bct": others["bct"].numpy(),
            "bct (paper)": others["bct (paper)"].numpy(),
            "labels": labels.numpy(),
            "h": {k: (array(g), array(s)) for k, (g, s) in transformed.items()},
        }
    return {
        "code": code,
        "stdout": stdout.getvalue(),
        "stderr": stderr.getvalue(),
        "result": json.loads(out_path.read_text()) if out_path.exists() else None,
        "out": out_path,
        "calls": len(calls),
        "test_split": test_split,
    }
