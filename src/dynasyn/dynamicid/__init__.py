"""DynamicID: tuning-free multi-subject personalization (SAA + IMR), arXiv 2503.06505.

``pipe = dynamicid.load(base_pipe, weights)``; ``pipe("<asset0> is jumping", id_images=[crop],
id_classes=["star"])``. See docs/dynamicid.md. Parts: :mod:`.saa` (the attention processor and
its gate), :mod:`.encoder` (ID encoder + resampler), :mod:`.imr` (Identity-Motion
Reconfigurator), :mod:`.train` (anchoring + reconfiguration), :mod:`.pipeline`,
:mod:`.official` (the official checkpoint layout), :mod:`.weights` (our weights directory),
:mod:`.cli` (``dynasyn zeroshot``).
"""

from dynasyn.dynamicid.pipeline import DynamicIDPipeline, load
from dynasyn.dynamicid.saa import SAAContext, activation_gate, install_saa

__all__ = ["DynamicIDPipeline", "SAAContext", "activation_gate", "install_saa", "load"]
