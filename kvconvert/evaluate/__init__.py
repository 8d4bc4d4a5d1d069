"""``kvconvert eval``: a converted checkpoint's numbers side by side with its original.

Fidelity (KL to the original and perplexity on the same tokens), KV cache bytes measured from
the real cache object after a prefill, prefill/decode speed (interleaved runs, median) and a
retrieval probe (passkey for models with a tokenizer, a copy task on token ids otherwise);
docs/evaluation.md describes them. One module per job, each importing only those listed
before it: ``metrics`` (measurements usable on their own), ``retrieval`` (the probe),
``models`` (resolving and loading the models compared), ``progress`` (a bar per phase),
``tokens`` (the evaluation tokens), ``table`` and ``plot`` (presentation), ``run``
(``evaluate()``, the command). The names below are what other code imports from here.
"""

from ..compat import cache_bytes
from ..evalsettings import EvalSettings
from .metrics import _kl_sum, _nll_sum, fidelity, kl_per_token, kv_cache_bytes, nll_per_token
from .models import is_kvconvert_output
from .plot import plot_figure, require_matplotlib, write_plot
from .retrieval import PASSKEY_FILLER, copy_prompt, passkey_prompt
from .run import SCHEMA_VERSION, evaluate
from .table import format_table

__all__ = [
    "PASSKEY_FILLER",
    "SCHEMA_VERSION",
    "EvalSettings",
    "_kl_sum",
    "_nll_sum",
    "cache_bytes",
    "copy_prompt",
    "evaluate",
    "fidelity",
    "format_table",
    "is_kvconvert_output",
    "kl_per_token",
    "kv_cache_bytes",
    "nll_per_token",
    "passkey_prompt",
    "plot_figure",
    "require_matplotlib",
    "write_plot",
]
