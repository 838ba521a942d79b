"""tests/stack: the production storage (Postgres, S3) on one machine."""
