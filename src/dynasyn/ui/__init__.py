"""``dynasyn ui``: the whole workflow in a browser (Gradio; ``pip install -e ".[ui]"``).

photo → masks (uploaded, brushed or from class names) → augmentation preview → training with
live progress → generation gallery → evaluation, on the project's own functions:

- :mod:`.paths`: run names from the browser, each a folder directly under ``--runs-dir``;
- :mod:`.uploads`: checks of uploaded photos and masks, and the scene they make;
- :mod:`.jobs`: one background job at a time (augment / train / evaluate), each in its own
  process (:mod:`.worker`), queued, cancellable, its failure reported as one line;
- :mod:`.callbacks`: what every button does, as plain functions (tested without a browser);
- :mod:`.app`: the Gradio page wiring them; :mod:`.cli`: the ``dynasyn ui`` command.

Gradio is imported only by :mod:`.app` and :mod:`.cli`'s launcher, so the rest works (and is
tested) without it. Security choices and the flow: docs/ui.md.
"""
