"""LogME: how well a frozen backbone's features suit a labelled data set, with no training.

From You et al., "LogME: Practical Assessment of Pre-trained Models for Transfer Learning"
(ICML 2021). Each class c gets a Bayesian linear model of its one-hot target column y (n,) on the
features F (n, D):

    w ~ N(0, 1/alpha * I_D),    y | F, w ~ N(F w, 1/beta * I_n)

Its evidence (marginal likelihood) p(y | F, alpha, beta) = N(y; 0, F F^T / alpha + I / beta) has a
closed form. With the thin SVD F = U diag(s) V^T, sigma_i = s_i^2 (zero for i beyond the rank),
z = U^T y, and the posterior mean m = (alpha I + beta F^T F)^-1 beta F^T y:

    log p = n/2 log beta + D/2 log alpha - n/2 log 2pi - beta/2 ||F m - y||^2 - alpha/2 ||m||^2
            - 1/2 sum_i log(alpha + beta sigma_i)

alpha and beta are set to maximise it by MacKay's fixed-point iteration (the paper's Algorithm 1):
gamma = sum_i beta sigma_i / (alpha + beta sigma_i), alpha <- gamma / ||m||^2,
beta <- (n - gamma) / ||F m - y||^2. Every quantity is a sum over the singular values, so one SVD
serves every class and every iteration. LogME is the maximised evidence divided by n, averaged
over classes: higher is better; it compares backbones on the same data, not across data sets.

Usage:
    score = logme(features, labels)                 # features (n, D) float, labels (n,) int
    ev = log_evidence(features, y, alpha=1.0, beta=1.0)   # one class column, fixed alpha/beta
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
from torch import Tensor

from transferlab.errors import UserError

log = logging.getLogger(__name__)

MAX_ITER = 100  # the paper: converges in a few iterations; 100 is a guard, not a budget
TOL = 1e-6  # relative change of alpha and beta that ends the iteration


@dataclass(frozen=True)
class Spectrum:
    """The SVD of the features that every class reuses: F = U diag(s) V^T (rank r)."""

    u: Tensor  # (n, r)
    sigma: Tensor  # (r,) = s^2, the non-zero eigenvalues of F^T F
    n: int
    d: int


def spectrum(features: Tensor) -> Spectrum:
    """Thin SVD of ``features`` (n, D) in float64, keeping the numerically non-zero part."""
    f = features.detach().to(torch.float64).reshape(features.shape[0], -1)
    u, s, _ = torch.linalg.svd(f, full_matrices=False)
    keep = s > s.max() * max(f.shape) * torch.finfo(torch.float64).eps if s.numel() else s > 0
    return Spectrum(u=u[:, keep], sigma=s[keep] ** 2, n=f.shape[0], d=f.shape[1])


def _terms(
    sp: Spectrum, z: Tensor, rest: float, alpha: float, beta: float
) -> tuple[float, float, float]:
    """(||m||^2, ||F m - y||^2, gamma) for one target; ``rest`` = ||y||^2 - ||z||^2."""
    denom = alpha + beta * sp.sigma
    m2 = float(((beta * sp.sigma.sqrt() / denom) ** 2 * z**2).sum())
    res2 = float(((alpha / denom) ** 2 * z**2).sum()) + rest
    gamma = float((beta * sp.sigma / denom).sum())
    return m2, res2, gamma


def _evidence(sp: Spectrum, z: Tensor, rest: float, alpha: float, beta: float) -> float:
    n, d = sp.n, sp.d
    m2, res2, _ = _terms(sp, z, rest, alpha, beta)
    logdet = float(torch.log(alpha + beta * sp.sigma).sum()) + (d - sp.sigma.numel()) * math.log(
        alpha
    )
    return (
        n / 2 * math.log(beta)
        + d / 2 * math.log(alpha)
        - n / 2 * math.log(2 * math.pi)
        - beta / 2 * res2
        - alpha / 2 * m2
        - logdet / 2
    )


def log_evidence(features: Tensor, y: Tensor, alpha: float, beta: float) -> float:
    """log p(y | F, alpha, beta) of one target column ``y`` (n,) at fixed alpha and beta."""
    sp = spectrum(features)
    y = y.to(torch.float64)
    z = sp.u.T @ y
    return _evidence(sp, z, float(y @ y - z @ z), alpha, beta)


def max_evidence(sp: Spectrum, y: Tensor) -> tuple[float, float, float]:
    """(maximised log evidence, alpha, beta) of one target column by the fixed-point iteration."""
    y = y.to(torch.float64)
    z = sp.u.T @ y
    rest = max(float(y @ y - z @ z), 0.0)
    alpha, beta = 1.0, 1.0
    for _ in range(MAX_ITER):
        m2, res2, gamma = _terms(sp, z, rest, alpha, beta)
        # tiny floors keep a perfectly fitted (res2 = 0) or all-zero target finite
        new_alpha = gamma / max(m2, 1e-300)
        new_beta = (sp.n - gamma) / max(res2, 1e-300)
        new_alpha, new_beta = min(max(new_alpha, 1e-12), 1e12), min(max(new_beta, 1e-12), 1e12)
        done = abs(new_alpha - alpha) <= TOL * alpha and abs(new_beta - beta) <= TOL * beta
        alpha, beta = new_alpha, new_beta
        if done:
            break
    return _evidence(sp, z, rest, alpha, beta), alpha, beta


def logme(features: Tensor, labels: Tensor) -> float:
    """LogME of ``features`` (n, D) for integer ``labels`` (n,): mean over classes of the
    maximised log evidence per sample."""
    if features.ndim != 2 or labels.ndim != 1 or features.shape[0] != labels.shape[0]:
        raise UserError(
            f"logme needs features (n, D) and labels (n,); got {tuple(features.shape)} "
            f"and {tuple(labels.shape)}"
        )
    if features.shape[0] < 2:
        raise UserError("logme needs at least 2 samples")
    if not torch.isfinite(features).all():
        raise UserError("logme: the features hold NaN or inf values")
    sp = spectrum(features)
    classes = torch.unique(labels)
    scores = [max_evidence(sp, (labels == c).to(torch.float64))[0] / sp.n for c in classes.tolist()]
    return float(sum(scores) / len(scores))
