"""Cryptographic protocols: secure aggregation (SecAgg+) with its primitives and encodings,
encrypted aggregation (:mod:`~mmshield.crypto.ckks`) and encrypted inference
(:mod:`~mmshield.crypto.encrypted_inference`).

``crypto`` knows nothing of transports: every protocol is a message-passing state machine whose
messages serialise to bytes (see :mod:`mmshield.crypto.secagg`).
"""
