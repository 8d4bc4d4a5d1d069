"""PoD config of ``gemma`` sources: the stock ``GemmaConfig`` plus the PoD fields.

Every key of the source is kept verbatim; the PoD fields and their checks are
``PodConfigMixin`` from ``configuration_kvconvert_pod.py``, written into the output beside
this file and ``modeling_kvconvert_pod_gemma.py``. Loaded with ``trust_remote_code=True``;
only transformers is needed.
"""

from transformers.models.gemma.configuration_gemma import GemmaConfig

from .configuration_kvconvert_pod import PodConfigMixin


class KVConvertPodGemmaConfig(PodConfigMixin, GemmaConfig):
    model_type = "kvconvert_pod_gemma"


__all__ = ["KVConvertPodGemmaConfig"]
