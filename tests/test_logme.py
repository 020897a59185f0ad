"""LogME: the closed-form evidence against a brute-force Gaussian, the fixed point against a grid,
invariances, and that class-separating features score above random ones."""

from __future__ import annotations

import math

import pytest
import torch

from transferlab.errors import UserError
from transferlab.features.logme import log_evidence, logme, max_evidence, spectrum


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _brute_evidence(f: torch.Tensor, y: torch.Tensor, alpha: float, beta: float) -> float:
    """log N(y; 0, F F^T / alpha + I / beta): the marginal likelihood, straight from its "
    "definition."""
    f, y = f.double(), y.double()
    cov = f @ f.T / alpha + torch.eye(len(y), dtype=torch.float64) / beta
    return float(
        torch.distributions.MultivariateNormal(
            torch.zeros(len(y), dtype=torch.float64), cov
        ).log_prob(y)
    )


@pytest.mark.parametrize("n,d", [(7, 3), (4, 6)])  # more samples than features, and fewer
@pytest.mark.parametrize("alpha,beta", [(1.0, 1.0), (0.3, 5.0), (20.0, 0.2)])
def test_closed_form_matches_brute_force(n, d, alpha, beta):
    f = torch.randn(n, d, generator=_gen(0))
    y = (torch.arange(n) % 2).double()
    assert log_evidence(f, y, alpha, beta) == pytest.approx(
        _brute_evidence(f, y, alpha, beta), abs=1e-9
    )


def test_fixed_point_finds_the_grid_maximum():
    f = torch.randn(12, 4, generator=_gen(1))
    y = (f[:, 0] + 0.3 * torch.randn(12, generator=_gen(2)) > 0).double()
    best, alpha, beta = max_evidence(spectrum(f), y)
    grid = [10 ** (k / 4) for k in range(-12, 13)]
    brute = max(_brute_evidence(f, y, a, b) for a in grid for b in grid)
    assert best >= brute - 1e-6  # at least as good as every point of a fine grid
    assert best == pytest.approx(_brute_evidence(f, y, alpha, beta), abs=1e-9)
    assert best - brute < 0.2  # and the grid's best is close by (it is the same maximum)


def test_separable_features_beat_random_ones():
    g = _gen(3)
    labels = torch.arange(5).repeat_interleave(40)
    centres = 4 * torch.randn(5, 16, generator=g)
    good = centres[labels] + torch.randn(200, 16, generator=g)
    noise = torch.randn(200, 16, generator=g)
    assert logme(good, labels) > logme(noise, labels) + 0.1


def test_invariances():
    g = _gen(4)
    labels = torch.arange(4).repeat_interleave(10)
    f = torch.randn(40, 8, generator=g) + labels[:, None].float()
    score = logme(f, labels)
    q, _ = torch.linalg.qr(torch.randn(8, 8, generator=g))
    perm = torch.randperm(40, generator=g)
    assert logme(f @ q, labels) == pytest.approx(score, abs=1e-6)  # rotation of the feature space
    assert logme(7.5 * f, labels) == pytest.approx(score, abs=1e-6)  # scale: absorbed by alpha
    assert logme(f[perm], labels[perm]) == pytest.approx(score, abs=1e-9)  # sample order
    assert logme(f, (labels + 1) % 4) == pytest.approx(score, abs=1e-9)  # class names


def test_bad_input():
    with pytest.raises(UserError, match="features"):
        logme(torch.randn(5, 3), torch.zeros(4, dtype=torch.long))
    with pytest.raises(UserError, match="NaN"):
        logme(torch.full((5, 3), math.nan), torch.zeros(5, dtype=torch.long))
