"""PoD config of ``opt`` sources: the stock ``OPTConfig`` plus the PoD fields.

Every key of the source is kept verbatim; the PoD fields and their checks are
``PodConfigMixin`` from ``configuration_kvconvert_pod.py``, written into the output beside
this file and ``modeling_kvconvert_pod_opt.py``. Loaded with ``trust_remote_code=True``;
only transformers is needed.
"""

from transformers.models.opt.configuration_opt import OPTConfig

from .configuration_kvconvert_pod import PodConfigMixin


class KVConvertPodOPTConfig(PodConfigMixin, OPTConfig):
    model_type = "kvconvert_pod_opt"


__all__ = ["KVConvertPodOPTConfig"]
