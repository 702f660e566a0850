"""Proxy-based pruning: the decision space (units), the pruning plan traced with torch-pruning (plan), importance
criteria (importance), the engine that applies a decision (engine), budget fitting (fit), candidate proposers,
the proxy score and the memory bank."""
