"""Shared pieces of the Dagster layer: typed records, launchpad config, resources, LanceDB
storage, IO managers, event-log reads, writer guards, partitions, provenance, cost, asset keys
and the asset factory. Imports nothing from the domain packages."""
