"""PoD config of ``gpt_neox`` sources: the stock ``GPTNeoXConfig`` plus the PoD fields.

Every key of the source is kept verbatim; the PoD fields and their checks are
``PodConfigMixin`` from ``configuration_kvconvert_pod.py``, written into the output beside
this file and ``modeling_kvconvert_pod_gpt_neox.py``. Loaded with ``trust_remote_code=True``;
only transformers is needed.
"""

from transformers.models.gpt_neox.configuration_gpt_neox import GPTNeoXConfig

from .configuration_kvconvert_pod import PodConfigMixin


class KVConvertPodGPTNeoXConfig(PodConfigMixin, GPTNeoXConfig):
    model_type = "kvconvert_pod_gpt_neox"


__all__ = ["KVConvertPodGPTNeoXConfig"]
