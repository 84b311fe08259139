"""The two-phase DynASyn trainer on accelerate (one trainer for every preset).

Phase 1 trains only the placeholder rows of the token-embedding table; phase 2 trains the
placeholder rows + text encoder + UNet (full), or LoRA adapters on both (``lora_rank > 0``).
Every step: union sampling, L_MD + L_M2A on the scene, L_ICA against the class-noun prior
(stop-gradient, early-stopped attention-only pass), and L_AUG on one augmented item as a
separate backward pass (gradients accumulate; the two graphs are never alive together).
With ``prior_preservation`` (the ``break-a-scene`` preset), phase 2 adds Break-a-Scene's prior
loss: the unmasked diffusion loss on one cached class image per step, weight
``prior_loss_weight``, also a separate backward pass (in phase 1 its gradient on the
placeholder rows is exactly zero, so it is not computed there). With ``segmix_prob`` (the
``mudi`` preset), a scene item is MuDI's Seg-Mix composition instead of the scene, with the
pasted subjects' masks (:mod:`dynasyn.segmix`).

Determinism: each step's randomness is derived from (seed, step, process), and checkpoints hold
weights and optimizer state, so a resumed run ends bit-identical to an uninterrupted one on CPU.
Multi-process (``accelerate launch``): every process draws its own samples and gradients are
averaged with ``accelerator.reduce`` before each optimizer step, so all processes hold identical
weights (no DDP wrapper: the set of trainable parameters changes between the phases).

What the run directory holds and how it is written (checkpoints, loss log, weights,
``run.json``, the scene copy) lives in :mod:`dynasyn.rundir`.
"""

from __future__ import annotations

import copy
import itertools
import logging
import math
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from dynasyn.attention import (
    HALF_STORED,
    attention_only_copy,
    capturing,
    get_store,
    install_attention_capture,
    keep_capture_layers_unchecked,
    resolve_downsample,
    store_weights_as,
)
from dynasyn.augment.data import AugItem, load_augmented
from dynasyn.class_images import ensure_class_images, load_class_images
from dynasyn.config import TrainConfig
from dynasyn.errors import InputError, TrainingError
from dynasyn.losses import (
    aug_loss,
    ica_loss,
    m2a_loss,
    masked_diffusion_loss,
    prior_preservation_loss,
    resize_masks,
    total_loss,
)
from dynasyn.lowvram import optimizer_class
from dynasyn.models import load_pipeline, resolve_model
from dynasyn.rundir import (
    EMBEDS,
    LORA_FILE,
    RUN_INFO,
    append_log,
    last_checkpoint_note,
    prepare_run_dir,
    resolved_config,
    restore_checkpoint,
    resume_point,
    save_checkpoint,
    save_outputs,
    start_run,
    trim_log,
)
from dynasyn.sampling import flip_coin, sample_union, step_generator, step_rng
from dynasyn.scene import Scene, load_scene
from dynasyn.sdxl import Conditioning, cat_conditioning, encode_ids, is_xl
from dynasyn.segmix import seg_mix
from dynasyn.tokens import (
    EncodedPrompt,
    add_placeholders,
    encode_template,
    placeholder,
    token_weights,
    union_template,
)

log = logging.getLogger("dynasyn")

UNET_LORA_TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]
TE_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]
CLASS_PROMPT_LIMIT = 512
"""At most this many distinct class prompts are encoded up front in full phase 2 (efficient
mode), so that the frozen prior needs no text-encoder copy; more keep the copy."""


@dataclass
class _Latents:
    mean: torch.Tensor  # (1, 4, h, w)
    std: torch.Tensor


class Trainer:
    """Holds the models, the cached scene/augmented latents and runs both phases."""

    def __init__(
        self,
        cfg: TrainConfig,
        out_dir: str | Path,
        scene: Scene | None = None,
        accelerator: Accelerator | None = None,
        progress: bool = True,
    ):
        self.cfg = cfg
        self.out = Path(out_dir)
        self.progress = progress
        self.acc = accelerator or make_accelerator(cfg)
        self.device = self.acc.device
        self.scene = scene or load_scene(cfg.scene, classes=cfg.classes or None)
        self.classes = [s.class_noun for s in self.scene.subjects]
        self.n = len(self.classes)

        torch.manual_seed(cfg.seed)
        pipe = load_pipeline(cfg.model)
        self.base_model = resolve_model(cfg.model)
        vae_factor = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
        self.resolution = cfg.resolution or pipe.unet.config.sample_size * vae_factor
        self.class_dir = self._class_images(pipe)  # rendered by the untouched base model
        self.tokenizer = pipe.tokenizer
        self.text_encoder = pipe.text_encoder
        self.xl = is_xl(pipe)  # SDXL: a second tokenizer and text encoder (dynasyn.sdxl)
        self.tokenizer_2 = pipe.tokenizer_2 if self.xl else None
        self.text_encoder_2 = pipe.text_encoder_2 if self.xl else None
        self.vae = pipe.vae
        self.unet = pipe.unet
        from diffusers import DDPMScheduler

        self.scheduler_config = dict(pipe.scheduler.config)
        self.noise_scheduler = DDPMScheduler.from_config(self.scheduler_config)
        self.prediction_type = self.noise_scheduler.config.prediction_type

        self.orig_vocab = len(self.tokenizer)
        phrases = list(cfg.phrases) or [s.phrase for s in self.scene.subjects]
        init = phrases if cfg.placeholder_init == "phrase" else None
        self.placeholder_ids = add_placeholders(
            self.tokenizer, self.text_encoder, self.classes, vectors=cfg.placeholder_vectors,
            init_texts=init,
        )
        if self.xl:  # the same tokens (same ids: shared BPE vocabulary) in the second encoder
            ids_2 = add_placeholders(self.tokenizer_2, self.text_encoder_2, self.classes,
                                     vectors=cfg.placeholder_vectors, init_texts=init)
            if ids_2 != self.placeholder_ids:
                raise InputError("the SDXL model's two tokenizers have different vocabularies; "
                                 "use a model whose tokenizers share CLIP's BPE vocabulary")
        for m in (self.vae, self.unet, *self.text_encoders):
            m.requires_grad_(False)
        try:
            self.downsample = resolve_downsample(self.unet, cfg.attention_downsample)
        except ValueError as e:
            raise InputError(str(e)) from None
        if cfg.low_vram:  # PyTorch SDPA everywhere the capture layers do not need the maps
            from diffusers.models.attention_processor import AttnProcessor2_0

            self.unet.set_attn_processor(AttnProcessor2_0())
        self.store = install_attention_capture(self.unet, self.downsample)
        self.vae.to(self.device)
        self.unet.to(self.device)
        for te in self.text_encoders:
            te.to(self.device)
        self.unet_half = self._store_frozen_unet_half()
        if cfg.gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
            keep_capture_layers_unchecked(self.unet)  # their maps are captured once, exactly
            for te in self.text_encoders:
                te.gradient_checkpointing_enable()

        self.lambdas = dict(cfg.lambdas)
        image, masks = self.scene.tensors(self.resolution)
        self.scene_images = {f: image.flip(-1) if f else image for f in (False, True)}
        self.scene_latents = {f: self._encode(self.scene_images[f]) for f in (False, True)}
        self.latent_size = self.scene_latents[False].mean.shape[-1]
        self.att_size = self.latent_size // self.downsample
        self.masks_lat = {
            f: resize_masks(masks.flip(-1) if f else masks, self.latent_size) for f in (False, True)
        }
        self.masks_att = {
            f: resize_masks(masks.flip(-1) if f else masks, self.att_size) for f in (False, True)
        }
        self.masks_full = {f: masks.flip(-1) if f else masks for f in (False, True)}
        self.aug: list[AugItem] = []
        self.aug_latents: list[_Latents] = []
        if self.lambdas["aug"] > 0:
            if cfg.augmented:
                self.aug = load_augmented(cfg.augmented, self.n, self.resolution)
                self.aug_latents = [self._encode(it.image) for it in self.aug]
            else:
                log.warning(
                    "L_AUG is off: no augmented directory was given "
                    "(run `dynasyn augment` first or use `dynasyn personalize`)"
                )
                self.lambdas["aug"] = 0.0
        self.class_latents: list[_Latents] = []
        if self.class_dir is not None:
            pixels = load_class_images(self.class_dir, cfg.num_class_images, self.resolution)
            self.class_latents = [self._encode(im) for im in pixels]
            self.class_prompt_ids = self.tokenizer(
                cfg.class_prompt, padding="max_length", truncation=True,
                max_length=self.tokenizer.model_max_length, return_tensors="pt").input_ids
        self.class_cache: dict[tuple[int, ...], torch.Tensor] = {}
        self.phase = 0
        self.optimizer: torch.optim.Optimizer | None = None
        self.params: list[torch.nn.Parameter] = []
        self.prior_unet = None
        self.prior_te = None
        self.lora = cfg.lora_rank > 0
        self._warned = [False]  # the 8-bit optimizer's fallback warning, once per run

    # ------------------------------------------------------------------ setup helpers
    def _class_images(self, pipe) -> Path | None:
        """Render (or find cached) the class images of prior preservation; None when off.

        Every process renders its share of the missing images, then all wait for the rest.
        """
        cfg = self.cfg
        if not (cfg.prior_preservation and cfg.prior_loss_weight > 0 and cfg.phase2_steps > 0):
            return None
        pipe.to(self.device)
        d = ensure_class_images(pipe, self.base_model, cfg.class_prompt, cfg.num_class_images,
                                self.resolution, cfg.class_data_dir,
                                process=self.acc.process_index,
                                num_processes=self.acc.num_processes,
                                progress=self.progress and self.acc.is_local_main_process)
        self.acc.wait_for_everyone()
        return d

    def _store_frozen_unet_half(self) -> bool:
        """Keep the UNet's linear and convolution weights in the autocast dtype when the run
        never trains them (LoRA or embeddings only) and ``prior_dtype`` is that dtype (auto).

        The frozen UNet is then the frozen prior itself, and autocast would cast those
        weights at every call anyway, so every pass computes bit-identical values with about
        half the UNet's memory. :meth:`_restore_unet_weights` puts the fp32 weights back
        after training, for sampling outside autocast.
        """
        cfg = self.cfg
        autocast = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(cfg.mixed_precision)
        frozen = cfg.lora_rank > 0 or cfg.phase2_steps == 0
        if autocast is None or not frozen or self.prior_dtype != autocast:
            return False
        store_weights_as(self.unet, autocast)
        return True

    def _restore_unet_weights(self) -> None:
        """The base model's fp32 UNet weights back into the layers stored in half precision
        (read again from the model files: they are exactly the weights the run started from)."""
        from diffusers import UNet2DConditionModel

        base = UNet2DConditionModel.from_pretrained(self.base_model, subfolder="unet").state_dict()
        with torch.no_grad():
            for name, m in self.unet.named_modules():
                if isinstance(m, HALF_STORED) and "lora_" not in name:
                    key = name.replace(".base_layer", "")
                    for pname, p in m.named_parameters(recurse=False):
                        p.data = base[f"{key}.{pname}"].to(self.device)
        self.unet_half = False

    @torch.no_grad()
    def _encode(self, image: torch.Tensor) -> _Latents:
        dist = self.vae.encode(image[None].to(self.device, self.vae.dtype)).latent_dist
        return _Latents(dist.mean.float(), dist.std.float())

    @property
    def text_encoders(self) -> tuple:
        """The text encoder(s) being trained: one, or SDXL's two."""
        return (self.text_encoder, self.text_encoder_2) if self.xl else (self.text_encoder,)

    @property
    def embedding(self) -> torch.nn.Parameter:
        """The (first) text encoder's token-embedding table."""
        return self.text_encoder.get_input_embeddings().weight

    @property
    def embeddings(self) -> list[torch.nn.Parameter]:
        """Every text encoder's token-embedding table (the placeholder rows train in each)."""
        return [te.get_input_embeddings().weight for te in self.text_encoders]

    def _setup_phase(self, phase: int) -> None:
        cfg = self.cfg
        self.phase = phase
        embs = self.embeddings
        for emb in embs:
            emb.requires_grad_(True)
        if phase == 1:
            groups = [{"params": embs, "lr": cfg.phase1_lr}]
        else:
            if cfg.prior_model == "frozen" and not self.lora:
                # the prior is the model as it was before phase 2 (UNet and text encoder
                # untouched by phase 1 except placeholder rows, which class prompts never use)
                self._freeze_prior()
            if self.lora:
                from peft import LoraConfig

                torch.manual_seed(cfg.seed + 1)
                r = cfg.lora_rank
                self.unet.add_adapter(
                    LoraConfig(r=r, lora_alpha=r, init_lora_weights="gaussian",
                               target_modules=UNET_LORA_TARGETS)
                )
                lora_params = [p for p in self.unet.parameters() if p.requires_grad]
                if cfg.train_text_encoder:
                    for te in self.text_encoders:
                        te.add_adapter(
                            LoraConfig(r=r, lora_alpha=r, init_lora_weights="gaussian",
                                       target_modules=TE_LORA_TARGETS)
                        )
                        lora_params += [p for n, p in te.named_parameters() if "lora_" in n]
                for p in lora_params:
                    p.data = p.data.float()
                for emb in embs:  # peft's add_adapter froze every non-LoRA weight
                    emb.requires_grad_(True)
                groups = [
                    {"params": lora_params, "lr": cfg.lora_lr},
                    {"params": embs, "lr": cfg.phase2_lr},
                ]
            else:
                self.unet.requires_grad_(True)
                te_params = []
                for te, emb in zip(self.text_encoders, embs, strict=True):
                    te.requires_grad_(cfg.train_text_encoder)
                    emb.requires_grad_(True)
                    te_params += [p for p in te.parameters() if p.requires_grad]
                groups = [{"params": list(self.unet.parameters()) + te_params,
                           "lr": cfg.phase2_lr}]
            self.unet.train()
            for te in self.text_encoders:
                te.train()
        opt_cls = optimizer_class(cfg.optimizer, cfg.use_8bit_adam, self.device, self._warned)
        self.optimizer = opt_cls(
            groups,
            betas=(cfg.adam_beta1, cfg.adam_beta2),
            eps=cfg.adam_epsilon,
            weight_decay=cfg.weight_decay,
        )
        self.params = [p for g in groups for p in g["params"]]

    def _freeze_prior(self) -> None:
        """Keep the model as it is now as the frozen prior of phase 2 (full fine-tuning).

        Nothing is kept when no loss term reads the prior (no L_ICA, no L_AUG).
        Straightforward (``efficient: false``): deep copies of the UNet and the text encoder.
        Efficient: the UNet copy holds only what the early-stopped attention passes run
        (:func:`~dynasyn.attention.attention_only_copy`), and the text encoder is not copied
        at all when the class prompts the run can use are few enough
        (:data:`CLASS_PROMPT_LIMIT`) to encode them all now; their embeddings are exactly the
        ones the copy would give.
        """
        if self.lambdas["ica"] <= 0 and self.lambdas["aug"] <= 0:
            return  # nothing reads the prior (Break-a-Scene, DreamBooth, TI, MD)
        if not self.cfg.efficient:
            self.prior_unet = copy.deepcopy(self.unet).requires_grad_(False)
            self.prior_te = self._copy_text_encoders()
            return
        self.prior_unet = attention_only_copy(self.unet)
        if self.prior_dtype != torch.float32:
            store_weights_as(self.prior_unet, self.prior_dtype)
        prompts = self._possible_class_prompts()
        if prompts is None:
            self.prior_te = self._copy_text_encoders()
            return
        if prompts:
            with torch.no_grad():
                self._class_embeddings(self.text_encoders, prompts)
        self.prior_te = None

    def _copy_text_encoders(self) -> tuple:
        """Frozen deep copies of the text encoder(s), for the prior."""
        return tuple(copy.deepcopy(te).requires_grad_(False) for te in self.text_encoders)

    @property
    def prior_dtype(self) -> torch.dtype:
        """Storage dtype of the frozen prior UNet (``prior_dtype``; auto = the mixed-precision
        dtype, whose autocast makes the half-precision copy exact)."""
        name = self.cfg.prior_dtype
        if name == "auto":
            name = {"fp16": "float16", "bf16": "bfloat16"}.get(self.cfg.mixed_precision, "float32")
        return getattr(torch, name)

    def _prior_autocast(self, unet):
        """Autocast of a prior pass: the run's, or the prior's half precision under fp32."""
        half = next(unet.parameters()).dtype
        if half == torch.float32 or self.cfg.mixed_precision != "no":
            return self.acc.autocast()
        return torch.autocast(self.device.type, dtype=half)

    def _possible_class_prompts(self) -> list[EncodedPrompt] | None:
        """Every class prompt training can draw (scene unions in every order, augmented
        items), or None when there are more than :data:`CLASS_PROMPT_LIMIT`."""
        n, lam = self.n, self.lambdas
        sizes = [1] if self.cfg.single_subject else range(1, n + 1)
        count = sum(math.perm(n, k) for k in sizes) if lam["ica"] > 0 else 0
        count += len(self.aug) if lam["aug"] > 0 else 0
        if count > CLASS_PROMPT_LIMIT:
            return None
        prompts = []
        if lam["ica"] > 0:
            for k in sizes:
                tpl = union_template(k, self.cfg.prompt_prefix)
                for s in itertools.permutations(range(n), k):
                    prompts.append(encode_template(self.tokenizer, tpl,
                                                   [self.classes[i] for i in s]))
        if lam["aug"] > 0:
            for item in self.aug:
                prompts.append(encode_template(self.tokenizer, item.template,
                                               [self.classes[s] for s in item.subjects]))
        return prompts

    # ------------------------------------------------------------------ prompts
    def _encode_text(self, text_encoders, prompts: list[EncodedPrompt]) -> Conditioning:
        """The UNet conditioning of ``prompts`` from ``text_encoders`` (one, or SDXL's two)."""
        return self._encode_ids(text_encoders, torch.stack([p.input_ids for p in prompts]))

    def _encode_ids(self, text_encoders, ids: torch.Tensor) -> Conditioning:
        tok2 = self.tokenizer_2
        return encode_ids(text_encoders, ids.to(self.device),
                          pad_2=tok2.pad_token_id if tok2 is not None else None,
                          eos=self.tokenizer.eos_token_id, resolution=self.resolution)

    def _unet(self, unet, z: torch.Tensor, t: torch.Tensor, cond: Conditioning):
        """One UNet call with a conditioning (SDXL's added conditioning included)."""
        return unet(z, t, **cond.unet_kwargs())

    @contextmanager
    def _prior(self):
        """(unet, text_encoder) of the prior model for ICA / AUG (paper: the frozen model)."""
        if self.phase == 1 or self.cfg.prior_model == "current":
            yield self.unet, self.text_encoders
        elif self.lora:
            self.unet.disable_adapters()
            if self.cfg.train_text_encoder:
                for te in self.text_encoders:
                    te.disable_adapters()
            try:
                yield self.unet, self.text_encoders
            finally:
                self.unet.enable_adapters()
                if self.cfg.train_text_encoder:
                    for te in self.text_encoders:
                        te.enable_adapters()
        else:
            yield self.prior_unet, self.prior_te

    def _class_embeddings(self, text_encoders, prompts: list[EncodedPrompt]) -> Conditioning:
        """Class-prompt conditioning from the prior text encoder(s) (cached when frozen)."""
        cacheable = self.cfg.efficient and (self.phase == 1 or self.cfg.prior_model == "frozen")
        if not cacheable:
            return self._encode_text(text_encoders, prompts)
        out = []
        for p in prompts:
            key = tuple(p.input_ids.tolist())
            if key not in self.class_cache:
                if text_encoders is None:
                    raise RuntimeError("a class prompt outside the precomputed set: "
                                       f"{self.tokenizer.decode(p.input_ids)!r}")
                self.class_cache[key] = self._encode_text(text_encoders, [p]).detach()
            out.append(self.class_cache[key])
        return cat_conditioning(out)

    @torch.no_grad()
    def prior_maps(self, z: torch.Tensor, t: torch.Tensor, prompts: list[EncodedPrompt],
                   num_slots: int) -> torch.Tensor:
        """Â: class-noun attention of the prior model on (z_t, t), stop-gradient, early-stopped."""
        with self._prior() as (unet, te):
            enc = self._class_embeddings(te, prompts)
            w = token_weights(prompts, num_slots).to(z.device)
            with self._prior_autocast(unet), capturing(get_store(unet), w,
                                                       stop_early=self.cfg.efficient) as maps:
                self._unet(unet, z, t, enc)
        return maps[0] if self.cfg.mixed_precision != "no" else maps[0].float()

    def joint_prior_maps(self, batches: list[dict]) -> list[torch.Tensor]:
        """Â of several batches in one batched prior pass (the scene's and the augmented
        item's): the same maps as one :meth:`prior_maps` pass each, one UNet call."""
        k = max(b["k"] for b in batches)
        maps = self.prior_maps(torch.cat([b["z"] for b in batches]),
                               torch.cat([b["t"] for b in batches]),
                               [p for b in batches for p in b["cl"]], k)
        sizes = [b["z"].shape[0] for b in batches]
        return [m[:, : b["k"]] for m, b in zip(maps.split(sizes), batches, strict=True)]

    # ------------------------------------------------------------------ one step
    def _noisy(self, lat: _Latents | list[_Latents], gen: torch.Generator):
        lats = lat if isinstance(lat, list) else [lat]
        mean = torch.cat([x.mean for x in lats])
        std = torch.cat([x.std for x in lats])
        eps = torch.randn(mean.shape, generator=gen).to(self.device)
        x0 = (mean + std * eps) * self.vae.config.scaling_factor
        noise = torch.randn(x0.shape, generator=gen).to(self.device)
        t = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (x0.shape[0],),
                          generator=gen).to(self.device)
        z = self.noise_scheduler.add_noise(x0, noise, t)
        if self.prediction_type == "v_prediction":
            target = self.noise_scheduler.get_velocity(x0, noise, t)
        else:
            target = noise
        return z, t, target

    def scene_batch(self, rng, gen):
        """Union-sample a batch of the scene: prompts, masks and noisy latents."""
        cfg = self.cfg
        subsets = [sample_union(self.n, rng, single=cfg.single_subject) for _ in range(cfg.batch_size)]
        flips = [flip_coin(rng, cfg.flip_p) for _ in subsets]
        k = max(len(s) for s in subsets)
        tpl = [union_template(len(s), cfg.prompt_prefix) for s in subsets]
        ph = [encode_template(self.tokenizer, t, [placeholder(i) for i in s])
              for t, s in zip(tpl, subsets, strict=True)]
        cl = [encode_template(self.tokenizer, t, [self.classes[i] for i in s])
              for t, s in zip(tpl, subsets, strict=True)]
        masks = torch.zeros(len(subsets), k, self.att_size, self.att_size)
        valid = torch.zeros(len(subsets), k)
        union = torch.zeros(len(subsets), 1, self.latent_size, self.latent_size)
        if self.cfg.efficient:
            lats = [self.scene_latents[f] for f in flips]
        else:  # straightforward: encode the (flipped) image again at every step
            lats = [self._encode(self.scene_images[f]) for f in flips]
        for b, (s, f) in enumerate(zip(subsets, flips, strict=True)):
            masks[b, : len(s)] = self.masks_att[f][s]
            valid[b, : len(s)] = 1
            union[b, 0] = self.masks_lat[f][s].amax(0)
            if cfg.segmix_prob > 0 and rng.random() < cfg.segmix_prob:  # MuDI's Seg-Mix
                image, pasted = seg_mix(self.scene_images[f], self.masks_full[f], s, rng)
                lats[b] = self._encode(image)
                masks[b, : len(s)] = resize_masks(pasted, self.att_size)
                union[b, 0] = resize_masks(pasted, self.latent_size).amax(0)
        z, t, target = self._noisy(lats, gen)
        dev = self.device
        return dict(subsets=subsets, ph=ph, cl=cl, masks=masks.to(dev), valid=valid.to(dev),
                    union=union.to(dev), z=z, t=t, target=target, k=k)

    def scene_loss(self, batch: dict, prior: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """λ_MD L_MD + λ_M2A L_M2A + λ_ICA L_ICA on a union-sampled scene batch (``prior``:
        the batch's Â when already computed)."""
        lam = self.lambdas
        enc = self._encode_text(self.text_encoders, batch["ph"])
        w = token_weights(batch["ph"], batch["k"]).to(self.device)
        need_maps = lam["m2a"] > 0 or lam["ica"] > 0
        with self.acc.autocast(), capturing(self.store, w) if need_maps else nullcontext([]) as maps:
            pred = self._unet(self.unet, batch["z"], batch["t"], enc).sample
        terms: dict[str, torch.Tensor] = {}
        if lam["md"] > 0:
            terms["md"] = masked_diffusion_loss(pred, batch["target"], batch["union"])
        if lam["m2a"] > 0:
            terms["m2a"] = m2a_loss(maps[0], batch["masks"], batch["valid"])
        if lam["ica"] > 0:
            if prior is None:
                prior = self.prior_maps(batch["z"], batch["t"], batch["cl"], batch["k"])
            terms["ica"] = ica_loss(maps[0], prior, batch["masks"], batch["valid"])
        return total_loss(terms, lam), terms

    def aug_batch(self, rng, gen) -> dict:
        """Draw one augmented item: its prompts, masks and noisy latent."""
        j = rng.randrange(len(self.aug))
        item = self.aug[j]
        lat = self.aug_latents[j] if self.cfg.efficient else self._encode(item.image)
        z, t, _ = self._noisy(lat, gen)
        k = len(item.subjects)
        ph = [encode_template(self.tokenizer, item.template, [placeholder(s) for s in item.subjects])]
        cl = [encode_template(self.tokenizer, item.template, [self.classes[s] for s in item.subjects])]
        masks = resize_masks(item.masks, self.att_size)[None].to(self.device)
        valid = torch.ones(1, k, device=self.device)
        return dict(ph=ph, cl=cl, masks=masks, valid=valid, z=z, t=t, k=k)

    def aug_term(self, batch: dict, prior: torch.Tensor | None = None) -> torch.Tensor:
        """L_AUG on one augmented item (attention only, early-stopped passes; ``prior``: its
        Â when already computed)."""
        ph, k = batch["ph"], batch["k"]
        enc = self._encode_text(self.text_encoders, ph)
        with self.acc.autocast(), capturing(self.store, token_weights(ph, k).to(self.device),
                                            stop_early=self.cfg.efficient) as maps:
            self._unet(self.unet, batch["z"], batch["t"], enc)
        if prior is None:
            prior = self.prior_maps(batch["z"], batch["t"], batch["cl"], k)
        return aug_loss(maps[0], prior, batch["masks"], batch["valid"])

    def prior_batch(self, rng, gen) -> dict:
        """Draw one class image of prior preservation: its noisy latent and target."""
        j = rng.randrange(len(self.class_latents))
        z, t, target = self._noisy(self.class_latents[j], gen)
        return dict(z=z, t=t, target=target, index=j)

    def prior_term(self, batch: dict) -> torch.Tensor:
        """Break-a-Scene's prior loss: the unmasked MSE of the prediction for the class image
        under the class prompt (the model being trained; no attention loss)."""
        enc = self._encode_ids(self.text_encoders, self.class_prompt_ids)
        with self.acc.autocast():
            pred = self._unet(self.unet, batch["z"], batch["t"], enc).sample
        return prior_preservation_loss(pred, batch["target"])

    def step(self, gstep: int) -> dict[str, float]:
        """One optimizer step (global step index ``gstep``); returns the loss terms."""
        logs = self.compute_gradients(gstep)
        self._reduce_grads()
        self._apply_step()
        return logs

    def compute_gradients(self, gstep: int) -> dict[str, float]:
        """Forward + backward of every active loss term of step ``gstep`` (no update)."""
        proc = self.acc.process_index
        rng, gen = step_rng(self.cfg.seed, gstep, proc), step_generator(self.cfg.seed, gstep, proc)
        batch = self.scene_batch(rng, gen)  # always drawn: the random stream stays the same
        aug = self.aug_batch(rng, gen) if self.lambdas["aug"] > 0 else None
        # drawn last, so the other terms' draws are those of a run without it
        keep = self.prior_batch(rng, gen) if self.class_latents and self.phase == 2 else None
        scene_on = any(self.lambdas[k] > 0 for k in ("md", "m2a", "ica"))
        priors: list[torch.Tensor | None] = [None, None]
        if self.cfg.efficient and aug is not None and self.lambdas["ica"] > 0:
            priors = self.joint_prior_maps([batch, aug])  # one prior pass for both
        logs: dict[str, float] = {"loss": 0.0}
        pending: list[torch.Tensor] = []
        if scene_on:
            loss, terms = self.scene_loss(batch, priors[0])
            self._check_finite(loss, terms, gstep)
            if self.cfg.efficient:
                self.acc.backward(loss)  # frees the scene graph before the L_AUG passes
            else:
                pending.append(loss)
            logs.update({k: float(v.detach()) for k, v in terms.items()})
            logs["loss"] = float(loss.detach())
        if aug is not None:
            la = self.aug_term(aug, priors[1])
            self._check_finite(la, {"aug": la}, gstep)
            if self.cfg.efficient:
                self.acc.backward(self.lambdas["aug"] * la)
            else:
                pending.append(self.lambdas["aug"] * la)
            logs["aug"] = float(la.detach())
            logs["loss"] += self.lambdas["aug"] * logs["aug"]
        if keep is not None:
            lp = self.prior_term(keep)
            self._check_finite(lp, {"prior": lp}, gstep)
            w = self.cfg.prior_loss_weight
            if self.cfg.efficient:
                self.acc.backward(w * lp)
            else:
                pending.append(w * lp)
            logs["prior"] = float(lp.detach())
            logs["loss"] += w * logs["prior"]
        if pending:
            self.acc.backward(sum(pending))
        return logs

    def _check_finite(self, loss: torch.Tensor, terms: dict, gstep: int) -> None:
        bad = torch.tensor(0.0 if torch.isfinite(loss.detach()).all() else 1.0, device=self.device)
        if self.acc.num_processes > 1:
            bad = self.acc.reduce(bad, reduction="sum")
        if bad.item() > 0:
            kept = last_checkpoint_note(self.out)
            vals = ", ".join(f"{k}={float(v.detach()):.4g}" for k, v in terms.items())
            self.optimizer.zero_grad(set_to_none=True)
            raise TrainingError(
                f"the loss became non-finite at step {gstep} (phase {self.phase}; {vals}); "
                f"training stopped and {kept}; lower the learning rate and --resume"
            )

    def _reduce_grads(self, bucket: int = 2**25) -> None:
        """Average gradients over processes, in buckets of ~``bucket`` elements."""
        if self.acc.num_processes == 1:
            return
        for p in self.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        i = 0
        while i < len(self.params):
            group, n = [], 0
            while i < len(self.params) and (not group or n + self.params[i].numel() <= bucket):
                group.append(self.params[i])
                n += self.params[i].numel()
                i += 1
            flat = self.acc.reduce(torch.cat([p.grad.reshape(-1) for p in group]), reduction="mean")
            offset = 0
            for p in group:
                p.grad.copy_(flat[offset : offset + p.numel()].view_as(p))
                offset += p.numel()

    def _apply_step(self) -> None:
        for emb in self.embeddings:
            if emb.grad is not None:
                emb.grad[: self.orig_vocab] = 0
        scaler = self.acc.scaler  # fp16 on CUDA: acc.backward scaled the loss
        if scaler is not None:
            scaler.unscale_(self.optimizer)
        if self.cfg.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.cfg.max_grad_norm)
        if scaler is not None:
            scaler.step(self.optimizer)  # skips a step with inf/nan gradients
            scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            # every non-placeholder row stays bit-identical (also under AdamW weight decay)
            for emb, rows in zip(self.embeddings, self.orig_rows, strict=True):
                emb[: self.orig_vocab] = rows

    def keep_original_rows(self) -> None:
        """Remember every embedding table's non-placeholder rows (restored after each step)."""
        self.orig_rows = [emb[: self.orig_vocab].detach().clone() for emb in self.embeddings]

    # ------------------------------------------------------------------ run directory
    def save_checkpoint(self, step_in_phase: int, gstep: int) -> None:
        """Write a resumable checkpoint (:func:`dynasyn.rundir.save_checkpoint`)."""
        save_checkpoint(self, step_in_phase, gstep)

    def save_outputs(self) -> None:
        """Write the run's weights and ``run.json`` (:func:`dynasyn.rundir.save_outputs`)."""
        save_outputs(self)

    # ------------------------------------------------------------------ main loop
    def run(self, resume: bool = False) -> Path:
        """Train both phases (resuming from the newest checkpoint if asked); write outputs."""
        cfg = self.cfg
        self.keep_original_rows()
        steps = {1: cfg.phase1_steps, 2: cfg.phase2_steps}
        start_phase, start_step, ck = resume_point(self.out) if resume else (1, 0, None)
        total = steps[1] + steps[2]
        done = (0 if start_phase == 1 else steps[1]) + start_step
        bar = tqdm(total=total, initial=done, desc="train", unit="step",
                   disable=not (self.progress and self.acc.is_local_main_process))
        if self.acc.is_main_process:
            trim_log(self.out, done)
        t0 = time.time()
        for phase in (1, 2):
            if phase < start_phase or (steps[phase] == 0 and phase != start_phase):
                continue
            self._setup_phase(phase)
            begin = 0
            if ck is not None and phase == start_phase:
                restore_checkpoint(self, ck)
                begin = start_step
            offset = 0 if phase == 1 else steps[1]
            for s in range(begin, steps[phase]):
                gstep = offset + s
                logs = self.step(gstep)
                bar.update(1)
                bar.set_postfix(phase=phase, loss=f"{logs['loss']:.4f}")
                if self.acc.is_main_process and (s % max(cfg.log_every, 1) == 0 or s + 1 == steps[phase]):
                    append_log(self.out, {"step": gstep + 1, "phase": phase,
                                          "time": round(time.time() - t0, 3), **logs})
                if cfg.checkpoint_every and (
                    (s + 1) % cfg.checkpoint_every == 0 or s + 1 == steps[phase]
                ):
                    save_checkpoint(self, s + 1, gstep + 1)
        bar.close()
        if self.unet_half:
            self._restore_unet_weights()
        self.unet.eval()
        for te in self.text_encoders:
            te.eval()
        if self.acc.is_main_process:
            save_outputs(self)
        self.acc.wait_for_everyone()
        return self.out

    # ------------------------------------------------------------------ outputs
    def pipeline(self):
        """A StableDiffusionPipeline (SDXL: StableDiffusionXLPipeline) over the trained
        modules (DDIM sampler)."""
        from diffusers import DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

        if self.xl:
            return StableDiffusionXLPipeline(
                vae=self.vae, text_encoder=self.text_encoder, text_encoder_2=self.text_encoder_2,
                tokenizer=self.tokenizer, tokenizer_2=self.tokenizer_2, unet=self.unet,
                scheduler=DDIMScheduler.from_config(self.scheduler_config))
        return StableDiffusionPipeline(
            vae=self.vae, text_encoder=self.text_encoder, tokenizer=self.tokenizer,
            unet=self.unet, scheduler=DDIMScheduler.from_config(self.scheduler_config),
            safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )

    @property
    def mode(self) -> str:
        if self.cfg.phase2_steps == 0:
            return "embeddings"
        return "lora" if self.lora else "full"


def train(cfg: TrainConfig, out: str | Path, resume: bool = False, overwrite: bool = False,
          progress: bool = True, accelerator: Accelerator | None = None,
          allow_existing: bool = False) -> Trainer:
    """Validate everything, then train into ``out``. Nothing is written before validation.

    A new run copies its scene into ``RUN/scene`` and records paths relative to ``RUN``
    (:func:`dynasyn.rundir.start_run`); with ``resume``, ``cfg`` is the run's recorded
    ``config.yaml`` and its paths are resolved against ``out``.
    """
    out = Path(out)
    acc = accelerator or make_accelerator(cfg)
    prepare_run_dir(out, overwrite, resume, allow_existing)
    if resume:
        cfg = resolved_config(cfg, out)
    scene = load_scene(cfg.scene, classes=cfg.classes or None)
    trainer = Trainer(cfg, out, scene=scene, accelerator=acc, progress=progress)
    acc.wait_for_everyone()  # every process has validated its inputs before anything is written
    if acc.is_main_process:
        if resume:
            out.mkdir(parents=True, exist_ok=True)
        else:
            start_run(out, cfg, scene, overwrite=overwrite)
    acc.wait_for_everyone()
    trainer.run(resume=resume)
    return trainer


def make_accelerator(cfg: TrainConfig) -> Accelerator:
    """The accelerate state for a run (honours ``device`` and ``mixed_precision``)."""
    cpu = cfg.device == "cpu" or (cfg.device == "auto" and not torch.cuda.is_available())
    return Accelerator(mixed_precision=cfg.mixed_precision, cpu=cpu)


def steps_per_second(trainer: Trainer, steps: int = 3) -> float:
    """Measure training speed (used by benchmarks)."""
    t = time.perf_counter()
    for s in range(steps):
        trainer.step(s)
    return steps / (time.perf_counter() - t)


__all__ = ["EMBEDS", "LORA_FILE", "RUN_INFO", "Trainer", "make_accelerator", "prepare_run_dir",
           "steps_per_second", "train"]
