"""Differential privacy: accounting, DP-SGD, client-level DP, the privacy ledger."""
