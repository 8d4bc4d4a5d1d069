"""PoD config of ``gemma2`` sources: the stock ``Gemma2Config`` plus the PoD fields.

Every key of the source is kept verbatim; the PoD fields and their checks are
``PodConfigMixin`` from ``configuration_kvconvert_pod.py``, written into the output beside
this file and ``modeling_kvconvert_pod_gemma2.py``. Loaded with ``trust_remote_code=True``;
only transformers is needed.
"""

from transformers.models.gemma2.configuration_gemma2 import Gemma2Config

from .configuration_kvconvert_pod import PodConfigMixin


class KVConvertPodGemma2Config(PodConfigMixin, Gemma2Config):
    model_type = "kvconvert_pod_gemma2"


__all__ = ["KVConvertPodGemma2Config"]
