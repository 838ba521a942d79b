"""lib/keys.py names the graph once; these names must be the ones the definitions load."""

import dagster as dg

from fct_assets.definitions import asset_graph
from fct_assets.lib import keys


def test_the_asset_names_are_the_graphs_in_order_and_group():
    assets, _ = asset_graph()
    specs = [spec for a in assets for spec in a.specs]
    assert [s.key.to_user_string() for s in specs] == [*keys.BASE_ASSETS, *keys.UPGRADE_ASSETS]
    assert {s.key.to_user_string() for s in specs if s.group_name == "base"} == set(
        keys.BASE_ASSETS
    )
    assert {s.key for s in specs if s.group_name == "upgrade"} == keys.UPGRADE_KEYS


def test_the_promotion_checks_are_blocking_checks_of_the_guarded_assets():
    _, checks = asset_graph()
    blocking = {spec.key for c in checks for spec in c.check_specs if spec.blocking}
    assert set(keys.PROMOTION_CHECKS) <= blocking
    assert dg.AssetCheckKey(dg.AssetKey(keys.GALLERY_STORE), keys.GALLERY_STORE_SCHEMA) in blocking
    # Every blocking check of an upgrade asset guards promotion; the store's check does not.
    upgrade = {k for k in blocking if k.asset_key in keys.UPGRADE_KEYS}
    assert upgrade == set(keys.PROMOTION_CHECKS)
