"""Proxy-based pruning: the decision space (units), the pruning engine (torch-pruning), budget fitting (fit),
candidate proposers, the proxy score and the memory bank."""
