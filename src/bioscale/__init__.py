"""bioscale: fast, hackable training and use of biological foundation models.

Importing ``bioscale`` registers its model classes with the ``transformers`` Auto API, so
``AutoModelForMaskedLM.from_pretrained(dir)`` loads a bioscale checkpoint without ``trust_remote_code``.
"""

__version__ = "0.1.0"

from bioscale._quiet import quiet_third_party_imports  # noqa: E402

with quiet_third_party_imports():
    from bioscale import models  # noqa: F401,E402  (registers Auto classes)
