"""Test-only helpers: a real environment (env), events recorded without the real thing happening
(check_events), daemon ticks in a fresh process (automation_tick, ingest_tick), and the Dagster
private API that only tests use (dagster_internals)."""
