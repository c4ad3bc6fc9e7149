"""AWQ's recorder (the search functions are tested through pt2q.weight_only in tests/test_weight_only.py)."""
from __future__ import annotations

import torch

from pt2q.algorithms.awq import InputStatistics


def test_input_statistics_mean_abs_over_every_row_and_a_bounded_spread_sample():
    torch.manual_seed(0)
    batches = [torch.randn(2, 50, 8) * (i + 1) for i in range(4)]
    stats = InputStatistics(samples=4, max_rows=40)
    for x in batches:
        stats(x)
    rows = torch.cat([b.reshape(-1, 8) for b in batches])
    torch.testing.assert_close(stats.mean, rows.abs().mean(0), rtol=1e-6, atol=1e-6)
    sample = stats.sample
    assert sample.shape == (40, 8)  # 10 rows from each of the 4 samples
    # rows come from every sample: each sample's scale shows in its share of the kept rows
    shares = sample.reshape(4, 10, 8).abs().mean((1, 2))
    assert torch.all(shares[1:] > shares[:-1])
