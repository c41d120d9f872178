"""Plain-PyTorch references: the oracles of the tests and the last-resort backend, one module per op."""
