"""mmshield: privacy-preserving multimodal AI.

Federated training of multimodal models with differential privacy, secure aggregation,
homomorphic encryption and audits. See ``README.md`` and ``DESIGN.md``.
"""

from mmshield.errors import ConfigError, DataError, MMShieldError

__all__ = ["ConfigError", "DataError", "MMShieldError", "__version__"]
__version__ = "0.1.0"
