"""Remote-code model files copied into outputs that a stock transformers class cannot express.

``configuration_kvconvert.py`` and ``modeling_kvconvert.py`` are self-contained (they import
transformers only, never kvconvert) so that a checkpoint loads where kvconvert is not installed.
:func:`kvconvert.modeling.export.remote_config` builds their config from a source config.
"""

from pathlib import Path

FOLDER = Path(__file__).resolve().parent
FILES = ("configuration_kvconvert.py", "modeling_kvconvert.py")
AUTO_MAP = {
    "AutoConfig": "configuration_kvconvert.KVConvertConfig",
    "AutoModel": "modeling_kvconvert.KVConvertModel",
    "AutoModelForCausalLM": "modeling_kvconvert.KVConvertForCausalLM",
}
