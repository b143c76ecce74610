"""The hybrid family: Llama Think 95M (seeds 002/003; ``fixtures/llama_think/SPEC.md``).

``config.py`` is its shape and counts, ``gdn.py`` the Gated DeltaNet layers, ``csa.py`` the
compressed sparse attention, ``attention.py`` the gated GQA attention both attentions share, and
``model.py`` the blocks and the model.
"""

from jaxlm.models.family import Family
from jaxlm.models.hybrid.config import HybridConfig
from jaxlm.models.hybrid.model import HybridLM

FAMILY = Family(name="hybrid", config=HybridConfig, model=HybridLM, naming="jaxlm.formats.hybrid")

__all__ = ["FAMILY", "HybridConfig", "HybridLM"]
