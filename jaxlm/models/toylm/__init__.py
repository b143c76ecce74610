"""The ToyLM family: Crowfeather-50m and Shard-40m-v1 (``specs/toylm.md``).

``model.py`` is the architecture; ``decode_kernel.py`` and its ``*.cu`` sources are its fast
decode step on NVIDIA GPUs, offered to generation through ``ToyLM.fast_decoder``.
"""

from jaxlm.models.family import Family
from jaxlm.models.toylm.model import ToyLM, ToyLMConfig, softcap

FAMILY = Family(name="toylm", config=ToyLMConfig, model=ToyLM, naming="jaxlm.formats.toylm")

__all__ = ["FAMILY", "ToyLM", "ToyLMConfig", "softcap"]
