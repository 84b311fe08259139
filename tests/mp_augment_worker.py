"""`dynasyn augment` in two CPU processes (accelerate's debug launcher, fresh interpreter)."""

import json
import sys
from pathlib import Path


def worker(model: str, scene: str, out: str) -> None:
    from accelerate import PartialState

    import dynasyn.augment.pipeline as P

    rendered = []
    real = P.render_item

    def counting(*a, **k):
        rendered.append(a[2].template)
        return real(*a, **k)

    P.render_item = counting
    cfg = P.AugmentConfig(model=model, num_prompts=4, draft_steps=2, gsa_steps=4)
    P.augment(scene, out, cfg, progress=False)
    state = PartialState()
    Path(out, f"proc{state.process_index}.json").write_text(json.dumps(rendered))


if __name__ == "__main__":
    from accelerate import debug_launcher

    debug_launcher(worker, args=tuple(sys.argv[1:4]), num_processes=2)
