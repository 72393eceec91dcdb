"""The head refits of bench/federation_head_refit.py: from summed client statistics, exactly the
heads fitted on the pooled rows."""

import torch
from sklearn.discriminant_analysis import LinearDiscriminantAnalysis

from adamix_zoo.head_init import FeatureStatistics, lda_head
from bench.federation_head_refit import ridge_head


def _rows(n: int = 300, d: int = 6, classes: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, classes, (n,), generator=g)
    return torch.randn(n, d, generator=g, dtype=torch.float64) + 2.0 * torch.nn.functional.one_hot(y, d), y


def _summed(x: torch.Tensor, y: torch.Tensor, clients: int = 4) -> FeatureStatistics:
    """The statistics summed over label-skewed client shards (rows sorted by label, then split)."""
    order = torch.argsort(y, stable=True)
    shards = [FeatureStatistics.of(x[i], y[i], 3) for i in torch.tensor_split(order, clients)]
    return sum(shards[1:], shards[0])


def test_lda_from_client_statistics_matches_sklearn_on_pooled_rows():
    x, y = _rows()
    weight, bias = lda_head(_summed(x, y), shrinkage=0.0)
    reference = LinearDiscriminantAnalysis(solver="lsqr").fit(x.numpy(), y.numpy())
    torch.testing.assert_close(weight, torch.from_numpy(reference.coef_))
    torch.testing.assert_close(bias, torch.from_numpy(reference.intercept_))


def test_ridge_from_client_statistics_matches_the_direct_solve():
    x, y = _rows()
    weight, bias = ridge_head(_summed(x, y), penalty=0.5)
    design = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1)
    targets = torch.nn.functional.one_hot(y, 3).to(x.dtype)
    direct = torch.linalg.solve(design.T @ design + 0.5 * torch.eye(design.shape[1], dtype=x.dtype),
                                design.T @ targets)
    torch.testing.assert_close(weight, direct[:-1].T)
    torch.testing.assert_close(bias, direct[-1])
