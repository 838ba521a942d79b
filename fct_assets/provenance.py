"""Provenance helpers: the code version, per-epoch progress logs and training-history metadata."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path
from typing import Any

import dagster as dg


@lru_cache(maxsize=1)
def code_version() -> str:
    """Package version plus the git commit of the checkout (and '+dirty' for local changes).

    FCT_CODE_VERSION, when set, wins: an image has no .git (deploy/Dockerfile bakes the commit in
    at build time), and without it every build would stamp the same bare package version."""
    from fct_ml import __version__

    if os.environ.get("FCT_CODE_VERSION"):
        return os.environ["FCT_CODE_VERSION"]

    root = Path(__file__).resolve().parent.parent
    try:
        # A fixed argv, no shell and no user input.
        sha = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short=12", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
        return f"{__version__}+g{sha}{'.dirty' if dirty else ''}"
    except (OSError, subprocess.SubprocessError):
        return __version__


def epoch_logger(
    context: dg.AssetExecutionContext, stage: str, epochs: int, items: int
) -> Callable:
    """An `on_epoch` callback that logs epoch, losses, duration and ETA to the run's log."""
    started = time.perf_counter()

    def log(record) -> None:
        elapsed = time.perf_counter() - started
        eta = elapsed / record.epoch * (epochs - record.epoch)
        parts = ", ".join(f"{k} {v:.4f}" for k, v in record.parts.items())
        context.log.info(
            f"{stage}: epoch {record.epoch}/{epochs} ({items} items) {parts}; {record.seconds:.1f}"
            f" s, ETA {eta:.0f} s"
        )

    return log


def history_metadata(history) -> dict[str, Any]:
    """Final losses as numbers (the UI plots them across materialisations) and the per-epoch table."""
    if not history:
        return {}
    last = history[-1]
    meta: dict[str, Any] = {f"final_{k}": float(v) for k, v in last.parts.items()}
    meta["train_seconds"] = float(sum(r.seconds for r in history))
    meta["epochs"] = len(history)
    meta["final_epoch_seconds"] = float(last.seconds)
    # The per-epoch table, as a typed table the UI renders (losses and durations by epoch).
    parts = list(last.parts)
    columns = [
        dg.TableColumn("epoch", "int"),
        dg.TableColumn("seconds", "float"),
        dg.TableColumn("lr", "float"),
    ]
    columns += [
        dg.TableColumn(k, "float", description="mean over the epoch's batches") for k in parts
    ]
    rows = [
        dg.TableRecord(
            {
                "epoch": r.epoch,
                "seconds": round(r.seconds, 2),
                "lr": float(r.lr),
                **{k: round(float(r.parts[k]), 5) for k in parts},
            }
        )
        for r in history
    ]
    meta["history"] = dg.MetadataValue.table(rows, schema=dg.TableSchema(columns=columns))
    return meta
