"""The model version: one upgrade, one key (`v2`, `v3`, ...), a Dagster dynamic partition."""

from __future__ import annotations

import re

import dagster as dg

model_version = dg.DynamicPartitionsDefinition(name="model_version")

# A version names files, tables and partitions: letters, digits, '_' and '-', starting with a
# letter, so it can never carry a path separator, '..', spaces or shell characters.
_VERSION = re.compile(r"[A-Za-z][A-Za-z0-9_-]{0,63}")


class VersionError(ValueError):
    """A model-version name that cannot be used (one line naming it)."""


def check_version(version: str) -> str:
    if not isinstance(version, str) or not _VERSION.fullmatch(
        version
    ):  # fullmatch: `$` would accept a trailing newline
        raise VersionError(
            f"model version {version!r}: expected a letter then up to 63 letters, digits, '_' or"
            " '-' (e.g. v2)"
        )
    return version


def add_model_version(instance: dg.DagsterInstance, version: str) -> None:
    """Register a model version; with automation running, its four assets materialise by themselves."""
    check_version(version)
    instance.add_dynamic_partitions(model_version.name, [version])


def require_registered(instance: dg.DagsterInstance, version: str) -> str:
    """`version`, if it is a registered model version; else one line saying how to register it.

    Dagster launches a run for any partition key typed into the launchpad or sent by a client;
    the upgrade's steps call this before they train or write anything."""
    check_version(version)
    if not instance.has_dynamic_partition(model_version.name, version):
        raise VersionError(
            f"model version {version!r} is not registered (partition of {model_version.name});"
            f" nothing was trained or written. Register it first: `fct add-version {version}`"
        )
    return version


# One partition per batch of arriving items, added by the inbox sensor (or `fct ingest`) when
# the batch is launched: a batch is a set of files, not a time window (a quiet hour has no
# batch, a busy minute may have several), and its key names it in runs, records and rows.
ingest_batch = dg.DynamicPartitionsDefinition(name="ingest_batch")
