"""One package per API dialect: `routes.py` (its blueprint) and `protocol.py` (its request and response models)."""
