"""Model surgery below pruning and storage: size attributes re-derived after layers change shape
(attributes.py), and whole layers removed (depth.py). The pruning engine and model loading both use it."""
