"""Federated core: local training, aggregation, strategies and evaluation (transport-agnostic)."""
