"""Closed-form transformations: Procrustes against exact rotations, ridge against numpy's lstsq,
and the map used as an h (apply_transformation, checkpoint round trip, the trainer's record)."""

import numpy as np
import pytest
import torch

from fct_ml.backfill import apply_transformation
from fct_ml.checkpoint import load_checkpoint, save_checkpoint
from fct_ml.closed_form import (
    ClosedFormConfig,
    ClosedFormMap,
    fit_closed_form,
    fit_procrustes,
    fit_ridge,
)
from fct_ml.config import ConfigError
from fct_ml.trainers import train_closed_form
from tests.fct_ml.tiny import tiny_features


def rotation(d: int, seed: int) -> torch.Tensor:
    """A (d, d) orthogonal matrix with determinant +1 (QR of a seeded Gaussian)."""
    g = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    q = q * torch.sign(torch.diagonal(r))
    if torch.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q


def test_procrustes_recovers_an_exact_rotation_translation_and_scale():
    x = torch.randn(40, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    r = rotation(3, seed=2)
    shift = torch.tensor([0.5, -2.0, 3.0], dtype=torch.float64)
    got_r, got_b, got_s = fit_procrustes(x, 2.5 * x @ r + shift)
    assert torch.allclose(got_r, r, atol=1e-10)
    assert got_s == pytest.approx(2.5)
    assert torch.allclose(got_b, shift, atol=1e-10)
    assert torch.allclose(got_r.T @ got_r, torch.eye(3, dtype=torch.float64), atol=1e-10)


def test_procrustes_into_more_dims_recovers_a_semi_orthogonal_map():
    # old 2-d -> new 3-d: R (2, 3) with orthonormal rows (the first two rows of a rotation).
    x = torch.randn(30, 2, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    r = rotation(3, seed=5)[:2]
    got_r, got_b, got_s = fit_procrustes(x, x @ r)
    assert torch.allclose(got_r, r, atol=1e-10)
    assert got_s == pytest.approx(1.0) and torch.allclose(
        got_b, torch.zeros(3, dtype=torch.float64)
    )
    # Into fewer dims the map has orthonormal columns.
    down, _, _ = fit_procrustes(x @ r, x)
    assert torch.allclose(down.T @ down, torch.eye(2, dtype=torch.float64), atol=1e-10)


def test_ridge_equals_numpy_lstsq_on_the_augmented_system():
    g = torch.Generator().manual_seed(7)
    x = torch.randn(12, 3, generator=g, dtype=torch.float64)
    y = torch.randn(12, 2, generator=g, dtype=torch.float64)
    ridge = 0.3
    w, b = fit_ridge(x, y, ridge)
    # The same problem for lstsq: rows [x, 1] -> y, plus penalty rows [sqrt(N lam) I, 0] -> 0,
    # lam = ridge * (trace of the centred covariance) / 3; the intercept column is unpenalised.
    xn, yn = x.numpy(), y.numpy()
    lam = ridge * np.trace(np.cov(xn.T, bias=True)) / 3
    design = np.vstack(
        [
            np.hstack([xn, np.ones((12, 1))]),
            np.hstack([np.sqrt(12 * lam) * np.eye(3), np.zeros((3, 1))]),
        ]
    )
    target = np.vstack([yn, np.zeros((3, 2))])
    solution = np.linalg.lstsq(design, target, rcond=None)[0]
    assert np.allclose(w.numpy(), solution[:3], atol=1e-10)
    assert np.allclose(b.numpy(), solution[3], atol=1e-10)
    # ridge 0 is ordinary least squares with an intercept.
    w0, b0 = fit_ridge(x, y, 0.0)
    ols = np.linalg.lstsq(np.hstack([xn, np.ones((12, 1))]), yn, rcond=None)[0]
    assert np.allclose(w0.numpy(), ols[:3]) and np.allclose(b0.numpy(), ols[3])


def test_a_linear_map_is_an_h_through_apply_transformation_and_a_checkpoint(tmp_path):
    old, side, new, _ = tiny_features(16)
    h = fit_closed_form("linear", old, side, new, ridge=0.0)
    assert h.config == ClosedFormConfig(
        kind="linear", old_dim=3, side_info_dim=2, new_dim=2, side_info=True, ridge=0.0
    )
    # It is the least-squares fit of [old, side, 1] -> new.
    design = torch.cat([old, side, torch.ones(16, 1)], dim=1).double()
    expected = design @ torch.linalg.lstsq(design, new.double()).solution
    out, sigma = apply_transformation(h, old, side)
    assert sigma is None
    assert torch.allclose(out.double(), expected, atol=1e-5)
    info = save_checkpoint(tmp_path / "h.safetensors", h, name="transformation")
    loaded, meta = load_checkpoint(info.path, info.sha256)
    assert isinstance(loaded, ClosedFormMap) and meta["kind"] == "closed_form"
    assert torch.equal(apply_transformation(loaded, old, side)[0], out)


def test_procrustes_ignores_side_info_and_says_so():
    old, side, new, _ = tiny_features(16)
    h = fit_closed_form("procrustes", old, side, new[:, :2])
    assert h.config.side_info is False and h.config.old_dim == 3
    out, _ = apply_transformation(h, old, None)  # no side-info needed
    assert out.shape == (16, 2)
    with pytest.raises(ConfigError, match="procrustes maps the old embedding alone"):
        ClosedFormConfig(kind="procrustes", side_info=True)


def test_bad_kinds_and_inputs_are_refused_in_one_line():
    old, side, new, _ = tiny_features(4)
    with pytest.raises(ValueError, match=r"expected one of \['linear', 'procrustes'\], got 'mlp2'"):
        fit_closed_form("mlp2", old, side, new)
    bad = old.clone()
    bad[1, 0] = float("nan")
    with pytest.raises(ValueError, match="old_embedding: contains NaN or Inf"):
        fit_closed_form("linear", bad, side, new)
    with pytest.raises(ValueError, match=r"must be \(N, D\) with one N >= 2"):
        fit_ridge(old[:1], new[:1])


def test_the_trainer_records_one_fit_with_its_time_and_error():
    old, side, new, _ = tiny_features(16)
    seen = []
    h, history = train_closed_form(old, side, new, "linear", on_epoch=seen.append)
    assert seen == history and len(history) == 1
    assert history[0].seconds >= 0
    with torch.no_grad():
        pred = h(old, side)
    assert history[0].parts["sq_error"] == pytest.approx(float((pred - new).pow(2).sum(1).mean()))
