"""Tokenizer, placeholders, prompt spans, attention capture, union sampling."""

from __future__ import annotations

import random
from collections import Counter

import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor2_0

from dynasyn.attention import (
    CaptureCrossAttnProcessor,
    attention_only_copy,
    capturing,
    cross_attention_layers,
    get_store,
    install_attention_capture,
    resolve_downsample,
    store_weights_as,
)
from dynasyn.bpe import clip_tokenizer
from dynasyn.errors import InputError
from dynasyn.sampling import maybe_flip, sample_union, step_generator, step_rng
from dynasyn.tiny import tiny_pipeline
from dynasyn.tokens import (
    add_placeholders,
    encode_template,
    expand_placeholders,
    init_words,
    token_weights,
    union_template,
)


def test_real_clip_tokenizer_ids():
    tok = clip_tokenizer()
    assert len(tok) == 49408
    assert tok("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]


def test_placeholders_initialized_from_class_noun_mean():
    pipe = tiny_pipeline()
    tok, te = pipe.tokenizer, pipe.text_encoder
    before = te.get_input_embeddings().weight.detach().clone()
    ids = add_placeholders(tok, te, ["panda", "teddy bear"])
    w = te.get_input_embeddings().weight
    assert ids == [[49408], [49409]] and w.shape[0] == 49410
    assert torch.equal(w[:49408], before)
    assert torch.equal(w[ids[0][0]], before[tok("panda", add_special_tokens=False).input_ids].mean(0))
    teddy = tok("teddy bear", add_special_tokens=False).input_ids
    assert len(teddy) == 2 and torch.allclose(w[ids[1][0]], before[teddy].mean(0))


def test_init_words_groups_a_phrase_into_vectors():
    assert init_words("a green checkered heart", 0) == ["green", "checkered", "heart"]
    assert init_words("green checkered heart", 2) == ["green checkered", "heart"]
    assert init_words("heart", 3) == ["heart", "heart", "heart"]
    assert init_words("red ball", 1) == ["red ball"]
    with pytest.raises(InputError, match="no word"):
        init_words("  the ", 2)


def test_multi_vector_placeholders_start_at_the_phrase_and_expand_in_prompts():
    pipe = tiny_pipeline()
    tok, te = pipe.tokenizer, pipe.text_encoder
    before = te.get_input_embeddings().weight.detach().clone()
    ids = add_placeholders(tok, te, ["heart", "bowl"], vectors=0,
                           init_texts=["green checkered heart", None])
    assert [len(i) for i in ids] == [3, 1]
    assert tok.convert_ids_to_tokens(ids[0]) == ["<asset0>", "<asset0>_1", "<asset0>_2"]
    w = te.get_input_embeddings().weight
    for tid, word in zip(ids[0], ["green", "checkered", "heart"], strict=True):
        assert torch.equal(w[tid], before[tok(word, add_special_tokens=False).input_ids].mean(0))
    assert torch.equal(w[ids[1][0]], before[tok("bowl", add_special_tokens=False).input_ids].mean(0))
    assert expand_placeholders("<asset0> and <asset1>", tok) == "<asset0> <asset0>_1 <asset0>_2 and <asset1>"
    # the same expansion as diffusers' own maybe_convert_prompt, so stock pipelines agree
    assert pipe.maybe_convert_prompt("a <asset0> and <asset1>", tok) == expand_placeholders(
        "a <asset0> and <asset1>", tok)
    e = encode_template(tok, "a {0} is next to {1}", ["<asset0>", "<asset1>"])
    assert [e.input_ids[s].tolist() for s in e.spans] == [ids[0], ids[1]]


def test_encode_template_spans_match_full_tokenization():
    tok = clip_tokenizer()
    tok.add_tokens(["<asset0>", "<asset1>"])
    e = encode_template(tok, union_template(2), ["<asset0>", "<asset1>"])
    full = tok(e.text, padding="max_length", max_length=77).input_ids
    assert e.input_ids.tolist() == full
    assert [e.input_ids[s].tolist() for s in e.spans] == [[49408], [49409]]
    c = encode_template(tok, "{0} is throwing the {1}.", ["teddy bear", "bowl"])
    assert len(c.spans[0]) == 2 and len(c.spans[1]) == 1
    w = token_weights([c], 2)
    assert w.shape == (1, 77, 2)
    assert torch.allclose(w[0, :, 0].sum(), torch.tensor(1.0)) and w[0, c.spans[0], 0].tolist() == [0.5, 0.5]


def test_capture_installed_only_where_needed():
    unet = tiny_pipeline().unet
    factors = cross_attention_layers(unet)
    assert set(factors.values()) == {1, 2, 4}
    assert resolve_downsample(unet, None) == 4
    store = install_attention_capture(unet)
    procs = unet.attn_processors
    captured = [n for n, p in procs.items() if isinstance(p, CaptureCrossAttnProcessor)]
    assert sorted(captured) == sorted(store.layer_names)
    assert all("attn2" in n and "mid_block" not in n and factors[n] == 4 for n in captured)
    assert len(captured) == 3  # one down + two up layers at latent/4
    others = [p for n, p in procs.items() if n not in captured]
    assert all(isinstance(p, AttnProcessor2_0) for p in others)


def _inputs(batch=2):
    g = torch.Generator().manual_seed(0)
    z = torch.randn(batch, 4, 16, 16, generator=g)
    enc = torch.randn(batch, 77, 32, generator=g)
    t = torch.tensor([10, 500][:batch])
    return z, t, enc


def test_captured_maps_are_probabilities_and_output_unchanged():
    unet = tiny_pipeline().unet
    z, t, enc = _inputs()
    ref = unet(z, t, enc).sample
    store = install_attention_capture(unet)
    eye = torch.eye(77)[None].repeat(2, 1, 1)  # capture every token column
    with capturing(store, eye) as maps:
        out = unet(z, t, enc).sample
    assert torch.allclose(out, ref, atol=1e-5)
    a = maps[0]
    assert a.shape == (2, 77, 4, 4)
    assert torch.allclose(a.sum(1), torch.ones(2, 4, 4), atol=1e-5)  # softmax over tokens
    # inactive store: the fused path, identical to the stock processor
    assert torch.equal(unet(z, t, enc).sample, ref)


def _two_slot_weights() -> torch.Tensor:
    """Token weights (2, 77, 2): slot 0 = token 3, slot 1 = the mean of tokens 5 and 6."""
    w = torch.zeros(2, 77, 2)
    w[:, 3, 0] = 1
    w[:, 5:7, 1] = 0.5
    return w


def test_early_stopped_pass_gives_identical_maps_and_gradients_flow():
    unet = tiny_pipeline().unet
    store = install_attention_capture(unet)
    z, t, enc = _inputs()
    w = _two_slot_weights()
    with capturing(store, w) as full:
        unet(z, t, enc)
    with capturing(store, w, stop_early=True) as early:
        unet(z, t, enc)
    assert torch.equal(full[0], early[0])
    enc.requires_grad_(True)
    with capturing(store, w, stop_early=True) as maps:
        unet(z, t, enc)
    maps[0].sum().backward()
    assert enc.grad is not None and enc.grad.abs().sum() > 0


def test_attention_only_copy_drops_unused_up_blocks_and_gives_the_same_maps():
    unet = tiny_pipeline().unet
    store = install_attention_capture(unet)
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    prior = attention_only_copy(unet)
    last_up = max(int(n.split(".")[1]) for n in store.layer_names if n.startswith("up_blocks."))
    assert last_up < len(unet.up_blocks) - 1  # the tiny UNet has higher-resolution up blocks
    kept = dict(prior.named_parameters())
    assert kept and not any(p.requires_grad for p in kept.values())
    assert not any(k.startswith(f"up_blocks.{last_up + 1}.") for k in kept)
    assert set(kept) < set(dict(unet.named_parameters()))  # strictly fewer weights
    # the original is untouched (same modules, same values) and still runs whole
    after = unet.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    z, t, enc = _inputs()
    w = _two_slot_weights()
    with capturing(store, w) as full:
        unet(z, t, enc)
    with capturing(get_store(prior), w, stop_early=True) as early:
        prior(z, t, enc)
    assert torch.equal(full[0], early[0])
    with pytest.raises(RuntimeError, match="attention-only UNet copy"):
        prior(z, t, enc)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_stored_prior_is_exact_under_autocast(dtype):
    """Linear/conv weights stored in the autocast dtype: bit-identical maps, norms stay fp32."""
    unet = tiny_pipeline().unet
    store = install_attention_capture(unet)
    prior = store_weights_as(attention_only_copy(unet), dtype)
    assert prior.conv_in.weight.dtype == dtype and prior.time_embedding.linear_1.bias.dtype == dtype
    assert prior.down_blocks[0].resnets[0].norm1.weight.dtype == torch.float32
    full_bytes = sum(p.numel() * p.element_size() for p in attention_only_copy(unet).parameters())
    half_bytes = sum(p.numel() * p.element_size() for p in prior.parameters())
    assert half_bytes < 0.55 * full_bytes
    z, t, enc = _inputs()
    w = _two_slot_weights()
    with torch.autocast("cpu", dtype=dtype):
        with capturing(store, w) as full:
            unet(z, t, enc)
        with capturing(get_store(prior), w, stop_early=True) as early:
            prior(z, t, enc)
    assert torch.equal(full[0], early[0])
    with capturing(store, w) as fp32:  # and without autocast the maps do differ
        unet(z, t, enc)
    assert not torch.equal(fp32[0], full[0].float())


def test_union_sampling_distribution_and_joint_flip():
    rng = random.Random(0)
    ks = Counter()
    for _ in range(3000):
        s = sample_union(4, rng)
        assert len(set(s)) == len(s) and all(0 <= i < 4 for i in s)
        ks[len(s)] += 1
    assert set(ks) == {1, 2, 3, 4} and all(600 < v < 900 for v in ks.values())
    assert all(len(sample_union(4, rng, single=True)) == 1 for _ in range(50))
    img = torch.arange(6.0).view(1, 2, 3)
    masks = torch.tensor([[[1.0, 0, 0], [1, 0, 0]]])
    flips = 0
    for _ in range(200):
        i2, m2, f = maybe_flip(img, masks, rng)
        flips += f
        if f:
            assert torch.equal(i2, img.flip(-1)) and torch.equal(m2, masks.flip(-1))
        else:
            assert torch.equal(i2, img) and torch.equal(m2, masks)
    assert 60 < flips < 140


def test_step_randomness_depends_only_on_seed_and_step():
    assert step_rng(0, 5).random() == step_rng(0, 5).random() != step_rng(0, 6).random()
    a = torch.randn(3, generator=step_generator(1, 2))
    assert torch.equal(a, torch.randn(3, generator=step_generator(1, 2)))
    assert not torch.equal(a, torch.randn(3, generator=step_generator(1, 2, process=1)))
