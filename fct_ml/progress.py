"""Stage progress and an overall ETA for `fct reproduce`.

`run_experiment` reports through its `log` callback: `[stage] ...` when a stage starts,
`[stage] epoch E/N ...` after each epoch and `[stage] done in S s` at the end. `StageProgress`
is such a callback: it passes each line on with the run's position and an ETA appended. The ETA
comes from the stage list (`reproduce_stages`, epochs from the config) and the time each kind of
stage has taken so far, so it needs no prior run. tests/fct_ml/test_progress.py checks that the
list matches the stages `run_experiment` logs.
"""

from __future__ import annotations

import re
import sys
import time
from collections.abc import Callable, Sequence

LINE = re.compile(
    r"^\[(?P<stage>[^\]]+)\] (?:(?P<start>\.\.\.)$|epoch (?P<epoch>\d+)/\d+|(?P<done>done in))"
)
# fct_ml.reproduce's H_VARIANTS, then its CLOSED_FORM maps (named here: no torch import).
H_VARIANTS = (
    "h",
    "h no side-info",
    "fastfill",
    "fastfill no side-info",
    "linear",
    "linear no side-info",
    "procrustes no side-info",
)
CLOSED_FORM = ("linear", "linear no side-info", "procrustes no side-info")  # one solve, no epochs


def reproduce_stages(config) -> list[tuple[str, int]]:
    """The stages of `fct_ml.reproduce.run_experiment`, in order, with their epochs (0: one pass).

    `config` is an ExperimentConfig."""
    epochs = config.transformation_train.epochs
    return [
        ("old_model", config.old_train.epochs),
        ("side_info_model", config.side_info_train.epochs),
        ("new_model", config.new_train.epochs),
        ("bct_model", config.new_train.epochs),
        ("bct_paper_model", config.new_train.epochs),
        ("features", 0),
        *(
            (f"transformation ({name})", 0 if name in CLOSED_FORM else epochs)
            for name in H_VARIANTS
        ),
        # The paper's cases and the backfilling curves, on the test split, then on validation.
        ("evaluation (test)", 0),
        ("evaluation (validation)", 0),
    ]


def _kind(stage: str) -> str:
    # The learned transformations cost alike, as do the two evaluations; a closed-form map is
    # one solve (seconds), a kind of its own.
    kind, _, name = stage.partition(" (")
    return "closed_form" if name.rstrip(")") in CLOSED_FORM else kind


def format_seconds(seconds: float) -> str:
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    minutes, seconds = divmod(seconds, 60)
    return (
        f"{minutes} min {seconds:02d} s"
        if minutes < 60
        else f"{minutes // 60} h {minutes % 60:02d} min"
    )


class StageProgress:
    """A `log` callback that appends `(stage i/n, p% done, ETA t)` to each stage line.

    Work is counted in units: one per epoch, one for a stage without epochs. A unit's cost is
    the mean measured on its stage kind so far, else the mean over every unit so far; until one
    unit has finished, the ETA is unknown (`ETA ?`)."""

    def __init__(
        self,
        stages: Sequence[tuple[str, int]],
        write: Callable[[str], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.units = {stage: max(1, epochs) for stage, epochs in stages}
        self.order = [stage for stage, _ in stages]
        self.write = write or (lambda s: print(s, file=sys.stderr, flush=True))
        self.clock = clock
        self.done: dict[str, int] = {}  # finished units per stage
        self.spent: dict[str, float] = {}  # seconds per stage, finished units only
        self.started = self.stage_started = clock()

    def __call__(self, message: str) -> None:
        match = LINE.match(message)
        if match is None:
            self.write(message)
            return
        stage, now = match["stage"], self.clock()
        if stage not in self.units:  # a stage the list does not know: counted, never fatal
            self.units[stage] = 1
            self.order.append(stage)
        if match["start"]:
            self.stage_started = now
            self.done[stage], self.spent[stage] = 0, 0.0
        elif match["epoch"]:
            self.done[stage] = int(match["epoch"])
            self.spent[stage] = now - self.stage_started
        elif match["done"]:
            self.done[stage] = self.units[stage]
            self.spent[stage] = now - self.stage_started
        self.write(f"{message}  ({self.status(stage)})")

    def eta(self) -> float | None:
        """Seconds left, or None before any unit has finished."""
        units_done = sum(self.done.values())
        if units_done == 0:
            return None
        overall = sum(self.spent.values()) / units_done
        by_kind: dict[str, list[float]] = {}
        for stage, n in self.done.items():
            if n:
                kind = by_kind.setdefault(_kind(stage), [0.0, 0])
                kind[0] += self.spent[stage]
                kind[1] += n
        left = 0.0
        for stage in self.order:
            remaining = self.units[stage] - self.done.get(stage, 0)
            if remaining > 0:
                spent, n = by_kind.get(_kind(stage), (0.0, 0))
                left += remaining * (spent / n if n else overall)
        return left

    def status(self, stage: str) -> str:
        total = sum(self.units.values())
        fraction = sum(self.done.values()) / total
        eta = self.eta()
        return (
            f"stage {self.order.index(stage) + 1}/{len(self.order)}, {fraction:.0%} done,"
            f" ETA {'?' if eta is None else format_seconds(eta)}"
        )
