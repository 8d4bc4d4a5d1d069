"""PoD config of ``qwen3`` sources: the stock ``Qwen3Config`` plus the PoD fields.

Every key of the source is kept verbatim; the PoD fields and their checks are
``PodConfigMixin`` from ``configuration_kvconvert_pod.py``, written into the output beside
this file and ``modeling_kvconvert_pod_qwen3.py``. Loaded with ``trust_remote_code=True``;
only transformers is needed.
"""

from transformers.models.qwen3.configuration_qwen3 import Qwen3Config

from .configuration_kvconvert_pod import PodConfigMixin


class KVConvertPodQwen3Config(PodConfigMixin, Qwen3Config):
    model_type = "kvconvert_pod_qwen3"


__all__ = ["KVConvertPodQwen3Config"]
