"""Run the reliability tests and write what they tried and what happened.

    python benchmarks/reliability.py

Runs `pytest tests/reliability` with FCT_RELIABILITY_RECORDS set; each test records its bad
input or injected fault and the outcome it observed. Writes benchmarks/results/reliability.md
and reliability.json from those records, and prints the table.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        records_path = Path(tmp) / "records.json"
        env = {**os.environ, "FCT_RELIABILITY_RECORDS": str(records_path)}
        done = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/reliability"],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
        )
        summary = (done.stdout.strip().splitlines() or ["(no output)"])[-1]
        if not records_path.exists():
            print(done.stdout[-3000:], done.stderr[-3000:], file=sys.stderr)
            return 1
        records = json.loads(records_path.read_text())
    # Temporary folders differ on every run: show them as <tmp>.
    tmp_path = re.compile(r"/tmp/pytest-of-[^/]+/pytest-\d+/[^/ ]+")
    for r in records:
        r["outcome"] = tmp_path.sub("<tmp>", r["outcome"])
        r["case"] = tmp_path.sub("<tmp>", r["case"])
    counts = Counter(r["category"] for r in records)
    lines = [
        "# Reliability: bad inputs tried, faults injected, outcomes",
        "",
        (
            "Produced by `python benchmarks/reliability.py` from the records of"
            f" `tests/reliability` (pytest: {summary}). Each row is one check a test made; the"
            " outcome is what the test observed."
        ),
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
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "reliability.md").write_text("\n".join(lines) + "\n")
    (RESULTS / "reliability.json").write_text(
        json.dumps({"pytest": summary, "records": records}, indent=2) + "\n"
    )
    print("\n".join(lines))
    return 0 if done.returncode == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
