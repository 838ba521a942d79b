"""One upgrade (a model version): new model, transformation, backfilled gallery and eval
report; the backfill's plan, shards and publish; checks, estimate, automation and freshness."""
