"""The attachment with a tiny random Llama: exact label positions (hand-checked), the loss equals
transformers' own loss on those labels, the text-prefix cache gives the same logits and the same
greedy generation as recomputing the prefix, the text condition comes from the cached prefix run,
the pruning keys are the last attention layer's keys, and `plan` follows 2 * N * (Q + M)."""

import pytest
import torch

from aimv2.compress.components import LastKeys, prefill_params
from aimv2.compress.config import CompressConfig
from aimv2.compress.cost_plan import plan
from aimv2.compress.vlm import IGNORE, build_attachment, build_prefix, caption_labels
from aimv2.config import load_config
from aimv2.models import get_size
from aimv2.models.encoder import build_encoder
from aimv2.probe.features import Preprocessing
from compress_utils import TINY_LM

IMG = 56  # 4 x 4 patches of 14 px


def attach(*overrides: str):
    cfg = load_config(None, [*TINY_LM, "text.tokenizer.max_length=8", *overrides], schema=CompressConfig)
    torch.manual_seed(0)
    encoder = build_encoder(get_size("debug"), IMG)
    vlm, tok = build_attachment(
        cfg.stage,
        cfg.encoder,
        cfg.compressor,
        cfg.lm,
        cfg.text,
        frozen_encoder=encoder,
        preprocessing=Preprocessing(IMG),
    )
    return vlm.eval(), tok


def images(b: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.randn(b, 3, IMG, IMG, generator=torch.Generator().manual_seed(seed))


def test_caption_labels_by_hand():
    captions = torch.tensor([[5, 6, 7, 0], [8, 9, 0, 0]])
    mask = torch.tensor([[True, True, True, False], [True, True, False, False]])
    assert caption_labels(3, captions, mask).tolist() == [
        [IGNORE, IGNORE, IGNORE, 5, 6, 7, IGNORE],
        [IGNORE, IGNORE, IGNORE, 8, 9, IGNORE, IGNORE],
    ]


def test_sequence_layout_and_loss_match_transformers_labels():
    vlm, tok = attach(
        "compressor.kind=pool", "compressor.num_tokens=4", "text.prefix=a system", "text.prompt='caption:'"
    )
    # CLIP BPE: <start_of_text> + "a system" = 3 prefix ids; "caption:" = 2 prompt ids
    assert vlm.prefix_ids.tolist()[0] == 49406 and len(vlm.prefix_ids) == 3 and len(vlm.prompt_ids) == 2
    captions, mask = tok(["a handwritten digit seven", "the number 7"])  # (2, 8), eot appended
    assert mask.sum(1).tolist() == [5, 4]
    visual = vlm.visual_tokens(images(2))
    embeds, attn, n_before = vlm.sequence(visual, 2, captions, mask)
    assert n_before == 3 + 4 + 2 and embeds.shape == (2, 9 + 8, 32)
    assert attn.tolist() == [[1] * 9 + [1] * 5 + [0] * 3, [1] * 9 + [1] * 4 + [0] * 4]
    labels = caption_labels(n_before, captions, mask)
    expected_row0 = [IGNORE] * 9 + captions[0, :5].tolist() + [IGNORE] * 3
    assert labels[0].tolist() == expected_row0
    with torch.no_grad():
        ce, n = vlm.caption_loss(images(2), captions, mask)
        hf = vlm.lm(inputs_embeds=embeds, attention_mask=attn, labels=labels).loss
    assert int(n) == 9
    assert torch.allclose(ce / n, hf, atol=1e-5)


@pytest.mark.parametrize("kind", ["pool", "quecc"])
def test_prefix_cache_gives_the_same_logits_loss_and_generation(kind):
    vlm, tok = attach(
        f"compressor.kind={kind}",
        "compressor.num_tokens=4",
        "text.prefix=you describe digits briefly",
        "text.prompt='caption:'",
    )
    prefix = build_prefix(vlm.lm, vlm.prefix_ids)
    assert prefix.length == len(vlm.prefix_ids) == 5
    x = images(3)
    full, cached = vlm.prefill_logits(x), vlm.prefill_logits(x, prefix=prefix)
    assert full.shape == cached.shape == (3, 4 + 2, tok.vocab_size)
    assert torch.allclose(full, cached, atol=1e-5), (full - cached).abs().max()
    captions, mask = tok(["a handwritten digit two", "a blurry five", "the number 3 in purple"])
    with torch.no_grad():
        a, b = vlm.caption_loss(x, captions, mask)[0], vlm.caption_loss(x, captions, mask, prefix=prefix)[0]
    assert torch.allclose(a, b, rtol=1e-5)
    generated = vlm.generate(x, 8)
    assert generated.shape == (3, 8)
    assert torch.equal(generated, vlm.generate(x, 8, prefix=prefix))
    # the prefix cache is reusable: a second batch of other images after the first one
    assert torch.equal(vlm.generate(images(2, seed=5), 4), vlm.generate(images(2, seed=5), 4, prefix=prefix))


def test_text_condition_comes_from_the_instruction_and_the_cached_prefix_run():
    vlm, _ = attach("compressor.kind=quecc", "compressor.num_tokens=4", "text.prefix=how many strokes")
    prefix = build_prefix(vlm.lm, vlm.prefix_ids)
    with torch.no_grad():
        assert torch.allclose(vlm.text_condition(), prefix.last_hidden, atol=1e-5)
        x = images(2)
        base = vlm.visual_tokens(x)
        other_ids = torch.tensor([49406, 320, 1929])  # another question, same image
        other = vlm.visual_tokens(x, text=vlm.text_condition(other_ids))
    assert base.shape == (2, 4, 32) and (base - other).abs().max() > 1e-4


def test_last_keys_are_the_last_attention_layer_keys():
    torch.manual_seed(0)
    encoder = build_encoder(get_size("debug"), IMG).eval()
    capture = LastKeys(encoder)
    seen = {}
    encoder.blocks[-1].register_forward_hook(lambda m, i, o: seen.setdefault("x", i[0]))
    with torch.no_grad():
        encoder.forward_features(images(2))
        block = encoder.blocks[-1]
        d = encoder.embed_dim
        manual = block.norm1(seen["x"]) @ block.attn.qkv.weight[d : 2 * d].T  # (B, N, D): the k rows of qkv
    keys = capture.pop()
    assert keys.shape == (2, 16, d) and torch.allclose(keys, manual, atol=1e-5)


def test_plan_flops_follow_the_formula_by_hand():
    vlm, tok = attach()
    v = tok.vocab_size  # 49408 (CLIP BPE)
    d, inter, layers = 32, 64, 2
    per_layer = 4 * d * d + 3 * d * inter + 2 * d  # q, k, v, o; gate, up, down; two RMSNorms
    n_hand = layers * per_layer + d + d * v  # + final norm + lm_head (the input embedding table is a lookup)
    assert n_hand == 1_601_696
    assert prefill_params(vlm.lm) == n_hand
    cfg = load_config(None, TINY_LM, schema=CompressConfig)
    rows, facts = plan(cfg.lm, cfg.text, text_tokens=50, num_tokens=[1, 16], repeats=1)
    assert facts["attached_lm_params"] == n_hand
    assert [r.gflops for r in rows] == [2 * n_hand * 51 / 1e9, 2 * n_hand * 66 / 1e9]
    assert [r.gflops_cached for r in rows] == [2 * n_hand * 1 / 1e9, 2 * n_hand * 16 / 1e9]
    assert all(r.ms > 0 and r.ms_cached > 0 for r in rows)
    rows, facts = plan(cfg.lm, cfg.text, text_tokens=50, num_tokens=[1], params=7e9, repeats=1)
    assert rows[0].gflops == 2 * 7e9 * 51 / 1e9 and facts["params_used"] == 7e9  # an 8B-class LLM: 714 GFLOPs


def test_lm_from_a_local_directory_and_vocabulary_check(tmp_path):
    from transformers import AutoModelForCausalLM

    from aimv2.compress.components import random_lm_config
    from aimv2.errors import UserError

    cfg = load_config(None, [*TINY_LM, "lm.arch=qwen2"], schema=CompressConfig)
    for name, vocab in (("fits", 49408), ("small", 1000)):
        AutoModelForCausalLM.from_config(random_lm_config(cfg.lm, vocab)).save_pretrained(tmp_path / name)
    vlm, _ = attach(f"lm.path={tmp_path / 'fits'}")
    assert type(vlm.lm).__name__ == "Qwen2ForCausalLM" and not any(p.requires_grad for p in vlm.lm.parameters())
    with pytest.raises(UserError, match="tokenizer has 49408 tokens but the LM's embedding table has 1000 rows"):
        attach(f"lm.path={tmp_path / 'small'}")
