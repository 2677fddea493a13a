"""Prediction grids and greedy captions, without training: a perfect prediction must give back the
image, the PNG has the exact layout size, and greedy captions are deterministic, bounded and agree
with the decoder's own teacher-forced forward."""

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_digits
from timm.data import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

from aimv2.config import TokenizerConfig
from aimv2.data.tokenizer import build_tokenizer
from aimv2.models import AIMv2, get_size
from aimv2.models.encoder import encode
from aimv2.objective import patchify
from aimv2.viz.frame import generate_captions, greedy_tokens, make_frame
from aimv2.viz.prediction_grid import (
    GREY,
    LINE_H,
    PAD,
    TITLE_H,
    normalized_targets,
    prediction_grid,
    prediction_panels,
    save_png,
    to_pixels,
    unnormalize_patches,
    unpatchify,
)

MEAN = torch.tensor(OPENAI_CLIP_MEAN).view(1, 3, 1, 1)
STD = torch.tensor(OPENAI_CLIP_STD).view(1, 3, 1, 1)


def known_images() -> torch.Tensor:
    """Two real digit scans at 56 px in [0, 1] (2, 3, 56, 56), one tinted, plus flat regions."""
    digits = load_digits().images[:2] / 16.0  # (2, 8, 8)
    pixels = torch.tensor(np.kron(digits, np.ones((7, 7))), dtype=torch.float32)  # (2, 56, 56)
    images = torch.stack([pixels, pixels * 0.5 + 0.2, 1 - pixels], dim=1)  # (2, 3, 56, 56)
    return images.clamp(0, 1)


def test_unpatchify_inverts_patchify_and_unnormalize_inverts_normalize():
    x = torch.rand(2, 3, 42, 28)
    assert torch.equal(unpatchify(patchify(x, 14), 14, (3, 2)), x)
    patches = patchify(x, 14)
    assert torch.allclose(unnormalize_patches(normalized_targets(x, 14), patches), patches, atol=1e-5)


def test_perfect_prediction_reproduces_the_image(tmp_path):
    pixels = known_images()
    model_space = (pixels - MEAN) / STD  # what the model receives
    target = normalized_targets(model_space, 14)  # (2, 16, 588): what the image loss regresses
    perfect = torch.cat([target[:, 1:], target[:, :1]], dim=1)  # output i predicts patch i + 1
    prefix = torch.tensor([3, 10])
    inputs, given, rest, prediction = prediction_panels(
        model_space, perfect, prefix, 14, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
    )
    # The bound: float32 round trips through normalization and CLIP statistics stay below 1e-4 in [0, 1].
    assert (prediction - pixels).abs().max() < 1e-4
    assert (inputs - pixels).abs().max() < 1e-4
    # Prefix column: the first M patches as given, the rest grey; ground truth: the complement.
    given_patches, rest_patches = patchify(given, 14), patchify(rest, 14)
    for b, m in enumerate(prefix.tolist()):
        assert torch.allclose(given_patches[b, :m], patchify(pixels, 14)[b, :m], atol=1e-4)
        assert torch.all(given_patches[b, m:] == GREY) and torch.all(rest_patches[b, :m] == GREY)
        assert torch.allclose(rest_patches[b, m:], patchify(pixels, 14)[b, m:], atol=1e-4)
    # Through the PNG (uint8): the prediction cell equals the image to within 1/255.
    path = save_png(
        prediction_grid(model_space, perfect, prefix, 14, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, scale=1),
        tmp_path / "perfect.png",
    )
    png = np.asarray(Image.open(path).convert("RGB")).astype(int)
    x0, y0 = PAD + 3 * (56 + PAD), TITLE_H  # row 0, column "prediction"
    cell = png[y0 : y0 + 56, x0 : x0 + 56]
    truth = (pixels[0].permute(1, 2, 0).numpy() * 255).round().astype(int)
    assert np.abs(cell - truth).max() <= 1


def test_png_has_the_layout_size(tmp_path):
    images = (known_images() - MEAN) / STD
    pred = torch.zeros(2, 16, 588)
    notes = [["line one", "line two"], ["only one line"]]
    path = save_png(
        prediction_grid(images, pred, torch.tensor([8, 8]), 14, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, notes),
        tmp_path / "g.png",
    )
    # 56 px images are magnified 4x to 224; 4 columns of 224 with 6 px gaps; rows of 224 + 2 text lines.
    assert Image.open(path).size == (4 * 224 + 5 * PAD, TITLE_H + 2 * (224 + 2 * LINE_H + PAD) + PAD) == (926, 540)


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    tokenizer = build_tokenizer(TokenizerConfig(kind="clip", max_length=8))
    model = AIMv2(get_size("debug"), 28, tokenizer.vocab_size, max_text_len=8).eval()
    return model, tokenizer


def test_greedy_captions_are_deterministic_bounded_and_match_teacher_forcing(tiny_model):
    model, tokenizer = tiny_model
    images = (known_images()[:, :, :28, :28] - MEAN) / STD
    ids = greedy_tokens(model, images, tokenizer.eot_id, max_tokens=5)
    assert ids == greedy_tokens(model, images, tokenizer.eot_id, max_tokens=5, stop_early=False)
    assert all(len(row) <= 5 and tokenizer.eot_id not in row for row in ids)
    captions = generate_captions(model, images, tokenizer, max_tokens=5)
    assert captions == generate_captions(model, images, tokenizer, max_tokens=5)
    assert all(isinstance(c, str) and len(c.split()) <= 5 for c in captions)
    # The incremental loop agrees with one teacher-forced forward over the generated tokens.
    for b, row in enumerate(ids):
        if not row:
            continue
        tokens = torch.tensor([row + [0]])  # the decoder's text input is [start, row]
        features = encode(model.encoder, images[b : b + 1], torch.full((1,), model.num_patches - 1))
        _, logits = model.decoder(features, tokens)  # (1, L, V)
        assert logits[0, : len(row)].argmax(-1).tolist() == row


def test_frame_has_one_row_per_image_and_a_caption_table(tiny_model):
    model, tokenizer = tiny_model
    images = (known_images()[:, :, :28, :28] - MEAN) / STD
    frame = make_frame(model, images, 0.5, tokenizer=tokenizer, true_captions=["a seven", None], max_caption_tokens=3)
    assert frame.prefix_lengths == [2, 2] and frame.num_patches == 4
    assert frame.image.size == (4 * 224 + 5 * PAD, TITLE_H + 2 * (224 + 2 * LINE_H + PAD) + PAD)
    table = frame.captions_markdown()
    assert "| 0 | a seven |" in table and "| 1 | - |" in table and len(frame.generated) == 2
    assert to_pixels(images, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD).shape == images.shape
