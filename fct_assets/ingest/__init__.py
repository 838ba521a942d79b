"""Items that arrive between upgrades: the inbox, its sensor, and the ingest asset and job."""
