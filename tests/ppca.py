"""Probabilistic PCA as a VAE, the model whose log p(x) and posterior are closed form:
p(z) = N(0, I), p(x|z) = N(W z + mu, SIGMA^2 I). Shared by the tests of the objectives, the
estimators and the report."""

from __future__ import annotations

import torch
from torch.distributions import Independent, MultivariateNormal, Normal

D, L, SIGMA = 6, 3, 0.5


class PPCA:
    """The linear-Gaussian VAE with a choice of encoder.

    Args:
        encoder: ``"exact"`` (the posterior's diagonal, exact when ``orthogonal``), scaled by
            ``width`` and moved by ``shift`` in every latent dimension; ``"wrong"`` (0.85 x
            the mean plus an offset, 1.5 x the standard deviations); ``"full"`` (the exact
            full-covariance posterior).
        orthogonal: W with orthogonal columns (scaled 2, 1, 0.5), so that the exact posterior
            is a diagonal Gaussian.
    """

    def __init__(self, encoder: str = "exact", orthogonal: bool = True, seed: int = 0,
                 width: float = 1.0, shift: float = 0.0) -> None:
        g = torch.Generator().manual_seed(seed)
        w = torch.randn(D, L, generator=g, dtype=torch.float64)
        if orthogonal:  # W^T W diagonal -> the exact posterior is a diagonal Gaussian
            w = torch.linalg.qr(w)[0] * torch.tensor([2.0, 1.0, 0.5], dtype=torch.float64)
        self.w, self.mu = w, torch.randn(D, generator=g, dtype=torch.float64)
        self.encoder, self.width, self.shift = encoder, width, shift
        self.offset = torch.tensor([0.3, -0.2, 0.1], dtype=torch.float64)
        self.latent_dim = L

    def posterior(self, x):
        m = self.w.T @ self.w + SIGMA**2 * torch.eye(L, dtype=torch.float64)
        mean = torch.linalg.solve(m, self.w.T @ (x - self.mu).T).T
        return mean, SIGMA**2 * torch.linalg.inv(m)

    def encode(self, x):
        mean, cov = self.posterior(x)
        std = cov.diagonal().sqrt().expand_as(mean)
        if self.encoder == "full":
            return MultivariateNormal(mean, covariance_matrix=cov)
        if self.encoder == "wrong":
            return Independent(Normal(0.85 * mean + self.offset, 1.5 * std), 1)
        return Independent(Normal(mean + self.shift, self.width * std), 1)

    def decode(self, z):
        return Independent(Normal(z @ self.w.T + self.mu, SIGMA), 1)

    def prior(self, device):
        zeros = torch.zeros(L, dtype=torch.float64, device=device)
        return Independent(Normal(zeros, torch.ones_like(zeros)), 1)

    def log_px(self, x):
        cov = self.w @ self.w.T + SIGMA**2 * torch.eye(D, dtype=torch.float64)
        return MultivariateNormal(self.mu, covariance_matrix=cov).log_prob(x)
