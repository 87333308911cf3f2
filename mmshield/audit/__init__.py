"""Audits that try to break the protections: attacks that test every privacy and robustness claim
(poisoning in :mod:`mmshield.audit.attacks`)."""
