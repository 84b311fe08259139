"""A diffusers SD 1.x / 2.x / SDXL pipeline as one state dict in the original (LDM / CompVis /
Stability ``sgm``) layout.

A1111 and ComfyUI load full checkpoints only in the original layout
(``model.diffusion_model.*``, ``first_stage_model.*``, ``cond_stage_model.*``; SDXL:
``conditioner.embedders.*`` instead of ``cond_stage_model.*``). diffusers ships
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

SDXL: the UNet's ``add_embedding`` (pooled text + time ids) as ``label_emb.0.{0,2}``; the first
text encoder (CLIP ViT-L) as ``conditioner.embedders.0.transformer.*`` (CLIP's own key names),
the second (OpenCLIP ViT-bigG, with its ``text_projection``) as ``conditioner.embedders.1.model.*``
in the OpenCLIP layout. diffusers' single-file loader tells the two encoders apart by their
widths (the CLIP-L converter is used for any encoder as wide as ``embedders.0``'s position
embedding), so a pipeline whose two text encoders have the same width is refused.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["UNET_PREFIX", "VAE_PREFIX", "XL_CLIP_PREFIX", "XL_OPEN_CLIP_PREFIX", "pipeline_to_ldm",
           "sdxl_pipeline_to_ldm", "sdxl_text_encoders_to_ldm", "text_encoder_to_ldm",
           "unet_to_ldm", "vae_to_ldm"]

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer."
OPEN_CLIP_PREFIX = "cond_stage_model.model."
XL_CLIP_PREFIX = "conditioner.embedders.0.transformer."
XL_OPEN_CLIP_PREFIX = "conditioner.embedders.1.model."

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


def _check_all_moved(sd: Tensors, what: str, layout: str = "SD 1.x/2.x") -> None:
    if sd:
        raise ValueError(f"the {what} has weights outside the {layout} layout "
                         f"(e.g. {next(iter(sd))}); it cannot be written as an original checkpoint")


def _check_round_trip(ours: Tensors, back: Tensors, what: str, layout: str = "SD 1.x/2.x") -> None:
    """``back`` (diffusers' converter applied to our LDM dict) must equal ``ours`` exactly."""
    if set(back) != set(ours):
        diff = sorted(set(back) ^ set(ours))
        raise ValueError(f"diffusers reads the converted {what} back with other keys ({diff[0]} "
                         f"…); the layout is not {layout}")
    for k, v in ours.items():
        if back[k].shape != v.shape or not torch.equal(back[k], v):
            raise ValueError(f"diffusers reads the converted {what} back differently at {k}")


def _is_xl_unet(config: Any) -> bool:
    return config.get("addition_embed_type") == "text_time"


def unet_to_ldm(state_dict: Tensors, config: Any) -> Tensors:
    """A diffusers ``UNet2DConditionModel`` state dict in the LDM layout (no prefix); SDXL's
    ``add_embedding`` (``addition_embed_type="text_time"``) becomes ``label_emb``."""
    sd = dict(state_dict)
    layout = "SDXL" if _is_xl_unet(config) else "SD 1.x/2.x"
    lpb = config["layers_per_block"]
    if not isinstance(lpb, int):
        raise ValueError(f"per-block layers_per_block is not an {layout} UNet")
    out: Tensors = {}
    tables = [_mapping()["unet"]["layers"]]
    if _is_xl_unet(config):
        tables.append(_mapping()["unet"]["addition_embed_type"])
    for table in tables:
        for diffusers_key, ldm_key in table.items():
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
    _check_all_moved(sd, "UNet", layout)
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


def _open_clip_layout(sd: Tensors, prefix: str = OPEN_CLIP_PREFIX,
                      layout: str = "SD 1.x/2.x") -> Tensors:
    """diffusers' ``text_model.*`` keys in the OpenCLIP layout under ``prefix``: fused
    ``in_proj`` q/k/v, ``resblocks``, ``text_projection`` transposed (``x @ P``)."""
    mapping = _mapping()["openclip"]
    out: Tensors = {}
    for diffusers_key, ldm_key in mapping["layers"].items():
        if diffusers_key in sd:
            v = sd.pop(diffusers_key)
            out[prefix + ldm_key] = v.T.contiguous() if ldm_key == "text_projection" else v
    fused: dict[str, dict[str, torch.Tensor]] = {}
    for k in list(sd):
        if not k.startswith("text_model.encoder.layers."):
            continue
        v = sd.pop(k)
        ldm = k
        for diffusers_part, ldm_part in mapping["transformer"].items():
            ldm = ldm.replace(diffusers_part, ldm_part)
        ldm = prefix + "transformer." + ldm
        for proj in ("q_proj", "k_proj", "v_proj"):
            if f".{proj}." in ldm:  # q, k, v -> one in_proj, in that order
                base, kind = ldm.split(f".{proj}.")
                fused.setdefault(f"{base}.in_proj_{kind}", {})[proj] = v
                break
        else:
            out[ldm] = v
    for k, parts in fused.items():
        out[k] = torch.cat([parts["q_proj"], parts["k_proj"], parts["v_proj"]], 0)
    _check_all_moved(sd, "text encoder", layout)
    return out


def text_encoder_to_ldm(text_encoder: Any) -> Tensors:
    """The text encoder as the original checkpoint holds it (with its ``cond_stage_model.``
    prefix): CLIP for SD 1.x, OpenCLIP for SD 2.x."""
    sd = _text_model_state(text_encoder)
    if _is_open_clip(text_encoder):
        return _open_clip_layout(sd)
    return {CLIP_PREFIX + k: v for k, v in sd.items()}


def sdxl_text_encoders_to_ldm(text_encoder: Any, text_encoder_2: Any) -> Tensors:
    """SDXL's two text encoders as its original checkpoint holds them: CLIP ViT-L as
    ``conditioner.embedders.0.transformer.*``, OpenCLIP ViT-bigG (with ``text_projection``) as
    ``conditioner.embedders.1.model.*``."""
    te1 = {XL_CLIP_PREFIX + k: v for k, v in _text_model_state(text_encoder).items()}
    return {**te1, **_open_clip_layout(_text_model_state(text_encoder_2), XL_OPEN_CLIP_PREFIX,
                                       "SDXL")}


def _diffusers_text_keys(text_encoder: Any) -> Tensors:
    return {k.removeprefix("text_model."): v for k, v in _text_model_state(text_encoder).items()}


def _back_text_keys(back: Tensors) -> Tensors:
    return {k.removeprefix("text_model."): v for k, v in back.items()}


def _unet_and_vae(pipe: Any, layout: str) -> Tensors:
    from diffusers.loaders.single_file_utils import (
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
    )

    unet = {UNET_PREFIX + k: v for k, v in
            unet_to_ldm(pipe.unet.state_dict(), pipe.unet.config).items()}
    _check_round_trip(pipe.unet.state_dict(), convert_ldm_unet_checkpoint(unet, pipe.unet.config),
                      "UNet", layout)
    vae = {VAE_PREFIX + k: v for k, v in
           vae_to_ldm(pipe.vae.state_dict(), pipe.vae.config).items()}
    _check_round_trip(pipe.vae.state_dict(), convert_ldm_vae_checkpoint(vae, pipe.vae.config),
                      "VAE", layout)
    return {**unet, **vae}


def _width(text_encoder: Any) -> int:
    return int(text_encoder.get_input_embeddings().weight.shape[-1])


def sdxl_pipeline_to_ldm(pipe: Any) -> Tensors:
    """The UNet, VAE and both text encoders of an SDXL pipeline as one original-layout state
    dict, each part checked against diffusers' own converter (``ValueError`` otherwise)."""
    from diffusers.loaders.single_file_utils import (
        CHECKPOINT_KEY_NAMES,
        convert_ldm_clip_checkpoint,
        convert_open_clip_checkpoint,
    )

    if not _is_xl_unet(pipe.unet.config):
        raise ValueError("the UNet has no SDXL add_embedding (addition_embed_type text_time)")
    w1, w2 = _width(pipe.text_encoder), _width(pipe.text_encoder_2)
    if w1 == w2:  # diffusers would read embedders.0 (CLIP-L) into text_encoder_2 as well
        raise ValueError(f"both text encoders are {w1} wide; diffusers' single-file loader tells "
                         "SDXL's CLIP-L and OpenCLIP-bigG apart by their widths (768 and 1280 "
                         "in SDXL), so an original-layout checkpoint of this model would not "
                         "load back; export --format diffusers instead")
    out = _unet_and_vae(pipe, "SDXL")
    te = sdxl_text_encoders_to_ldm(pipe.text_encoder, pipe.text_encoder_2)
    # the keys diffusers' loader recognises the two encoders by (is_clip_sdxl_model, ...)
    for name in ("clip_sdxl", "open_clip_sdxl"):
        if CHECKPOINT_KEY_NAMES[name] not in te:
            raise ValueError(f"the converted text encoders lack {CHECKPOINT_KEY_NAMES[name]}")
    te1 = {k: v for k, v in te.items() if k.startswith(XL_CLIP_PREFIX)}
    _check_round_trip(_diffusers_text_keys(pipe.text_encoder),
                      _back_text_keys(convert_ldm_clip_checkpoint(te1)), "text encoder", "SDXL")
    back = convert_open_clip_checkpoint(pipe.text_encoder_2, te, prefix=XL_OPEN_CLIP_PREFIX)
    _check_round_trip(_diffusers_text_keys(pipe.text_encoder_2), _back_text_keys(back),
                      "second text encoder", "SDXL")
    return {**out, **te}


def pipeline_to_ldm(pipe: Any) -> Tensors:
    """The UNet, VAE and text encoder(s) of an SD 1.x/2.x or SDXL pipeline as one
    original-layout state dict, each part checked against diffusers' own converter
    (``ValueError`` otherwise)."""
    from diffusers.loaders.single_file_utils import (
        convert_ldm_clip_checkpoint,
        convert_open_clip_checkpoint,
    )

    if getattr(pipe, "text_encoder_2", None) is not None:
        return sdxl_pipeline_to_ldm(pipe)
    out = _unet_and_vae(pipe, "SD 1.x/2.x")
    te = text_encoder_to_ldm(pipe.text_encoder)
    if _is_open_clip(pipe.text_encoder):
        back = convert_open_clip_checkpoint(pipe.text_encoder, te, prefix=OPEN_CLIP_PREFIX)
    else:
        back = convert_ldm_clip_checkpoint(te)
    _check_round_trip(_diffusers_text_keys(pipe.text_encoder), _back_text_keys(back),
                      "text encoder")
    return {**out, **te}
