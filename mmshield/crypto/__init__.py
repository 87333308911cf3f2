"""Cryptographic protocols: secure aggregation (SecAgg+), its primitives and encodings.

``crypto`` knows nothing of transports: every protocol is a message-passing state machine whose
messages serialise to bytes (see :mod:`mmshield.crypto.secagg`).
"""
