"""fct_assets.lib.console: the quiet mode's redirection, the accepted warnings, the job runner."""

from __future__ import annotations

import io
import subprocess
import sys
import textwrap
import warnings

import dagster as dg
import pytest

from fct_assets.lib.console import (
    ACCEPTED_WARNINGS,
    Terminal,
    failure_line,
    format_stage,
    ignore_accepted_warnings,
    run_job,
    verbose,
)


def test_quiet_shows_the_story_and_logs_everything_in_order(tmp_path):
    # In a process of its own: the redirection is of file descriptors 1 and 2.
    script = textwrap.dedent(
        """
        import os, sys, warnings
        from pathlib import Path
        from fct_assets.lib.console import quiet

        print("before")
        with quiet(Path(sys.argv[1])) as term:
            print("story 1")
            sys.stderr.write("dagster DEBUG line\\n")
            os.write(2, b"[native] WARN lance\\n")
            os.write(1, b"[native] stdout\\n")
            warnings.warn("a library's warning")
            print("story 2")
            term.fail("it failed", tail=2)
        print("after")
        sys.stderr.write("stderr after\\n")
        """
    )
    log = tmp_path / "x" / "run.log"
    proc = subprocess.run(
        [sys.executable, "-c", script, str(log)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "before\nstory 1\nstory 2\nafter\n"
    # The failure shows the log's last lines and where the log is.
    shown = proc.stderr.splitlines()
    assert shown[-3:] == ["  | story 2", f"it failed (full log: {log.resolve()})", "stderr after"]
    assert sum(line.startswith("  | ") for line in shown) == 2
    lines = log.read_text().splitlines()
    assert lines[0] == "story 1"
    assert lines[1:4] == ["dagster DEBUG line", "[native] WARN lance", "[native] stdout"]
    assert any("UserWarning: a library's warning" in line for line in lines)
    assert lines[-1] == "story 2"


def test_accepted_warnings_are_hidden_and_others_are_not(monkeypatch):
    monkeypatch.setattr(sys, "warnoptions", [])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ignore_accepted_warnings()
        for category, message in ACCEPTED_WARNINGS:
            warnings.warn(
                message.replace("\\", "") + " and more", getattr(dg, category), stacklevel=1
            )
        warnings.warn("Parameter `x` is currently in beta", dg.BetaWarning, stacklevel=1)
    assert [str(w.message) for w in caught] == ["Parameter `x` is currently in beta"]


def test_warning_options_of_the_user_win(monkeypatch):
    monkeypatch.setattr(sys, "warnoptions", ["default"])
    category, message = ACCEPTED_WARNINGS[0]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ignore_accepted_warnings()
        warnings.warn(message.replace("\\", ""), getattr(dg, category), stacklevel=1)
    assert len(caught) == 1


@pytest.mark.parametrize(
    ("flag", "env", "expected"),
    [
        (False, None, False),
        (True, None, True),
        (False, "1", True),
        (False, "0", False),
        (False, "false", False),
        (False, "", False),
        (False, "yes", True),
    ],
)
def test_verbose_is_the_flag_or_the_environment(monkeypatch, flag, env, expected):
    if env is None:
        monkeypatch.delenv("FCT_VERBOSE", raising=False)
    else:
        monkeypatch.setenv("FCT_VERBOSE", env)
    assert verbose(flag) is expected


def test_a_stage_line_has_the_label_and_its_time():
    assert format_stage("base assets", 42.4) == "base assets " + "." * 51 + " 42 s"
    assert format_stage("x" * 60, 75).endswith("x .. 1 min 15 s")


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_run_job_runs_the_job_and_shows_each_step_on_a_quiet_terminal(tmp_path):
    @dg.op
    def one() -> int:
        return 1

    @dg.op
    def plus(x: int) -> int:
        return x + 1

    @dg.job
    def chain():
        plus(one())

    err, plain, loud = _Tty(), io.StringIO(), _Tty()
    with dg.instance_for_test(temp_dir=str(tmp_path)) as instance:
        quiet = Terminal(io.StringIO(), err, tmp_path / "run.log")
        result, seconds = run_job(quiet, instance, chain, "chain")
        assert result.success and result.output_for_node("plus") == 2
        assert instance.get_run_by_id(result.run_id) is not None
        # Not a terminal, or verbose (the run log shows the steps): no bar at all.
        for term in (Terminal(io.StringIO(), plain, tmp_path / "run.log"), Terminal(plain, loud)):
            assert run_job(term, instance, chain, "chain")[0].success
    assert seconds > 0
    shown = err.getvalue()
    assert "chain:" in shown and "one" in shown and "plus" in shown
    assert plain.getvalue() == loud.getvalue() == ""


def test_failure_line_names_the_failed_steps_own_reason():
    @dg.op
    def refused():
        raise dg.Failure(description="gallery_v3: 155 items missing\nsecond line")

    @dg.op
    def broke():
        raise ValueError("gallery_v3: run abc is writing it\ntraceback detail")

    @dg.job
    def refusing():
        refused()

    @dg.job
    def breaking():
        broke()

    one = refusing.execute_in_process(raise_on_error=False)
    two = breaking.execute_in_process(raise_on_error=False)
    assert failure_line(one) == "gallery_v3: 155 items missing"
    assert failure_line(two) == "broke: ValueError: gallery_v3: run abc is writing it"
