"""FCT_AUTO_UPGRADE: whether adding a version upgrades it by itself."""

import dagster as dg
import pytest

from fct_assets.automation import auto_upgrade_status


@pytest.mark.parametrize(
    "value, status",
    [
        (None, dg.DefaultSensorStatus.RUNNING),
        ("on", dg.DefaultSensorStatus.RUNNING),
        ("OFF", dg.DefaultSensorStatus.STOPPED),
        (" off ", dg.DefaultSensorStatus.STOPPED),
    ],
)
def test_auto_upgrade_setting(monkeypatch, value, status):
    if value is None:
        monkeypatch.delenv("FCT_AUTO_UPGRADE", raising=False)
    else:
        monkeypatch.setenv("FCT_AUTO_UPGRADE", value)
    assert auto_upgrade_status() == status


def test_auto_upgrade_refuses_other_values(monkeypatch):
    monkeypatch.setenv("FCT_AUTO_UPGRADE", "yes")
    with pytest.raises(ValueError, match=r"^FCT_AUTO_UPGRADE='yes': expected on or off$"):
        auto_upgrade_status()
