"""The DeepSeek-V4 family: nanowhale-100m (``fixtures/nanowhale/SPEC.md``).

``config.py`` is the config (Hugging Face ``config.json`` names), ``model.py`` the model and its
MLA attention, ``moe.py`` the mixture of experts and its two dispatches, ``hyper.py`` the
hyper-connections. ``jaxlm/formats/deepseek_v4.py`` reads and writes its checkpoints.
"""

from jaxlm.models.deepseek_v4.config import DeepSeekV4Config
from jaxlm.models.deepseek_v4.model import DeepSeekV4, MLALayer
from jaxlm.models.family import Family

FAMILY = Family(name="deepseek_v4", config=DeepSeekV4Config, model=DeepSeekV4, naming="jaxlm.formats.deepseek_v4")

__all__ = ["FAMILY", "DeepSeekV4", "DeepSeekV4Config", "MLALayer"]
