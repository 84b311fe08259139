"""A diffusers SD 1.x / 2.x pipeline as one state dict in the original (LDM / CompVis) layout.

A1111 and ComfyUI load full checkpoints only in the original layout
(``model.diffusion_model.*``, ``first_stage_model.*``, ``cond_stage_model.*``). diffusers ships
the conversion the other way only (``diffusers.loaders.single_file_utils``: original ->
diffusers, used by ``from_single_file``). This module is its inverse, built from the same
tables (``DIFFUSERS_TO_LDM_MAPPING``) and the same block arithmetic as diffusers'
``convert_ldm_unet_checkpoint`` / ``convert_ldm_vae_checkpoint`` /
``convert_ldm_clip_checkpoint`` / ``convert_open_clip_checkpoint``, and every converted part is
checked by running diffusers' own converter on it: :func:`pipeline_to_ldm` raises instead of
returning a state dict that diffusers would not read back to the same tensors.

Text encoders: CLIP ViT-L (SD 1.x, ``quick_gelu``) as ``cond_stage_model.transformer.*``;
OpenCLIP (SD 2.x, ``gelu``) as ``cond_stage_model.model.*`` with fused ``in_proj`` weights,
the layout A1111 uses to recognise an SD 2.x checkpoint.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["UNET_PREFIX", "VAE_PREFIX", "pipeline_to_ldm", "text_encoder_to_ldm", "unet_to_ldm",
           "vae_to_ldm"]

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer."
OPEN_CLIP_PREFIX = "cond_stage_model.model."

Tensors = dict[str, torch.Tensor]

# the renames diffusers' update_unet_resnet_ldm_to_diffusers applies, diffusers -> LDM
_UNET_RESNET = (("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("norm2", "out_layers.0"),
                ("conv2", "out_layers.3"), ("time_emb_proj", "emb_layers.1"),
                ("conv_shortcut", "skip_connection"))
# update_vae_attentions_ldm_to_diffusers, diffusers -> LDM
_VAE_ATTENTION = (("group_norm.", "norm."), ("to_q.", "q."), ("to_k.", "k."), ("to_v.", "v."),
                  ("to_out.0.", "proj_out."))


def _mapping() -> dict[str, Any]:
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING

    return DIFFUSERS_TO_LDM_MAPPING


def _move(sd: Tensors, out: Tensors, old: str, new: str, renames=()) -> None:
    """Move every ``old.*`` key of ``sd`` to ``new.*`` in ``out``, applying ``renames`` to the
    part after the prefix."""
    for k in [k for k in sd if k.startswith(old + ".")]:
        rest = k[len(old):]
        for a, b in renames:
            rest = rest.replace(a, b)
        out[new + rest] = sd.pop(k)


def _check_all_moved(sd: Tensors, what: str) -> None:
    if sd:
        raise ValueError(f"the {what} has weights outside the SD 1.x/2.x layout "
                         f"(e.g. {next(iter(sd))}); it cannot be written as an original checkpoint")


def _check_round_trip(ours: Tensors, back: Tensors, what: str) -> None:
    """``back`` (diffusers' converter applied to our LDM dict) must equal ``ours`` exactly."""
    if set(back) != set(ours):
        diff = sorted(set(back) ^ set(ours))
        raise ValueError(f"diffusers reads the converted {what} back with other keys ({diff[0]} "
                         "…); the layout is not SD 1.x/2.x")
    for k, v in ours.items():
        if back[k].shape != v.shape or not torch.equal(back[k], v):
            raise ValueError(f"diffusers reads the converted {what} back differently at {k}")


def unet_to_ldm(state_dict: Tensors, config: Any) -> Tensors:
    """A diffusers ``UNet2DConditionModel`` state dict in the LDM layout (no prefix)."""
    sd = dict(state_dict)
    lpb = config["layers_per_block"]
    if not isinstance(lpb, int):
        raise ValueError("per-block layers_per_block is not an SD 1.x/2.x UNet")
    out: Tensors = {}
    for diffusers_key, ldm_key in _mapping()["unet"]["layers"].items():
        if diffusers_key in sd:
            out[ldm_key] = sd.pop(diffusers_key)
    for b in range(len(config["down_block_types"])):
        for j in range(lpb):
            i = 1 + b * (lpb + 1) + j
            _move(sd, out, f"down_blocks.{b}.resnets.{j}", f"input_blocks.{i}.0", _UNET_RESNET)
            _move(sd, out, f"down_blocks.{b}.attentions.{j}", f"input_blocks.{i}.1")
        _move(sd, out, f"down_blocks.{b}.downsamplers.0.conv",
              f"input_blocks.{(b + 1) * (lpb + 1)}.0.op")
    _move(sd, out, "mid_block.resnets.0", "middle_block.0", _UNET_RESNET)
    _move(sd, out, "mid_block.attentions.0", "middle_block.1")
    _move(sd, out, "mid_block.resnets.1", "middle_block.2", _UNET_RESNET)
    for b in range(len(config["up_block_types"])):
        has_attention = any(k.startswith(f"up_blocks.{b}.attentions.") for k in sd)
        for j in range(lpb + 1):
            i = b * (lpb + 1) + j
            _move(sd, out, f"up_blocks.{b}.resnets.{j}", f"output_blocks.{i}.0", _UNET_RESNET)
            _move(sd, out, f"up_blocks.{b}.attentions.{j}", f"output_blocks.{i}.1")
        _move(sd, out, f"up_blocks.{b}.upsamplers.0.conv",
              f"output_blocks.{b * (lpb + 1) + lpb}.{2 if has_attention else 1}.conv")
    _check_all_moved(sd, "UNet")
    return out


def vae_to_ldm(state_dict: Tensors, config: Any) -> Tensors:
    """A diffusers ``AutoencoderKL`` state dict in the LDM layout (no prefix); the mid-block
    attention's projections become 1×1 convolutions, as in the original VAE."""
    sd = dict(state_dict)
    out: Tensors = {}
    for diffusers_key, ldm_key in _mapping()["vae"].items():
        if diffusers_key in sd:
            out[ldm_key] = sd.pop(diffusers_key)
    shortcut = (("conv_shortcut", "nin_shortcut"),)
    n_up = len(config["up_block_types"])
    for i in range(len(config["down_block_types"])):
        _move(sd, out, f"encoder.down_blocks.{i}.resnets", f"encoder.down.{i}.block", shortcut)
        _move(sd, out, f"encoder.down_blocks.{i}.downsamplers.0.conv",
              f"encoder.down.{i}.downsample.conv")
    for i in range(n_up):
        _move(sd, out, f"decoder.up_blocks.{i}.resnets", f"decoder.up.{n_up - 1 - i}.block",
              shortcut)
        _move(sd, out, f"decoder.up_blocks.{i}.upsamplers.0.conv",
              f"decoder.up.{n_up - 1 - i}.upsample.conv")
    for part in ("encoder", "decoder"):
        for k in range(2):
            _move(sd, out, f"{part}.mid_block.resnets.{k}", f"{part}.mid.block_{k + 1}", shortcut)
        attn: Tensors = {}
        _move(sd, attn, f"{part}.mid_block.attentions.0", f"{part}.mid.attn_1", _VAE_ATTENTION)
        for k, v in attn.items():
            is_projection = k.endswith(("q.weight", "k.weight", "v.weight", "proj_out.weight"))
            out[k] = v[:, :, None, None] if is_projection and v.ndim == 2 else v
    _check_all_moved(sd, "VAE")
    return out


def _is_open_clip(text_encoder: Any) -> bool:
    """SD 2.x's text encoder (OpenCLIP ViT-H) uses GELU; SD 1.x's CLIP ViT-L quick GELU."""
    return text_encoder.config.hidden_act == "gelu"


def _text_model_state(text_encoder: Any) -> Tensors:
    """The text encoder's weights with diffusers' ``text_model.`` key prefix (transformers
    ≥ 5.6 dropped it from ``CLIPTextModel``), without the position-id buffer."""
    sd = {k if k.startswith(("text_model.", "text_projection")) else f"text_model.{k}": v
          for k, v in text_encoder.state_dict().items()}
    return {k: v for k, v in sd.items() if not k.endswith("position_ids")}


def _open_clip_layout(sd: Tensors) -> Tensors:
    mapping = _mapping()["openclip"]
    out: Tensors = {}
    for diffusers_key, ldm_key in mapping["layers"].items():
        if diffusers_key in sd:
            v = sd.pop(diffusers_key)
            out[OPEN_CLIP_PREFIX + ldm_key] = v.T.contiguous() if ldm_key == "text_projection" else v
    fused: dict[str, dict[str, torch.Tensor]] = {}
    for k in list(sd):
        if not k.startswith("text_model.encoder.layers."):
            continue
        v = sd.pop(k)
        ldm = k
        for diffusers_part, ldm_part in mapping["transformer"].items():
            ldm = ldm.replace(diffusers_part, ldm_part)
        ldm = OPEN_CLIP_PREFIX + "transformer." + ldm
        for proj in ("q_proj", "k_proj", "v_proj"):
            if f".{proj}." in ldm:  # q, k, v -> one in_proj, in that order
                base, kind = ldm.split(f".{proj}.")
                fused.setdefault(f"{base}.in_proj_{kind}", {})[proj] = v
                break
        else:
            out[ldm] = v
    for k, parts in fused.items():
        out[k] = torch.cat([parts["q_proj"], parts["k_proj"], parts["v_proj"]], 0)
    _check_all_moved(sd, "text encoder")
    return out


def text_encoder_to_ldm(text_encoder: Any) -> Tensors:
    """The text encoder as the original checkpoint holds it (with its ``cond_stage_model.``
    prefix): CLIP for SD 1.x, OpenCLIP for SD 2.x."""
    sd = _text_model_state(text_encoder)
    if _is_open_clip(text_encoder):
        return _open_clip_layout(sd)
    return {CLIP_PREFIX + k: v for k, v in sd.items()}


def _diffusers_text_keys(text_encoder: Any) -> Tensors:
    return {k.removeprefix("text_model."): v for k, v in _text_model_state(text_encoder).items()}


def pipeline_to_ldm(pipe: Any) -> Tensors:
    """The UNet, VAE and text encoder of an SD 1.x/2.x pipeline as one original-layout state
    dict, each part checked against diffusers' own converter (``ValueError`` otherwise)."""
    from diffusers.loaders.single_file_utils import (
        convert_ldm_clip_checkpoint,
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
        convert_open_clip_checkpoint,
    )

    unet = {UNET_PREFIX + k: v for k, v in
            unet_to_ldm(pipe.unet.state_dict(), pipe.unet.config).items()}
    _check_round_trip(pipe.unet.state_dict(), convert_ldm_unet_checkpoint(unet, pipe.unet.config),
                      "UNet")
    vae = {VAE_PREFIX + k: v for k, v in
           vae_to_ldm(pipe.vae.state_dict(), pipe.vae.config).items()}
    _check_round_trip(pipe.vae.state_dict(), convert_ldm_vae_checkpoint(vae, pipe.vae.config), "VAE")
    te = text_encoder_to_ldm(pipe.text_encoder)
    if _is_open_clip(pipe.text_encoder):
        back = convert_open_clip_checkpoint(pipe.text_encoder, te, prefix=OPEN_CLIP_PREFIX)
    else:
        back = convert_ldm_clip_checkpoint(te)
    _check_round_trip(_diffusers_text_keys(pipe.text_encoder),
                      {k.removeprefix("text_model."): v for k, v in back.items()}, "text encoder")
    return {**unet, **vae, **te}
