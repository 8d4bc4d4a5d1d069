"""PoD config of ``phi3`` sources: the stock ``Phi3Config`` plus the PoD fields.

Every key of the source is kept verbatim; the PoD fields and their checks are
``PodConfigMixin`` from ``configuration_kvconvert_pod.py``, written into the output beside
this file and ``modeling_kvconvert_pod_phi3.py``. Loaded with ``trust_remote_code=True``;
only transformers is needed.
"""

from transformers.models.phi3.configuration_phi3 import Phi3Config

from .configuration_kvconvert_pod import PodConfigMixin


class KVConvertPodPhi3Config(PodConfigMixin, Phi3Config):
    model_type = "kvconvert_pod_phi3"


__all__ = ["KVConvertPodPhi3Config"]
