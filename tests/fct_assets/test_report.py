"""The eval report's markdown: rows in the paper's order, whatever order its JSON came back in."""

import pytest

from fct_assets.lib.records import EvalReport
from fct_assets.upgrade.report import markdown_table

CASES = ["old/old", "new/new", "new/h(old)", "new/gallery_v2", "new/old"]
ORDERS = ["random", "sigma", "true_error"]


# Keys sorted alphabetically, as Dagster's JSON metadata returns them, or in reverse: the served
# table's case ranks between new/h(old) and new/old, and the orders follow fct_ml.backfill.ORDERS,
# whatever the insertion order (the reverse puts new/old before the served case, true_error first).
@pytest.mark.parametrize("reverse", [False, True], ids=["sorted", "reversed"])
def test_rows_keep_the_papers_order_after_a_key_sorting_round_trip(reverse):
    metrics = {"top1": 50.0, "top5": 60.0, "mAP": 40.0}
    report = EvalReport(
        version="v2",
        table="gallery_v2",
        table_version=3,
        items=10,
        cases={c: metrics for c in sorted(CASES, reverse=reverse)},
        cases_unseen_classes={},
        cases_seen_classes={},
        gap_closed={"top1": 1.0, "mAP": 2.0},
        backfill_curves={},
        backfill_auc={o: {"top1": 1.0, "mAP": 2.0} for o in sorted(ORDERS, reverse=reverse)},
        reembedded=0,
        reembed_seconds=1.0,
        reembed_items_per_s=10.0,
        backfill_items_per_s=None,
        space_id="new_model:v2@cccccccccccc",
    )
    rows = [
        line.split("|")[1].strip()
        for line in markdown_table(report, include_plot=False).splitlines()
        if line.startswith("| ") and not line.startswith("| ---")
    ]
    assert rows == [
        "case (query/gallery)",
        "old/old",
        "new/new",
        "new/h(old)",
        "new/gallery_v2",
        "new/old",
        "backfill order",
        "random",
        "sigma",
        "true_error",
    ]
