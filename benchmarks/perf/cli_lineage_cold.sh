#!/bin/bash
# Cold `fct lineage v2` against an empty instance, code of b41e128 (PYTHONPATH=/tmp/oldcode) vs
# this checkout, alternating; prints wall, user and system seconds of each run.
# Results: benchmarks/results/cli_lineage_cold.json. Needs /tmp/oldcode (git archive b41e128).
PY="$(dirname "$(readlink -f "$0")")/../../.venv/bin/python"
mkdir -p /tmp/emptyhome && printf "telemetry:\n  enabled: false\n" > /tmp/emptyhome/dagster.yaml
cd /tmp
export DAGSTER_HOME=/tmp/emptyhome FCT_LANCEDB_URI=/tmp/emptyhome/lancedb FCT_STORAGE_URI=/tmp/emptyhome PYTHONWARNINGS=ignore
for i in 1 2 3 4 5; do
  for code in old new; do
    if [ $code = old ]; then PP=/tmp/oldcode; else PP=; fi
    PYTHONPATH=$PP /usr/bin/time -f "$code %e wall %U user %S sys" "$PY" -m fct_assets.cli lineage v2 >/dev/null 2>/tmp/cold_err.txt; tail -1 /tmp/cold_err.txt
  done
done
