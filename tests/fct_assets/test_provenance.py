"""Per-asset code versions: a digest of the asset's own source and of the project code it
reaches, so an edit marks changed exactly the assets whose code it can change."""

import sys
import textwrap

import dagster as dg
import pytest

from fct_assets.lib.provenance import code_version, module_source, source_units, source_version

PACKAGES = ("pkg_core", "pkg_assets")


def _write(root, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))


@pytest.fixture
def project(tmp_path, monkeypatch):
    """Two tiny packages shaped like fct_ml (pkg_core) and fct_assets (pkg_assets)."""
    _write(
        tmp_path,
        {
            "pkg_core/__init__.py": "",
            "pkg_core/train.py": "from pkg_core.layers import width\n\ndef fit():\n    return width()\n",
            "pkg_core/layers.py": "def width():\n    return 4\n",
            "pkg_core/metrics.py": "def top1():\n    return 1.0\n",
            "pkg_assets/__init__.py": "",
            "pkg_assets/assets.py": """\
                import json

                def _helper():
                    return json.dumps(1)

                def _other_helper():
                    return 2

                def model_asset():
                    from pkg_core.train import fit

                    return fit(), _helper()

                def report_asset():
                    from pkg_core import metrics

                    return metrics.top1(), _other_helper()
                """,
        },
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    module_source.cache_clear()
    import pkg_assets.assets

    yield tmp_path, pkg_assets.assets
    for name in [m for m in sys.modules if m.split(".")[0] in PACKAGES]:
        del sys.modules[name]
    module_source.cache_clear()


def test_source_units_follow_calls_and_imports(project):
    _, assets = project
    # Own source, the same-module helper it calls, the module it imports and that module's import;
    # not json (outside the project), not the other helper, not metrics.
    assert set(source_units(assets.model_asset, PACKAGES)) == {
        "pkg_assets.assets:model_asset",
        "pkg_assets.assets:_helper",
        "pkg_core.train",
        "pkg_core.layers",
    }
    # `from pkg_core import metrics` names a module: it counts, the package's __init__ too.
    assert set(source_units(assets.report_asset, PACKAGES)) == {
        "pkg_assets.assets:report_asset",
        "pkg_assets.assets:_other_helper",
        "pkg_core",
        "pkg_core.metrics",
    }


def test_an_edit_changes_only_the_versions_of_code_that_reaches_it(project):
    root, assets = project
    before = {f: source_version(f, PACKAGES) for f in (assets.model_asset, assets.report_asset)}
    assert len(set(before.values())) == 2 and all(len(v) == 16 for v in before.values())

    (root / "pkg_core/layers.py").write_text("def width():\n    return 8\n")  # reached by fit
    (root / "README.md").write_text("an edit outside the code\n")
    module_source.cache_clear()
    after = {f: source_version(f, PACKAGES) for f in before}
    assert after[assets.model_asset] != before[assets.model_asset]
    assert after[assets.report_asset] == before[assets.report_asset]


def test_each_asset_has_its_own_code_version_and_the_git_commit_as_metadata():
    from fct_assets.definitions import asset_graph

    ALL_ASSETS = asset_graph()[0]

    versions = {a.key.to_user_string(): next(iter(a.specs)).code_version for a in ALL_ASSETS}
    assert len(set(versions.values())) == len(versions), versions
    assert code_version() not in versions.values()

    def units(asset: dg.AssetsDefinition) -> set[str]:
        return set(source_units(asset.node_def.compute_fn.decorated_fn))

    by_key = {
        a.key.to_user_string(): a for a in ALL_ASSETS if isinstance(a.node_def, dg.OpDefinition)
    }
    assert "fct_ml.transformation" in units(by_key["transformation"])
    assert "fct_assets.upgrade.report" in units(by_key["eval_report"])
    # The report, the backfill and other assets' bodies are not the dataset's code.
    dataset = units(by_key["dataset"])
    assert (
        not {
            "fct_assets.upgrade.report",
            "fct_assets.upgrade.backfill",
            "fct_assets.upgrade.assets:eval_report",
        }
        & dataset
    )
