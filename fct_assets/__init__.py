"""fct_assets: the Dagster layer over fct_ml.

Thin assets that load inputs, call one fct_ml function and return the value with metadata;
resources, IO managers, checks, partitions and automation. `definitions.py` holds `defs`.
"""
