"""Lineage: which checkpoints, tables, runs and code made an embedding version or an item."""
