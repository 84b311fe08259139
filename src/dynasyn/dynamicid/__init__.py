"""DynamicID: tuning-free multi-subject personalization (SAA + IMR), arXiv 2503.06505.

``pipe = dynamicid.load(base_pipe, weights)``; ``pipe("<asset0> is jumping", id_images=[crop],
id_classes=["star"])``. See docs/dynamicid.md. Parts: :mod:`.saa` (the attention processor and
its gate), :mod:`.encoder` (ID encoder + resampler), :mod:`.imr` (Identity-Motion
Reconfigurator), :mod:`.train` (anchoring + reconfiguration), :mod:`.pipeline`,
:mod:`.official` (the official checkpoint layout), :mod:`.weights` (our weights directory),
:mod:`.measure` (the micro-world table), :mod:`.cli` (``dynasyn zeroshot``).

The names below are imported on first use, so ``import dynasyn.dynamicid.cli`` (the command
line's parser) stays light.
"""

from __future__ import annotations

from typing import Any

__all__ = ["DynamicIDPipeline", "SAAContext", "activation_gate", "install_saa", "load"]

_WHERE = {"DynamicIDPipeline": "pipeline", "load": "pipeline", "SAAContext": "saa",
          "activation_gate": "saa", "install_saa": "saa"}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        from importlib import import_module

        return getattr(import_module(f"dynasyn.dynamicid.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'dynasyn.dynamicid' has no attribute {name!r}")
