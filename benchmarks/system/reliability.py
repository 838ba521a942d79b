"""Run the reliability tests and write what they tried and what happened.

    python benchmarks/system/reliability.py

Runs `pytest tests/reliability` with FCT_RELIABILITY_RECORDS set; each test records its bad
input or injected fault and the outcome it observed. Writes benchmarks/results/reliability.md
and reliability.json from those records, and prints the table. The promotion race runs at full
size here (100 promotions from 4 processes; `make test` runs 12 from 3), and the concurrency
harness with 4 reader processes for at least 60 s and 4 ingest batches (FCT_CONCURRENCY=R,S,B;
`make test`: 2,10,2), and the churn harness with 4 inbox writers x 1,000 files over 180 s and a
promotion or rollback every 10 s (FCT_CHURN=W,F,S,T; `make test`: 2,40,30,4). The JSON gets
their figures as "promotion_race", "concurrency", "churn", "hostile_files", "faults" and
"config_fuzz".
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
RESULTS = REPO / "benchmarks" / "results"
sys.path.insert(0, str(REPO))  # benchmarks.common, run as a script
from benchmarks.common import write_results  # noqa: E402

LOG = REPO / "runs" / "reliability" / "pytest.log"  # git-ignored, as runs/ is


def main(argv: list[str] | None = None) -> int:
    """`--only FILE...`: run those test files alone and keep the other files' records (and the
    figures they gave) from the committed reliability.json, saying so in the report."""
    argv = sys.argv[1:] if argv is None else argv
    only = argv[1:] if argv[:1] == ["--only"] else []
    if argv and not only:
        print(
            "usage: python benchmarks/system/reliability.py [--only TEST_FILE...]", file=sys.stderr
        )
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        records_path = Path(tmp) / "records.json"
        env = {
            **os.environ,
            "FCT_RELIABILITY_RECORDS": str(records_path),
            "FCT_PROMOTION_RACE": "100,4",
            "FCT_PROMOTION_RACE_COMMIT_ONLY": "12,3",
            "FCT_CONFIG_FUZZ": "200",
            # readers, seconds at least, ingest batches (FCT_CONCURRENCY overrides)
            "FCT_CONCURRENCY": os.environ.get("FCT_CONCURRENCY", "4,60,4"),
            # writers, files per writer, seconds, seconds between switches (FCT_CHURN overrides)
            "FCT_CHURN": os.environ.get("FCT_CHURN", "4,1000,180,10"),
        }
        started = time.monotonic()
        done = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
            + (only or ["tests/reliability"]),
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
        )
        summary = (done.stdout.strip().splitlines() or ["(no output)"])[-1]
        wall = time.monotonic() - started
        # The whole pytest output, for a failure's traceback (the report keeps the summary).
        LOG.parent.mkdir(parents=True, exist_ok=True)
        LOG.write_text(done.stdout + done.stderr)
        if done.returncode != 0:
            print(f"pytest failed ({summary}); its whole output: {LOG}", file=sys.stderr)
        if not records_path.exists():
            print(done.stdout[-3000:], done.stderr[-3000:], file=sys.stderr)
            return 1
        records = json.loads(records_path.read_text())
    # Temporary folders differ on every run: show them as <tmp>.
    tmp_path = re.compile(r"/tmp/pytest-of-[^/]+/pytest-\d+/[^/ ]+")
    for r in records:
        r["outcome"] = tmp_path.sub("<tmp>", r["outcome"])
        r["case"] = tmp_path.sub("<tmp>", r["case"])
    kept_note = ""
    if only:
        earlier = json.loads((RESULTS / "reliability.json").read_text())
        ran = {Path(f).as_posix() for f in only}
        kept = [r for r in earlier["records"] if r["test"].split("::")[0] not in ran]
        records = kept + records
        kept_note = (
            f" Only {', '.join(sorted(ran))} ran this time; the records of the other test files"
            f" are kept from the earlier run (pytest: {earlier['pytest']})."
        )
        summary = f"{summary} ({', '.join(sorted(ran))})"
    counts = Counter(r["category"] for r in records)
    figures = _figures(records)
    lines = [
        "# Reliability: bad inputs tried, faults injected, outcomes",
        "",
        (
            "Produced by `python benchmarks/system/reliability.py` from the records of"
            f" `tests/reliability` (pytest: {summary}; wall time {wall / 60:.1f} min). Each row is"
            " one check a test made; the outcome is what the test observed." + kept_note
        ),
        "",
        *(f"- **{key}**: {json.dumps(value)}" for key, value in figures.items()),
        "",
        ", ".join(f"{n} {c}" for c, n in sorted(counts.items())),
        "",
        "| category | case | outcome | test |",
        "| --- | --- | --- | --- |",
    ]
    for r in records:
        outcome = r["outcome"].replace("|", "\\|").replace("\n", " ")
        lines.append(
            f"| {r['category']} | {r['case'].replace('|', '/')} | {outcome} |"
            f" `{r['test'].split('::')[-1]}` |"
        )
    write_results(
        "reliability",
        {"pytest": summary, "wall_seconds": round(wall), **figures, "records": records},
        "\n".join(lines),
        RESULTS,
    )
    print("\n".join(lines))
    if done.returncode != 0:  # which tests failed, and why, in pytest's own short summary
        print(done.stdout[-6000:], file=sys.stderr)
    return 0 if done.returncode == 0 else 1


def _figures(records: list[dict]) -> dict:
    """The scenario figures tests record as JSON in `detail`: the promotion race (with the file
    lock as "promotion_race", without it as its "without_file_lock"), the concurrency and churn
    harnesses, hostile files, faults and the config fuzz."""
    out: dict = {}
    for r in records:
        if r["category"] == "promotion race" and r["detail"]:
            race = json.loads(r["detail"])
            if race.pop("mechanism") == "conditional commit":
                out.setdefault("promotion_race", {})["without_file_lock"] = race
            else:
                out.setdefault("promotion_race", {}).update(race)
        elif r["category"] == "concurrency" and r["detail"]:
            out["concurrency"] = json.loads(r["detail"])
        elif r["category"] == "churn" and r["detail"]:
            out["churn"] = json.loads(r["detail"])
        elif r["category"] == "hostile file" and r["detail"]:
            out["hostile_files"] = json.loads(r["detail"])
        elif r["category"] == "fault" and r["detail"]:
            out.setdefault("faults", []).append(json.loads(r["detail"]))
        elif r["category"] == "config fuzz" and r["detail"]:
            fuzz = json.loads(r["detail"])
            seen = out.setdefault("config_fuzz", {"cases": 0, "refused_with_one_line": 0})
            seen["cases"] += fuzz["cases"]
            seen["refused_with_one_line"] += fuzz["refused_with_one_line"]
    return out


if __name__ == "__main__":
    sys.exit(main())
