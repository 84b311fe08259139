"""Two CPU processes through accelerate's debug launcher: train, then save each process's weights.

Run in a fresh interpreter by the tests (forking a process whose OpenMP pool is already running
can hang, so the launcher must not fork pytest itself).
"""

import sys
from pathlib import Path


def worker(model: str, scene: str, out: str) -> None:
    from safetensors.torch import save_file

    from dynasyn.config import build_config
    from dynasyn.train import train

    cfg = build_config("dynasyn", overrides=dict(model=model, scene=scene, phase1_steps=2,
                                                 phase2_steps=2, device="cpu"))
    tr = train(cfg, out, progress=False)
    state = {f"unet.{k}": v.contiguous() for k, v in tr.unet.state_dict().items()}
    state["placeholders"] = tr.embedding.detach()[tr.orig_vocab :].contiguous()
    idx, n = tr.acc.process_index, tr.acc.num_processes
    save_file(state, str(Path(out).parent / f"proc{idx}-of-{n}.safetensors"))


if __name__ == "__main__":
    from accelerate import debug_launcher

    debug_launcher(worker, args=tuple(sys.argv[1:4]), num_processes=2)
