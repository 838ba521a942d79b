"""Model-version names: only safe names become partitions, paths and table names."""

import pytest

from fct_assets.lib.partitions import VersionError, check_version
from fct_assets.lib.storage import version_table


@pytest.mark.parametrize("name", ["v2", "v10", "exp_3-b", "V"])
def test_good_versions(name):
    assert check_version(name) == name
    assert version_table(name) == f"gallery_{name}"


@pytest.mark.parametrize(
    "name", ["", "2v", "../v2", "v2/..", "v2;rm -rf /", "v 2", "v2$(id)", "a" * 65, "v2\n"]
)
def test_bad_versions_are_refused_with_one_line(name):
    with pytest.raises(VersionError) as err:
        check_version(name)
    assert "\n" not in str(err.value).replace(repr(name), "") and "model version" in str(err.value)
