"""Remote-code model files copied into outputs that a stock transformers class cannot express.

Each ``configuration_*.py`` / ``modeling_*.py`` pair here is self-contained (it imports
transformers only, never kvconvert; relatively, only files shipped with it) so that a
checkpoint loads where kvconvert is not installed.
:func:`kvconvert.modeling.export.remote_config` builds the Llama-family config from a source
config, :func:`kvconvert.modeling.export.family_config` that of a :class:`RemoteFamily`.
"""

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

FOLDER = Path(__file__).resolve().parent
FILES = ("configuration_kvconvert.py", "modeling_kvconvert.py")
AUTO_MAP = {
    "AutoConfig": "configuration_kvconvert.KVConvertConfig",
    "AutoModel": "modeling_kvconvert.KVConvertModel",
    "AutoModelForCausalLM": "modeling_kvconvert.KVConvertForCausalLM",
}

#: what every RemoteFamily's modeling file imports (the stock model with its attention
#: swapped), so it is copied with it
GQA_SWAP_FILE = "modeling_kvconvert_gqa_swap.py"

#: the DeciLM / Nemotron-NAS layout for per-layer KV heads (docs/serving.md)
DECI_FILES = ("configuration_kvconvert_deci.py", "modeling_kvconvert_deci.py")
DECI_AUTO_MAP = {
    "AutoConfig": "configuration_kvconvert_deci.KVConvertDeciConfig",
    "AutoModel": "modeling_kvconvert_deci.KVConvertDeciModel",
    "AutoModelForCausalLM": "modeling_kvconvert_deci.KVConvertDeciForCausalLM",
}


@dataclass(frozen=True)
class RemoteFamily:
    """kvconvert's GQA modeling code for an architecture whose stock class has no GQA.

    The files are ``configuration_<model_type>.py`` and ``modeling_<model_type>.py`` in this
    folder, and ``GQA_SWAP_FILE``, which the modeling file imports. ``layout`` lists the
    :class:`~kvconvert.arch.AttentionAdapter` fields that differ in the written checkpoint
    (e.g. a fused qkv stored as separate projections). Legacy tensor names that only the stock
    loader renames are the adapter's ``load_renames``.
    """

    model_type: str
    config_class: str
    model_class: str
    causal_lm_class: str
    layout: dict[str, Any] = field(default_factory=dict)

    @property
    def files(self) -> tuple[str, ...]:
        """What an output of this family carries (relative imports included)."""
        return (
            f"configuration_{self.model_type}.py",
            f"modeling_{self.model_type}.py",
            GQA_SWAP_FILE,
        )

    @property
    def auto_map(self) -> dict[str, str]:
        conf, mod = f"configuration_{self.model_type}", f"modeling_{self.model_type}"
        return {
            "AutoConfig": f"{conf}.{self.config_class}",
            "AutoModel": f"{mod}.{self.model_class}",
            "AutoModelForCausalLM": f"{mod}.{self.causal_lm_class}",
        }
