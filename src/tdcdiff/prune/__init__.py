"""Proxy-based pruning: structural surgery, candidate proposers, the proxy score and the memory bank."""
