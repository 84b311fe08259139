"""Checkpoints: SIGKILL mid-phase + --resume ends bit-identical; two processes stay identical."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file


def _run_cli(args, **kw):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-m", "dynasyn", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def _weights(run: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in ["learned_embeds.safetensors", "unet/diffusion_pytorch_model.safetensors",
              "text_encoder/model.safetensors"]:
        for k, v in load_file(str(run / f)).items():
            out[f"{f}:{k}"] = v
    return out


def test_sigkill_mid_phase_then_resume_is_bit_identical(tiny_model, scene2, tmp_path):
    common = ["train", str(scene2), "--model", str(tiny_model), "--phase1-steps", "4",
              "--phase2-steps", "16", "--checkpoint-every", "2", "--no-progress"]
    ref = _run_cli([*common, "--out", str(tmp_path / "ref")])
    killed = tmp_path / "killed"
    p = _run_cli([*common, "--out", str(killed)])
    target = killed / "checkpoints" / "step-000008" / "state.json"  # phase 2, step 4 of 16
    deadline = time.time() + 240
    while not target.exists() and time.time() < deadline and p.poll() is None:
        time.sleep(0.01)
    assert p.poll() is None, "the run ended before it could be killed: " + p.stdout.read()
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    assert not (killed / "run.json").exists()
    r = _run_cli(["train", "--out", str(killed), "--resume", "--no-progress"])
    out = r.communicate(timeout=300)[0]
    assert r.returncode == 0, out
    assert ref.wait(timeout=300) == 0, ref.stdout.read()
    a, b = _weights(tmp_path / "ref"), _weights(killed)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    # the resumed log continues where the checkpoint was, without duplicate steps
    steps = [int(x.split('"step": ')[1].split(",")[0])
             for x in (killed / "logs" / "losses.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps))


def test_two_processes_end_with_identical_weights(tiny_model, scene2, tmp_path):
    worker = Path(__file__).with_name("mp_worker.py")
    cmd = [sys.executable, str(worker), str(tiny_model), str(scene2), str(tmp_path / "run")]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    a = load_file(str(tmp_path / "proc0-of-2.safetensors"))
    b = load_file(str(tmp_path / "proc1-of-2.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "run" / "run.json").is_file()
