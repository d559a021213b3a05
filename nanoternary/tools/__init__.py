"""Tools outside the reading path: benchmarks, comparisons, the PyTorch peer."""
