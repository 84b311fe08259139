"""The ``dynasyn`` command line.

Bad input is reported as one line ``dynasyn: error: …`` with exit status 2, before anything is
written. Works unchanged under ``accelerate launch -m dynasyn.cli train …``.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

from dynasyn import __version__
from dynasyn.errors import InputError, TrainingError
from dynasyn.presets import PRESET_HELP

TRAIN_EXAMPLES = """examples:
  dynasyn train ../shared/data/scenes/bear --model stabilityai/stable-diffusion-2-1-base \\
      --preset dynasyn --out runs/bear
  dynasyn train scene/ --classes panda bowl --model ./my-sd15 --preset break-a-scene \\
      --out runs/x --lora-rank 8 --checkpoint-every 100
  dynasyn train --out runs/x --resume          # continue a killed run
  dynasyn train photo.jpg --classes cat ball --out runs/y   # masks from the class names (RUN/masks)
  accelerate launch -m dynasyn.cli train scene/ --out runs/x   # several processes/GPUs
  dynasyn train scene/ --model stabilityai/stable-diffusion-2-1-base --set low_vram=true \\
      --estimate-memory                        # expected peak GPU memory; add --out RUN to train

presets:
""" + "\n".join(f"  {k:<18} {v}" for k, v in PRESET_HELP.items())

AUGMENT_EXAMPLES = """examples:
  dynasyn augment ../shared/data/scenes/bear --model stabilityai/stable-diffusion-2-1-base \\
      --out aug/bear --num-prompts 30
  dynasyn augment scene/ --classes rabbit jacket --out aug/x   # a scene without scene.json
  dynasyn augment photo.jpg --classes cat ball --out aug/y      # masks from the class names
  DYNASYN_CHAT_BASE_URL=http://localhost:8000/v1 DYNASYN_CHAT_MODEL=qwen2.5 \\
      dynasyn augment scene/ --provider openai --out aug/x       # any OpenAI-compatible server
  dynasyn augment scene/ --inpainter cv2 --segmenter sam --sam-model ./sam-vit-base --out aug/x
  accelerate launch -m dynasyn.cli augment scene/ --out aug/x   # drafts split over processes
"""

PERSONALIZE_EXAMPLES = """examples:
  dynasyn personalize ../shared/data/scenes/bear --model stabilityai/stable-diffusion-2-1-base \\
      --out runs/bear          # = augment into runs/bear/augmented, then train with L_AUG
"""

EVALUATE_EXAMPLES = """examples:
  dynasyn evaluate runs/bear                      # plain,action,interaction, 4 images each
  dynasyn evaluate runs/bear --prompts interaction --n 8 --seed 1 --out runs/bear/eval-i
  dynasyn evaluate runs/bear --prompt-file my_prompts.txt --clip-model openai/clip-vit-large-patch14
  dynasyn evaluate runs/star_ball --steps 25      # micro-world runs use the world's grammar
  dynasyn evaluate runs/bear --scene other/bear   # score against another copy of the scene

A prompt file has one prompt per line with <asset0>, <asset1>, … ("#" comments allowed);
"action<TAB><asset0> is jumping" puts a line in a category. Writes OUT/metrics.json
(per prompt, per category, overall: mean ± std) and OUT/report.html (default OUT: RUN/eval).
The reference scene is the run's own copy, RUN/scene (runs from before such copies: the scene
path recorded in RUN/config.yaml). ImageReward runs when the image-reward package and its
weights are installed locally.
"""

BENCHMARK_EXAMPLES = """examples:
  dynasyn benchmark ../shared/data/scenes/bear ../shared/data/scenes/toys --out bench \\
      --model stabilityai/stable-diffusion-2-1-base --seeds 0,1 \\
      --presets dynasyn,break-a-scene,dreambooth,textual-inversion,md,md+app,md+act
  dynasyn benchmark scenes/a scenes/b --out bench-micro --phase1-steps 100 --phase2-steps 100 \\
      --n 2 --steps 25 --limit 4 --num-prompts 8 --provider micro     # micro world, small scale
  accelerate launch -m dynasyn.cli benchmark scenes/* --out bench   # cells spread over GPUs
  dynasyn benchmark photos/a photos/b --classes cat dog --out bench  # same classes, every scene

Writes OUT/<scene>/<preset>/seed<k>/{run,eval} (one training + evaluation per cell; presets
with L_AUG share OUT/<scene>/augmented), then OUT/table1.{md,csv} (methods × Plain / Action /
Interaction × IR / CLIP-T / CLIP-I / ID-region) and OUT/table3.{md,csv} (ablations MD, MD+App,
MD+Act, MD+App+Act), mean ± std over scenes and seeds, beside the paper's reported numbers.
Rerun the same command to resume: cells with eval/metrics.json are skipped. --phase1-steps /
--phase2-steps apply to every preset; DB / TI train their one phase for the sum of both.
"""

GENERATE_EXAMPLES = """examples:
  dynasyn generate runs/bear "<asset0> is throwing the <asset1>" -n 4 --seed 0
  dynasyn generate runs/bear "a photo of <asset2> at the beach" --steps 25 --guidance 5
"""


SCENE_HELP = "scene directory: a photo (img.jpg / img.png), mask0.png, mask1.png, … and an " \
    "optional scene.json"


def add_scene_args(p: argparse.ArgumentParser, scene: str = "required") -> None:
    """Add the scene options every scene-taking command shares: they are defined here only.

    ``scene`` says how the scene itself is given: ``required`` / ``optional`` (a positional
    directory), ``many`` (positional directories, ``args.scenes``) or ``option``
    (``--scene DIR``, for commands whose scene has a default). A command passes
    :func:`scene_options` of its parsed arguments to :func:`dynasyn.scene.load_scene` (or to
    what loads the scene for it); a new scene option (e.g. for masks) is added to the
    "scene options" group here and to :func:`scene_options`, and every command has it.
    """
    if scene == "many":
        p.add_argument("scenes", nargs="+", metavar="scene", help=SCENE_HELP + " (one or more)")
    elif scene == "option":
        p.add_argument("--scene", help="the scene directory to use instead of the run's own copy "
                       "(RUN/scene)")
    else:
        p.add_argument("scene", nargs="?" if scene == "optional" else None, help=SCENE_HELP)
    g = p.add_argument_group("scene options")
    g.add_argument("--classes", nargs="+", metavar="NOUN",
                   help="one class noun per mask, in mask order (e.g. --classes rabbit jacket); "
                   "overrides scene.json, needed without one"
                   + ("; the same for every scene" if scene == "many" else "")
                   + ("; default: the run's" if scene == "option" else ""))


def scene_options(args: argparse.Namespace) -> dict[str, Any]:
    """The scene options of parsed arguments, as :func:`~dynasyn.scene.load_scene` keywords."""
    return {"classes": list(args.classes) if args.classes else None}


def _add_train_args(p: argparse.ArgumentParser, out_required: bool = True) -> None:
    add_scene_args(p, scene="optional")
    p.add_argument("--model", help="diffusers SD 1.x/2.x or SDXL pipeline: local dir, hub id, "
                   "or 'micro' (default)")
    p.add_argument("--preset", help="training preset (default: dynasyn)")
    p.add_argument("--out", required=out_required, help="run directory to write (self-contained: "
                   "it keeps a copy of the scene in RUN/scene)")
    p.add_argument("--config", help="YAML config file (values override the preset)")
    p.add_argument("--augmented", help="augmented directory for L_AUG (from `dynasyn augment`)")
    p.add_argument("--phase1-steps", type=int)
    p.add_argument("--phase2-steps", type=int)
    p.add_argument("--lora-rank", type=int, help="phase 2 trains LoRA adapters of this rank")
    p.add_argument("--checkpoint-every", type=int, help="write a resumable checkpoint every K steps")
    p.add_argument("--seed", type=int)
    p.add_argument("--device", help="auto (default), cpu, cuda, cuda:1, mps")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="any config value, e.g. --set lambda_ica=1e-3 (repeatable)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _add_augment_args(p: argparse.ArgumentParser, with_model: bool = True) -> None:
    if with_model:
        p.add_argument("--model", default="micro", help="diffusers SD or SDXL pipeline (default micro)")
    p.add_argument("--num-prompts", type=int, default=30, help="augmented items (paper: 30)")
    p.add_argument("--provider", default="template",
                   choices=["template", "micro", "openai", "local"],
                   help="prompt generator (Step 2); micro = the micro world's grammar")
    p.add_argument("--describer", default="scene", choices=["scene", "openai", "local"],
                   help="noun phrases (Step 1): scene.json, a chat endpoint, or a local model")
    p.add_argument("--segmenter", default="attention", choices=["attention", "sam"])
    p.add_argument("--inpainter", default="diffusion", choices=["diffusion", "cv2", "sd-inpaint"])
    p.add_argument("--strength", type=float, default=0.7, help="GSA noise strength (paper 0.7)")
    p.add_argument("--draft-steps", type=int, default=25)
    p.add_argument("--gsa-steps", type=int, default=50,
                   help="GSA schedule length; int(steps x strength) steps run (50 -> 35; "
                   "--gsa-sampler sde --gsa-steps 1000 -> the paper's 700)")
    p.add_argument("--gsa-sampler", default="ddim", choices=["ddim", "sde"],
                   help="GSA's reverse process: ddim (deterministic, default) or sde "
                   "(stochastic DDPM sampling, the paper's SDE); docs/augmentation.md")
    p.add_argument("--final-masks", default="pasted", choices=["pasted", "resegment"],
                   help="L_AUG masks: the pasted subjects' (default) or each subject segmented "
                   "again in the image after GSA (attention, or SAM when --sam-model is given)")
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--aug-seed", type=int, default=0)
    p.add_argument("--sam-model", help="transformers SamModel directory (--segmenter sam)")
    p.add_argument("--inpaint-model", help="SD inpainting pipeline (--inpainter sd-inpaint)")
    p.add_argument("--local-model", help="transformers text model path (--provider local)")
    p.add_argument("--local-vlm", help="transformers image-text-to-text model (--describer local)")
    p.add_argument("--chat-base-url", help="OpenAI-compatible base URL (env DYNASYN_CHAT_BASE_URL)")
    p.add_argument("--chat-model", help="chat model name (env DYNASYN_CHAT_MODEL)")


def _augment_config(args: argparse.Namespace, model: str | None):
    from dynasyn.augment.pipeline import AugmentConfig

    return AugmentConfig(
        model=model or "micro", num_prompts=args.num_prompts, provider=args.provider,
        describer=args.describer, segmenter=args.segmenter, inpainter=args.inpainter,
        strength=args.strength, draft_steps=args.draft_steps, gsa_steps=args.gsa_steps,
        gsa_sampler=args.gsa_sampler, final_masks=args.final_masks,
        guidance=args.guidance, seed=args.aug_seed, sam_model=args.sam_model,
        inpaint_model=args.inpaint_model, local_model=args.local_model, local_vlm=args.local_vlm,
    ).validate()


def _chat_client(args: argparse.Namespace):
    if "openai" not in (args.provider, args.describer):
        return None
    from dynasyn.augment.chat import ChatClient

    return ChatClient(base_url=args.chat_base_url, model=args.chat_model)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dynasyn",
        description="DynASyn: personalize a Stable Diffusion model to several subjects of one "
        "photo, then render them doing new actions and interacting.",
    )
    parser.add_argument("--version", action="version", version=f"dynasyn {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    fmt = argparse.RawDescriptionHelpFormatter
    p = sub.add_parser("train", help="personalize a model to a scene", epilog=TRAIN_EXAMPLES,
                       formatter_class=fmt)
    _add_train_args(p, out_required=False)
    p.add_argument("--estimate-memory", action="store_true", help="print the run's expected peak "
                   "GPU memory per phase and exit (trains and writes nothing; docs/low-vram.md)")
    a = sub.add_parser("augment", help="prompt-and-image augmentation (paper Steps 1-4)",
                       epilog=AUGMENT_EXAMPLES, formatter_class=fmt)
    add_scene_args(a)
    a.add_argument("--out", required=True, help="augmented directory (resumable)")
    _add_augment_args(a)
    a.add_argument("--no-progress", action="store_true", help="no progress bar")
    pz = sub.add_parser("personalize", help="augment + train in one go",
                        epilog=PERSONALIZE_EXAMPLES, formatter_class=fmt)
    _add_train_args(pz)
    _add_augment_args(pz, with_model=False)
    d = sub.add_parser("demo", help="the whole method on the bundled micro model (offline)",
                       epilog="examples:\n  dynasyn demo\n  dynasyn demo --out /tmp/demo --overwrite",
                       formatter_class=fmt)
    d.add_argument("--out", default="dynasyn-demo", help="output directory (default dynasyn-demo)")
    d.add_argument("--model", default="micro", help=argparse.SUPPRESS)
    d.add_argument("--steps", type=int, help="steps per phase (default 100)")
    d.add_argument("-n", "--num-images", type=int, default=2)
    d.add_argument("--overwrite", action="store_true")
    d.add_argument("--no-progress", action="store_true")
    g = sub.add_parser("generate", help="render prompts with a trained run",
                       epilog=GENERATE_EXAMPLES, formatter_class=fmt)
    g.add_argument("run", help="run directory written by `dynasyn train`")
    g.add_argument("prompts", nargs="+", help="prompts using <asset0>, <asset1>, …")
    g.add_argument("-n", "--num-images", type=int, default=4)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--steps", type=int, default=50, help="DDIM steps (default 50)")
    g.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale")
    g.add_argument("--negative-prompt")
    g.add_argument("--mean-shift", type=float, default=0.0, metavar="GAMMA",
                   help="MuDI's initial noise: its mean moved by GAMMA x the latent of the "
                   "prompt's subjects cut out of the run's scene and pasted at random (default 0: off)")
    g.add_argument("--out", help="output directory (default RUN/generated)")
    g.add_argument("--device", default="auto")
    g.add_argument("--no-progress", action="store_true")
    ev = sub.add_parser("evaluate", help="score a run: CLIP-I / CLIP-T / identity, report.html",
                        epilog=EVALUATE_EXAMPLES, formatter_class=fmt)
    ev.add_argument("run", help="run directory written by `dynasyn train`")
    which = ev.add_mutually_exclusive_group()
    which.add_argument("--prompts", default="plain,action,interaction",
                       help="comma-separated prompt categories (default: all three)")
    which.add_argument("--prompt-file", help="file of prompts with <assetN> placeholders")
    ev.add_argument("-n", "--n", dest="n", type=int, default=4, help="images per prompt (default 4)")
    ev.add_argument("--seed", type=int, default=0, help="first seed (images use seed…seed+n-1)")
    ev.add_argument("--steps", type=int, default=50, help="DDIM steps (default 50)")
    ev.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale")
    ev.add_argument("--limit", type=int, default=10, help="prompts per category (default 10)")
    ev.add_argument("--mean-shift", type=float, default=0.0, metavar="GAMMA",
                    help="render the run's images from MuDI's mean-shifted noise, as generate "
                    "--mean-shift does (the text ceiling keeps plain noise; default 0: off)")
    ev.add_argument("--clip-model", default="micro",
                    help="CLIP for the metrics: micro (bundled, default), a directory or hub id")
    ev.add_argument("--dino-model", help="optional DINO/ViT directory or hub id for DINO scores")
    ev.add_argument("--no-ceiling", action="store_true",
                    help="micro-world runs: skip the text ceiling (the base model prompted with "
                    "the subjects' identity phrases, scored by the same exact metrics)")
    ev.add_argument("--ceiling-cache", metavar="DIR",
                    help="directory of text-ceiling images to reuse and add to")
    add_scene_args(ev, scene="option")
    ev.add_argument("--out", help="output directory (default RUN/eval; a previous evaluation "
                    "there is replaced)")
    ev.add_argument("--device", default="auto")
    ev.add_argument("--no-progress", action="store_true")
    bm = sub.add_parser("benchmark", help="train + evaluate presets on scenes; paper's tables",
                        epilog=BENCHMARK_EXAMPLES, formatter_class=fmt)
    add_scene_args(bm, scene="many")
    bm.add_argument("--presets", default=",".join(PRESET_HELP),
                    help="comma-separated presets (default: all: %(default)s)")
    bm.add_argument("--seeds", default="0", help="comma-separated training seeds (default 0)")
    bm.add_argument("--out", required=True, help="benchmark directory (rerun to resume)")
    bm.add_argument("--model", default="micro",
                    help="base model: micro (bundled, default), a pipeline directory or hub id")
    bm.add_argument("--phase1-steps", type=int, help="phase-1 steps of every run")
    bm.add_argument("--phase2-steps", type=int, help="phase-2 steps of every run")
    bm.add_argument("--set", action="append", metavar="KEY=VALUE",
                    help="any other training config value, for every run (repeatable)")
    bm.add_argument("-n", "--n", dest="n", type=int, default=4,
                    help="evaluation images per prompt (default 4)")
    bm.add_argument("--steps", type=int, default=50, help="evaluation DDIM steps (default 50)")
    bm.add_argument("--limit", type=int, default=10,
                    help="evaluation prompts per category (default 10)")
    bm.add_argument("--eval-seed", type=int, default=0,
                    help="first evaluation seed, the same for every cell (default 0)")
    bm.add_argument("--clip-model", default="micro",
                    help="CLIP for the metrics: micro (bundled, default), a directory or hub id")
    bm.add_argument("--no-ceiling", action="store_true",
                    help="micro-world scenes: skip the text ceiling (computed once per scene "
                    "otherwise, cached in OUT/ceiling_cache)")
    bm.add_argument("--num-prompts", type=int, default=30,
                    help="augmented prompts per scene for presets with L_AUG (default 30)")
    bm.add_argument("--provider", default="template", choices=["template", "micro"],
                    help="augmentation prompt provider (default template)")
    bm.add_argument("--shard", type=_shard, metavar="K/N",
                    help="run only the scenes with index K modulo N, for N independent calls "
                    "on the same --out (several per GPU, or one per machine); no tables: a "
                    "last call without --shard, or with --report-only, writes them")
    bm.add_argument("--report-only", action="store_true",
                    help="train nothing; write the tables from the cells finished so far")
    bm.add_argument("--device", default="auto")
    bm.add_argument("--no-progress", action="store_true")
    from dynasyn.dynamicid.cli import add_parser as add_zeroshot_parser

    add_zeroshot_parser(sub, add_scene_args)
    from dynasyn.export import add_parser as add_export_parser

    add_export_parser(sub)
    from dynasyn.classmasks.cli import add_parser as add_masks_parser

    add_masks_parser(sub)
    from dynasyn.ui.cli import add_parser as add_ui_parser

    add_ui_parser(sub)
    return parser


def cmd_train(args: argparse.Namespace, allow_existing: bool = False) -> int:
    from dynasyn.config import build_config, load_config, parse_set
    from dynasyn.train import train

    if getattr(args, "estimate_memory", False):
        from dynasyn.memory import cmd_estimate_memory

        return cmd_estimate_memory(args)
    if not args.out:
        raise InputError("--out is required: the run directory to write")
    out = Path(args.out)
    if args.resume:
        if not (out / "config.yaml").is_file():
            raise InputError(f"cannot resume: {out} has no config.yaml; start a new run instead")
        cfg = load_config(out / "config.yaml")
    else:
        if not args.scene:
            raise InputError("no scene given: pass a scene directory (or --resume with --out RUN)")
        from dynasyn.classmasks.cli import prepare_photo_run

        allow_existing = prepare_photo_run(args, out) or allow_existing  # a photo: RUN/masks
        overrides = parse_set(args.set)
        options = dict(  # given options win over --set; an option left out keeps --set's value
            scene=str(Path(args.scene)),
            model=args.model,
            preset=args.preset,
            classes=scene_options(args)["classes"],
            augmented=args.augmented,
            phase1_steps=args.phase1_steps,
            phase2_steps=args.phase2_steps,
            lora_rank=args.lora_rank,
            checkpoint_every=args.checkpoint_every,
            seed=args.seed,
            device=args.device,
        )
        overrides.update({k: v for k, v in options.items() if v is not None})
        cfg = build_config(args.preset or "dynasyn", args.config, overrides)
        if args.augmented and not Path(args.augmented).is_dir():
            raise InputError(f"augmented directory {args.augmented} does not exist; check the path")
    trainer = train(cfg, out, resume=args.resume, overwrite=args.overwrite,
                    progress=not args.no_progress, allow_existing=allow_existing)
    if trainer.acc.is_main_process:
        _print_run_written(out, trainer.n)
    return 0


def _print_run_written(run: Path, n_subjects: int) -> None:
    """Where a finished run is and what to do with it."""
    prompt = "<asset0> is next to <asset1>" if n_subjects > 1 else "a photo of <asset0>"
    print(f"run written to {run} (weights, run.json; its scene copy in {run / 'scene'})")
    print(f'next: dynasyn generate {run} "{prompt}"   or   dynasyn evaluate {run}')


def cmd_generate(args: argparse.Namespace) -> int:
    from dynasyn.generate import check_placeholders, generate_images, load_run, read_run, run_scene

    info = read_run(args.run)
    for prompt in args.prompts:
        check_placeholders(prompt, info["placeholders"])
    if args.num_images < 1 or args.steps < 1:
        raise InputError("-n and --steps must be >= 1")
    scene = run_scene(args.run) if args.mean_shift else None
    pipe = load_run(args.run, device=args.device)
    out = Path(args.out) if args.out else Path(args.run) / "generated"
    paths = generate_images(pipe, args.prompts, out, n=args.num_images, seed=args.seed,
                            steps=args.steps, guidance=args.guidance,
                            negative_prompt=args.negative_prompt, progress=not args.no_progress,
                            mean_shift=args.mean_shift, scene=scene)
    grids = [p for p in paths if p.name.endswith("_grid.png")]
    print(f"wrote {len(paths) - len(grids)} images and {len(grids)} grid(s) to {out}")
    return 0


def cmd_augment(args: argparse.Namespace) -> int:
    from dynasyn.augment.pipeline import augment

    cfg = _augment_config(args, args.model)
    from dynasyn.classmasks.cli import scene_from_photo

    scene_from_photo(args, Path(args.out) / "scene")  # a photo: masks from --classes
    out = augment(args.scene, args.out, cfg, client=_chat_client(args),
                  progress=not args.no_progress, **scene_options(args))
    print(f"augmented items written to {out} (contact sheets in {out}/cache/*/sheet.png)")
    print(f"next: dynasyn train {args.scene} --augmented {out} --out RUN"
          + (f" --classes {' '.join(args.classes)}" if args.classes else ""))
    return 0


def cmd_personalize(args: argparse.Namespace) -> int:
    from dynasyn.augment.pipeline import augment
    from dynasyn.models import resolve_model
    from dynasyn.rundir import prepare_run_dir
    from dynasyn.scene import load_scene

    out = Path(args.out)
    if args.resume and (out / "config.yaml").is_file():
        return cmd_train(args)  # augmentation finished: continue training
    if not args.scene:
        raise InputError("no scene given: pass a scene directory")
    from dynasyn.classmasks.cli import prepare_photo_run

    photo = prepare_photo_run(args, out)  # a photo: masks from --classes into RUN/masks
    if not args.resume and not photo:
        prepare_run_dir(out, args.overwrite, False)
    cfg = _augment_config(args, args.model)
    load_scene(args.scene, **scene_options(args))  # refuse a bad scene before deleting anything
    resolve_model(cfg.model)
    if args.overwrite and out.exists():
        import shutil

        shutil.rmtree(out)
    aug = augment(args.scene, out / "augmented", cfg, client=_chat_client(args),
                  progress=not args.no_progress, **scene_options(args))
    print(f"augmented items written to {aug} (contact sheets in {aug}/cache/*/sheet.png)")
    args.augmented = str(aug)
    args.overwrite = False
    args.resume = False
    return cmd_train(args, allow_existing=True)


def cmd_evaluate(args: argparse.Namespace) -> int:
    from dynasyn.evaluate import evaluate
    from dynasyn.evaluate.report import summary_table

    if args.limit is not None and args.limit < 1:
        raise InputError("--limit must be >= 1")
    result = evaluate(
        args.run,
        categories=args.prompts,
        prompt_file=args.prompt_file,
        n=args.n,
        seed=args.seed,
        steps=args.steps,
        guidance=args.guidance,
        clip_model=args.clip_model,
        out=args.out,
        device=args.device,
        progress=not args.no_progress,
        limit=args.limit,
        scene=args.scene,
        dino_model=args.dino_model,
        ceiling=not args.no_ceiling,
        ceiling_cache=args.ceiling_cache,
        mean_shift=args.mean_shift,
        **scene_options(args),
    )
    print(summary_table(result))
    for note in result["notes"]:
        print(f"note: {note}")
    out = Path(result["out"])
    print(f"wrote {out / 'metrics.json'} and {out / 'report.html'}")
    return 0


def _shard(text: str) -> tuple[int, int]:
    """``K/N`` -> ``(K, N)`` for ``benchmark --shard``."""
    try:
        k, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not K/N (e.g. 0/4)") from None
    if not (n >= 1 and 0 <= k < n):
        raise argparse.ArgumentTypeError(f"{text!r}: need 0 <= K < N (e.g. 0/4)")
    return k, n


def cmd_benchmark(args: argparse.Namespace) -> int:
    from dynasyn.config import parse_set
    from dynasyn.evaluate.benchmark import run_benchmark

    overrides = parse_set(args.set)
    overrides.update({k: v for k, v in (("phase1_steps", args.phase1_steps),
                                        ("phase2_steps", args.phase2_steps),
                                        ("device", None if args.device == "auto" else args.device))
                      if v is not None})
    result = run_benchmark(
        args.scenes,
        args.presets,
        args.seeds,
        args.out,
        model=args.model,
        train_overrides=overrides,
        eval_kwargs=dict(n=args.n, steps=args.steps, limit=args.limit, seed=args.eval_seed,
                         clip_model=args.clip_model, device=args.device,
                         **({"ceiling": False} if args.no_ceiling else {})),
        augment_kwargs=dict(num_prompts=args.num_prompts, provider=args.provider),
        progress=not args.no_progress,
        shard=args.shard,
        report_only=args.report_only,
        **scene_options(args),
    )
    if args.shard is not None and not args.report_only:
        failed = [c for c in result["cells"] if c["status"].startswith("failed")]
        for c in failed:
            print(f"dynasyn: cell {c['dir']} {c['status']}", file=sys.stderr)
        print(f"shard {args.shard[0]}/{args.shard[1]} done in {result['out']}; write the "
              "tables with the same command without --shard (or with --report-only)")
        return 1 if failed else 0
    if not result["main_process"]:
        return 0
    finished = len(result["cells"]) - len(result["missing"])
    print(f"{finished} of {len(result['cells'])} cells finished in {result['out']} "
          "(SCENE/PRESET/seedK/{run,eval}); tables:")
    for f in result["files"]:
        print(f"  {f}")
    for m in result["missing"]:
        print(f"dynasyn: cell without results: {m}", file=sys.stderr)
    return 1 if result["missing"] else 0


def cmd_demo(args: argparse.Namespace) -> int:
    from dynasyn.demo import run_demo

    run_demo(args.out, model=args.model, n=args.num_images, steps=args.steps,
             overwrite=args.overwrite, progress=not args.no_progress)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from dynasyn.export import run

    return run(args)


def cmd_masks(args: argparse.Namespace) -> int:
    from dynasyn.classmasks.cli import run

    return run(args)


def cmd_ui(args: argparse.Namespace) -> int:
    from dynasyn.ui.cli import run

    return run(args)


def cmd_zeroshot(args: argparse.Namespace) -> int:
    from dynasyn.dynamicid.cli import run

    return run(args)


COMMANDS = {"demo": cmd_demo, "train": cmd_train, "generate": cmd_generate, "augment": cmd_augment,
            "personalize": cmd_personalize, "evaluate": cmd_evaluate, "benchmark": cmd_benchmark,
            "zeroshot": cmd_zeroshot, "export": cmd_export, "masks": cmd_masks, "ui": cmd_ui}


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="dynasyn: %(message)s")
    from dynasyn.models import quiet_libraries

    quiet_libraries()
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except InputError as e:
        print(f"dynasyn: error: {e}", file=sys.stderr)
        return 2
    except TrainingError as e:
        print(f"dynasyn: training stopped: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("dynasyn: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
