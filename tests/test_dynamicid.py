"""DynamicID: SAA processor (bit-identity at scale 0, the gate, box confinement), the official
checkpoint layout, the weights directory, prompts, crops, layout boxes, IMR's loss."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from dynasyn.dynamicid.encoder import FILL, subject_crop, tiny_id_encoder
from dynasyn.dynamicid.imr import IMR, supervised_contrastive_loss
from dynasyn.dynamicid.official import load_official, read_official, save_official
from dynasyn.dynamicid.pipeline import (
    layout_boxes,
    load,
    prompt_identities,
    slice_boxes,
    substitute_classes,
)
from dynasyn.dynamicid.saa import (
    SAAContext,
    SAAProcessor,
    activation_gate,
    adapter_processors,
    box_token_mask,
    install_saa,
    remove_saa,
    saa_state_dict,
)
from dynasyn.dynamicid.weights import read_weights, save_weights
from dynasyn.errors import InputError
from dynasyn.tiny import tiny_pipeline


def _randomize(unet: torch.nn.Module, seed: int = 0) -> None:
    """Give every adapter parameter (LoRA up included) nonzero random values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for proc in adapter_processors(unet).values():
            for p in proc.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)


@pytest.fixture(scope="module")
def tiny():
    pipe = tiny_pipeline(seed=0)
    pipe.unet.eval()
    return pipe


def _inputs(seed: int = 0, ids: int = 2):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 16, 16, generator=g)
    t = torch.tensor([10, 700])
    text = torch.randn(2, 77, 32, generator=g)
    tokens = torch.randn(2, 4 * ids, 32, generator=g)
    return x, t, text, tokens


# --------------------------------------------------------------------------------------------
# bit-identity


def test_scale_zero_and_no_tokens_are_bit_identical_to_the_base_unet(tiny):
    unet = tiny.unet
    x, t, text, tokens = _inputs()
    with torch.no_grad():
        base = unet(x, t, text).sample
    ctx = install_saa(unet)
    try:
        _randomize(unet)
        with torch.no_grad():
            no_tokens = unet(x, t, text).sample
            with ctx.using(num_ids=2, scale=0.0):
                scale0 = unet(x, t, torch.cat([text, tokens], 1)).sample
            with ctx.using(num_ids=2, scale=1.0):
                on = unet(x, t, torch.cat([text, tokens], 1)).sample
        assert torch.equal(no_tokens, base)
        assert torch.equal(scale0, base)
        assert not torch.allclose(on, base, atol=1e-4)  # the adapter does act when on
    finally:
        remove_saa(unet)
    with torch.no_grad():
        assert torch.equal(unet(x, t, text).sample, base)  # removal restores the base


def test_pipeline_without_identities_or_at_scale_zero_matches_the_base_pipeline(tmp_path):
    pipe = tiny_pipeline(seed=1)
    kw = dict(num_inference_steps=1, guidance_scale=3.0, output_type="latent")
    base_plain = pipe("a star on the grass", generator=torch.Generator().manual_seed(0),
                      **kw).images
    base_sub = pipe("a star is jumping", generator=torch.Generator().manual_seed(0),
                    **kw).images
    install_saa(pipe.unet)
    _randomize(pipe.unet, 3)
    enc = tiny_id_encoder(32)
    w = save_weights(tmp_path / "w", unet=pipe.unet, encoder=enc)
    remove_saa(pipe.unet)
    dpipe = load(pipe, w, classes=["star"])
    ref = np.zeros((64, 64, 3), np.uint8)
    ref[20:40, 20:40] = (200, 30, 30)
    plain = dpipe("a star on the grass", generator=torch.Generator().manual_seed(0), **kw).images
    off = dpipe("<asset0> is jumping", id_images=[ref], id_scale=0.0,
                generator=torch.Generator().manual_seed(0), **kw).images
    on = dpipe("<asset0> is jumping", id_images=[ref], id_scale=1.0,
               generator=torch.Generator().manual_seed(0), **kw).images
    assert torch.equal(plain, base_plain)
    assert torch.equal(off, base_sub)
    assert not torch.equal(on, base_sub)


# --------------------------------------------------------------------------------------------
# the activation gate


def test_activation_gate_on_constructed_scores():
    # per-query totals 0, 1, 2, 4, 10 spread unevenly over 2 heads x 3 tokens
    totals = torch.tensor([0.0, 1.0, 2.0, 4.0, 10.0])
    g = torch.Generator().manual_seed(0)
    w = torch.rand(5, 2, 3, generator=g) + 0.1
    w = w / w.sum(dim=(1, 2), keepdim=True)
    parts = w * totals[:, None, None]
    parts = parts - 0.5 * (torch.arange(6).view(1, 2, 3) == 2)  # offsets that sum to a constant
    scores = parts.permute(1, 0, 2).unsqueeze(0)  # (B=1, heads=2, N=5, T=3)
    a = scores.sum(dim=(1, 3))[0]
    norm = (a - a.min()) / (a.max() - a.min())
    expected = torch.where(norm < 0.3, torch.zeros_like(norm), norm)
    gate = activation_gate(scores)[0]
    torch.testing.assert_close(gate, expected)
    torch.testing.assert_close(gate, torch.tensor([0.0, 0.0, 0.0, 0.4, 1.0]))
    # min-max is over the queries of each image separately
    two = activation_gate(torch.cat([scores, 5 * scores + 3]))
    torch.testing.assert_close(two[1], gate)
    # values just under the cut are zeroed, just over kept
    s = torch.tensor([0.0, 0.299, 0.301, 1.0]).view(1, 1, 4, 1)
    torch.testing.assert_close(activation_gate(s)[0], torch.tensor([0.0, 0.0, 0.301, 1.0]))


def _layer(seed: int = 0):
    torch.manual_seed(seed)
    attn = Attention(query_dim=8, cross_attention_dim=6, heads=2, dim_head=4)
    ctx = SAAContext(num_tokens=2)
    proc = SAAProcessor(attn, ctx, AttnProcessor2_0())
    with torch.no_grad():
        for p in proc.parameters():
            p.copy_(torch.randn(p.shape) * 0.5)
    attn.set_processor(proc)
    return attn, ctx, proc


def test_processor_gate_is_the_gate_of_its_raw_id_scores_and_zero_rows_get_no_id_features():
    attn, ctx, proc = _layer()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 16, 8, generator=g)  # a 4 x 4 query grid
    ehs = torch.randn(1, 5 + 2, 6, generator=g)  # 5 text tokens + 1 identity of 2 tokens
    record: list[torch.Tensor] = []
    with torch.no_grad(), ctx.using(num_ids=1, record=record):
        out1 = attn(x, ehs)
        with ctx.using(scale=2.0):
            out2 = attn(x, ehs)
        q = attn.to_q(x) + proc.to_q_lora(x)
        k = proc.to_k_ip(ehs[:, 5:])
        qh = q.view(1, 16, 2, 4).transpose(1, 2)
        kh = k.view(1, 2, 2, 4).transpose(1, 2)
        expected = activation_gate(qh @ kh.transpose(-1, -2) / 2.0)
    torch.testing.assert_close(record[0].view(1, 16), expected)
    zero = expected[0] == 0
    assert zero.any() and (~zero).any()
    diff = (out2 - out1).abs().amax(dim=-1)[0]
    assert torch.all(diff[zero] < 1e-6)  # gated-off queries take nothing from the ID branch
    assert torch.all(diff[~zero] > 1e-6)


# --------------------------------------------------------------------------------------------
# boxes


def test_box_token_mask_sets_other_identities_to_minus_inf_inside_a_box():
    left, right = (0.0, 0.0, 0.5, 1.0), (0.5, 0.0, 1.0, 1.0)
    m = box_token_mask([left, (0.5, 0.0, 1.0, 0.5)], num_tokens=4, h=4, w=4).view(4, 4, 8)
    assert m[:, :2, 4:].all() and not m[:, :2, :4].any()  # left box: identity 1 masked
    assert m[:2, 2:, :4].all() and not m[:2, 2:, 4:].any()  # right-top box: identity 0 masked
    assert not m[2:, 2:].any()  # outside every box: nothing masked
    # overlapping boxes keep both identities where they overlap
    m2 = box_token_mask([left, (0.25, 0.0, 1.0, 1.0)], 4, 4, 4).view(4, 4, 8)
    assert not m2[:, 1].any() and m2[:, 0, 4:].all() and m2[:, 3, :4].all()
    # an identity without a box masks nothing
    assert not box_token_mask([None, right], 4, 4, 4).view(4, 4, 8)[:, :2].any()


def test_inside_its_box_a_query_sees_only_its_own_identity():
    attn, ctx, _ = _layer(2)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, 16, 8, generator=g)
    text = torch.randn(1, 5, 6, generator=g)
    id0, id1, id1b = (torch.randn(1, 2, 6, generator=g) for _ in range(3))
    boxes = [(0.0, 0.0, 0.5, 0.5), (0.5, 0.5, 1.0, 1.0)]  # top-left and bottom-right quadrants
    with torch.no_grad(), ctx.using(num_ids=2, boxes=boxes, gate=False):
        a = attn(x, torch.cat([text, id0, id1], 1)).view(4, 4, 8)
        b = attn(x, torch.cat([text, id0, id1b], 1)).view(4, 4, 8)
    torch.testing.assert_close(a[:2, :2], b[:2, :2])  # identity 0's box ignores identity 1
    assert (a[2:, 2:] - b[2:, 2:]).abs().max() > 1e-4  # identity 1's box follows it
    assert (a[:2, 2:] - b[:2, 2:]).abs().max() > 1e-4  # outside the boxes both count


# --------------------------------------------------------------------------------------------
# the official checkpoint layout


def _official_by_hand(unet: torch.nn.Module, rank: int) -> dict[str, torch.Tensor]:
    """A state dict in the official layout, written from the UNet's shapes alone: every tensor
    of processor i is filled with i + its parameter number / 10."""
    from diffusers.models.attention_processor import Attention as A

    mods = {f"{n}.processor": m for n, m in unet.named_modules() if isinstance(m, A)}
    sd: dict[str, torch.Tensor] = {}
    for i, name in enumerate(unet.attn_processors):
        a = mods[name]
        inner, qd, kd = a.to_q.out_features, a.to_q.in_features, a.to_k.in_features
        shapes = {
            "to_q_lora.down.weight": (rank, qd), "to_q_lora.up.weight": (inner, rank),
            "to_k_lora.down.weight": (rank, kd), "to_k_lora.up.weight": (inner, rank),
            "to_v_lora.down.weight": (rank, kd), "to_v_lora.up.weight": (inner, rank),
            "to_out_lora.down.weight": (rank, inner), "to_out_lora.up.weight": (qd, rank),
        }
        if a.is_cross_attention:
            shapes["to_k_ip.weight"] = (inner, kd)
            shapes["to_v_ip.weight"] = (inner, kd)
        for j, (k, s) in enumerate(sorted(shapes.items())):
            sd[f"{i}.{k}"] = torch.full(s, i + j / 10)
    return sd


@pytest.mark.parametrize("suffix", [".bin", ".safetensors"])
def test_official_layout_loader_round_trip(tmp_path, suffix):
    from safetensors.torch import save_file

    unet = tiny_pipeline(seed=0).unet.eval()
    sd = _official_by_hand(unet, rank=8)
    path = tmp_path / f"SAA{suffix}"
    if suffix == ".bin":
        torch.save({"SAA_module": sd, "proj_module": {"norm.weight": torch.ones(3)}}, path)
    else:
        save_file({f"SAA_module.{k}": v for k, v in sd.items()}, str(path))
    ctx, proj = load_official(unet, path)
    procs = list(unet.attn_processors.values())
    assert procs[1].to_q_lora.rank == 8  # the rank comes from the checkpoint
    for key, v in sd.items():
        i, param = key.split(".", 1)
        assert torch.equal(procs[int(i)].state_dict()[param], v), key
    assert (suffix == ".bin") == ("norm.weight" in proj)
    # write it back out in the official layout: the same tensors under the same keys
    back = tmp_path / f"back{suffix}"
    save_official(unet, back)
    saa2, _ = read_official(back)
    assert saa2.keys() == sd.keys() and all(torch.equal(saa2[k], sd[k]) for k in sd)
    # and a fresh UNet loaded from it computes the same output
    x, t, text, tokens = _inputs(ids=1)
    other = tiny_pipeline(seed=0).unet.eval()
    ctx2, _ = load_official(other, back)
    with torch.no_grad(), ctx.using(num_ids=1), ctx2.using(num_ids=1):
        ehs = torch.cat([text, tokens], 1)
        torch.testing.assert_close(unet(x, t, ehs).sample, other(x, t, ehs).sample)


def test_official_loader_refuses_another_layout(tmp_path):
    unet = tiny_pipeline(seed=0).unet
    path = tmp_path / "SAA.bin"
    torch.save({"SAA_module": _official_by_hand(unet, rank=4)}, path)
    wider = tiny_pipeline(seed=0, cross_attention_dim=24).unet
    with pytest.raises(InputError, match="layout does not match the model.*shape"):
        load_official(wider, path)
    from dynasyn.micro.models import micro_unet

    with pytest.raises(InputError, match="layout does not match the model.*14"):
        load_official(micro_unet(), path)
    pickled = tmp_path / "obj.bin"
    torch.save({"SAA_module": {"0.x": SAAContext()}}, pickled)  # not plain tensors
    with pytest.raises(InputError, match="cannot read"):
        read_official(pickled)


# --------------------------------------------------------------------------------------------
# weights directory


def test_weights_directory_round_trip_and_layout_check(tmp_path):
    pipe = tiny_pipeline(seed=0)
    install_saa(pipe.unet)
    _randomize(pipe.unet, 5)
    enc = tiny_id_encoder(32)
    imr = IMR(token_dim=32, text_dim=32, dim=32, depth=1)
    out = save_weights(tmp_path / "w", unet=pipe.unet, encoder=enc, imr=imr)
    w = read_weights(out)
    assert w.imr is not None and w.config["lora_rank"] == 4
    want = {k: v.half() for k, v in saa_state_dict(pipe.unet).items()}
    assert w.saa.keys() == want.keys() and all(torch.equal(w.saa[k], want[k]) for k in want)
    fresh = tiny_pipeline(seed=0)
    dp = load(fresh, out, classes=["star"])
    assert dp.imr is not None and dp.encoder is not None
    got = saa_state_dict(fresh.unet)
    assert all(torch.equal(got[k], want[k].float()) for k in want)
    with pytest.raises(InputError, match="layout does not match the model"):
        load(tiny_pipeline(seed=0, cross_attention_dim=24), out)
    with pytest.raises(InputError, match="not a DynamicID weights directory"):
        read_weights(tmp_path)


# --------------------------------------------------------------------------------------------
# prompts, crops, boxes, IMR loss


def test_prompt_placeholders_become_class_nouns():
    assert prompt_identities("<asset1> is on top of the <asset0>, <asset1>") == [1, 0]
    assert substitute_classes("<asset0> is on top of the <asset1>", ["star", "ball"]) == \
        "a star is on top of the ball"
    assert substitute_classes("A <asset0> and <asset1>", ["apple", "orange"]) == \
        "An apple and an orange"
    with pytest.raises(InputError, match="<asset2>"):
        substitute_classes("<asset2> is jumping", ["star", "ball"])


def test_subject_crop_centres_the_mask_on_a_neutral_background():
    img = np.full((40, 60, 3), 255, np.uint8)
    mask = np.zeros((40, 60), bool)
    mask[10:20, 40:50] = True
    img[mask] = (10, 200, 10)
    crop = np.asarray(subject_crop(img, mask, size=32, margin=0.5))
    assert crop.shape == (32, 32, 3)
    assert tuple(crop[0, 0]) == FILL and tuple(crop[16, 16]) == (10, 200, 10)
    assert (crop == 255).sum() == 0  # the white background outside the mask is gone
    with pytest.raises(ValueError, match="empty"):
        subject_crop(img, np.zeros((40, 60)), 32)


def test_layout_boxes_follow_the_micro_world_layout():
    top, bottom = layout_boxes("a star is on top of a ball", 2)
    assert top[3] < bottom[3] and top[1] < bottom[1]  # the star is above the ball
    left = layout_boxes("a star is on the left", 1)[0]
    assert left[2] < 0.75
    assert layout_boxes("a photo of a panda and a bowl", 2) == slice_boxes(2)


def test_supervised_contrastive_loss_prefers_label_clusters():
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    good = torch.nn.functional.normalize(torch.eye(3)[labels] + 0.01, dim=-1)
    bad = good[torch.tensor([0, 2, 4, 1, 3, 5])]
    assert supervised_contrastive_loss(good, labels) < supervised_contrastive_loss(bad, labels)
    alone = supervised_contrastive_loss(good[:3:2], torch.tensor([0, 1]))
    assert alone.item() == 0.0  # no anchor has a positive
