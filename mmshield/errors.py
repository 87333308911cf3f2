"""One exception hierarchy for the whole package.

Every message says what was wrong, where (file, row, client, round or config key) and how to
fix it.
"""

from __future__ import annotations


class MMShieldError(Exception):
    """Root of every error mmshield raises on purpose."""


class ConfigError(MMShieldError):
    """A configuration file or value is invalid (the message names the key)."""


class DataError(MMShieldError):
    """Input data is invalid (the message names the file, row or client)."""


class BadRecordsError(DataError):
    """One or more manifest rows are invalid.

    Parameters
    ----------
    problems
        ``(row_number, reason)`` pairs, one per bad row, in row order.
    source
        The manifest file the rows come from.
    """

    def __init__(self, problems: list[tuple[int, str]], source: str) -> None:
        self.problems = problems
        self.source = source
        lines = [f"{source}: {len(problems)} bad record(s):"]
        lines += [f"  row {row}: {reason}" for row, reason in problems[:50]]
        if len(problems) > 50:
            lines.append(f"  ... and {len(problems) - 50} more")
        lines.append("Fix these rows, or set `dataset.on_bad_record: skip` to train without them.")
        super().__init__("\n".join(lines))


class TrainingError(MMShieldError):
    """Training could not continue (the message names the round and client)."""


class StoreError(MMShieldError):
    """The run store could not be read or written."""


class PrivacyError(MMShieldError):
    """A privacy guarantee cannot be given as asked: an unreachable ε, an unaccountable sampling
    scheme, or an exhausted budget."""


class SecAggError(MMShieldError):
    """Secure aggregation could not proceed: a refused request, a tampered share, too many
    dropouts or an unsafe configuration (the message names the client, the phase and the fix)."""


class EncryptionError(MMShieldError):
    """Homomorphic encryption could not proceed: bad parameters, keys, input or ciphertext."""
