"""Pictures of next-patch predictions: the decoder's normalized patches back to pixels, and the grid of
input, prefix, ground truth and prediction.

From the decoder's normalized next-patch predictions back to pictures.

The image loss regresses per-patch normalized pixels (each patch minus its mean, over its std; see
`aimv2.objective.normalize_patches`), so a prediction says nothing about a patch's brightness or
contrast. As MAE's visualizations do, we undo the normalization with the *target* patch's own mean
and std: the picture then shows whether the predicted structure is right, while colour and contrast
come from the truth. Keep that in mind when reading the grids.

The next-patch prediction grid: one row per sample, four pictures per row.

    input | prefix | ground truth | prediction

- input: the image as the model received it (de-normalized to pixels);
- prefix: the first M patches, the ones the encoder attends to bidirectionally; the rest grey;
- ground truth: the patches the decoder had to predict (index >= M); the prefix grey;
- prediction: the prefix as given, then the decoder's next-patch predictions, each un-normalized with
  its target patch's mean and std (see `aimv2.viz.prediction_grid`), so compare its structure with column 3.

Under each row go short text lines (the prefix length, true and generated captions). Drawing is
plain PIL so the layout -- and hence the PNG's pixel size -- is exact and testable.
"""

from __future__ import annotations

import io
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont

from aimv2.fileio import atomic_write
from aimv2.objective import normalize_patches, patchify


def unpatchify(patches: torch.Tensor, patch_size: int, grid: tuple[int, int], channels: int = 3) -> torch.Tensor:
    """(B, N, p*p*C) -> (B, C, H, W); the exact inverse of `aimv2.objective.patchify`."""
    b = patches.shape[0]
    gh, gw = grid
    p = patch_size
    x = patches.reshape(b, gh, gw, p, p, channels)  # (B, gh, gw, p, p, C)
    x = x.permute(0, 5, 1, 3, 2, 4)  # (B, C, gh, p, gw, p)
    return x.reshape(b, channels, gh * p, gw * p)


def unnormalize_patches(normalized: torch.Tensor, target: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Normalized patches (B, N, P) back to pixel space using the statistics of `target` (B, N, P),
    the raw patches they were regressing: the inverse of `normalize_patches` for the truth."""
    mean = target.mean(dim=-1, keepdim=True)
    var = target.var(dim=-1, keepdim=True, correction=1)  # as normalize_patches
    return normalized * (var + eps).sqrt() + mean


def to_pixels(images: torch.Tensor, mean, std) -> torch.Tensor:
    """Model-space images (B, C, H, W), normalized with (mean, std) per channel, -> [0, 1] pixels."""
    mean = torch.as_tensor(mean, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    std = torch.as_tensor(std, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    return (images * std + mean).clamp(0, 1)


def prefix_mask(prefix_lengths: torch.Tensor, num_patches: int) -> torch.Tensor:
    """(B, N) bool, True on the prefix patches (index < M)."""
    return torch.arange(num_patches, device=prefix_lengths.device)[None] < prefix_lengths[:, None]


def continuation(
    pixel_pred: torch.Tensor, images: torch.Tensor, prefix_lengths: torch.Tensor, patch_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The decoder's continuation as patches in the images' own space, and the true patches.

    pixel_pred (B, N, P) normalized, where the output at position i predicts patch i + 1; images
    (B, C, H, W). Returns (predicted, target), both (B, N, P): predicted holds the given patches in the
    prefix (index < M, M >= 1) and, after it, patch j = the prediction made at position j - 1,
    un-normalized with patch j's statistics.
    """
    target = patchify(images.float(), patch_size)  # (B, N, P)
    shifted = torch.cat([pixel_pred[:, :1], pixel_pred[:, :-1]], dim=1).float()  # (B, N, P): row j predicts patch j
    predicted = unnormalize_patches(shifted, target)
    given = prefix_mask(prefix_lengths, target.shape[1])[..., None]  # (B, N, 1)
    return torch.where(given, target, predicted), target


def normalized_targets(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """What the image loss regresses: (B, N, P) per-patch normalized patches of `images`."""
    return normalize_patches(patchify(images.float(), patch_size))


COLUMNS = ("input", "prefix", "ground truth", "prediction")
PAD = 6  # pixels around and between pictures
TITLE_H = 18  # the column-title strip at the top
LINE_H = 14  # one line of text under a row
GREY = 0.5  # the fill of hidden patches, in [0, 1]
_BACKGROUND = (255, 255, 255)
_INK = (20, 20, 20)


def upscale_factor(img_size: int, target: int = 224) -> int:
    """Nearest-neighbour magnification so small training images (56, 112 px) stay legible."""
    return max(1, round(target / img_size))


def grid_size(
    num_rows: int, img_size: int, scale: int, lines_per_row: int, num_cols: int = len(COLUMNS)
) -> tuple[int, int]:
    """(width, height) in pixels of a grid; the layout is fixed so this is exact."""
    cell = img_size * scale
    width = num_cols * cell + (num_cols + 1) * PAD
    height = TITLE_H + num_rows * (cell + lines_per_row * LINE_H + PAD) + PAD
    return width, height


def prediction_panels(
    images: torch.Tensor, pixel_pred: torch.Tensor, prefix_lengths: torch.Tensor, patch_size: int, mean, std
) -> list[torch.Tensor]:
    """The four columns as [0, 1] pixel tensors (B, 3, H, W) each, in `COLUMNS` order.

    images (B, 3, H, W) in model space (normalized with mean/std); pixel_pred (B, N, P) the decoder's
    normalized next-patch predictions; prefix_lengths (B,).
    """
    b, _, h, w = images.shape
    grid = (h // patch_size, w // patch_size)
    predicted, target = continuation(pixel_pred, images, prefix_lengths, patch_size)  # (B, N, P) each
    truth = to_pixels(unpatchify(target, patch_size, grid), mean, std)
    prediction = to_pixels(unpatchify(predicted, patch_size, grid), mean, std)
    given = prefix_mask(prefix_lengths, target.shape[1]).float()  # (B, N)
    given = given.view(b, *grid).repeat_interleave(patch_size, 1).repeat_interleave(patch_size, 2)[:, None]
    prefix = truth * given + GREY * (1 - given)
    rest = truth * (1 - given) + GREY * given
    return [truth, prefix, rest, prediction]


def _font(size: int = 11) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)  # Pillow >= 10.1: a scalable font
    except TypeError:
        return ImageFont.load_default()


def _fit(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> str:
    """`text` cut with an ellipsis to fit `width` pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "...", font=font) > width:
        text = text[:-1]
    return text + "..."


def _to_uint8(panel: torch.Tensor, scale: int) -> Image.Image:
    """(3, H, W) in [0, 1] -> PIL image, magnified `scale` times (nearest neighbour)."""
    array = (panel.detach().float().cpu().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    img = Image.fromarray(array, mode="RGB")
    return img.resize((img.width * scale, img.height * scale), Image.NEAREST) if scale > 1 else img


def render_grid(
    panels: list[torch.Tensor], notes: list[list[str]] | None = None, scale: int = 1, titles: tuple[str, ...] = COLUMNS
) -> Image.Image:
    """Lay out columns of (B, 3, H, W) pictures in [0, 1], with `notes[row]` text lines under each row."""
    rows, size = panels[0].shape[0], panels[0].shape[-1]
    lines = max((len(n) for n in notes), default=0) if notes else 0
    width, height = grid_size(rows, size, scale, lines, len(panels))
    canvas = Image.new("RGB", (width, height), _BACKGROUND)
    draw, font = ImageDraw.Draw(canvas), _font()
    cell = size * scale
    for c, title in enumerate(titles):
        draw.text((PAD + c * (cell + PAD), 3), _fit(draw, title, font, cell), fill=_INK, font=font)
    y = TITLE_H
    for r in range(rows):
        for c, panel in enumerate(panels):
            canvas.paste(_to_uint8(panel[r], scale), (PAD + c * (cell + PAD), y))
        y += cell
        for line in notes[r] if notes else []:
            draw.text((PAD, y + 1), _fit(draw, line, font, width - 2 * PAD), fill=_INK, font=font)
            y += LINE_H
        y += lines * LINE_H - (len(notes[r]) if notes else 0) * LINE_H + PAD
    return canvas


def prediction_grid(
    images: torch.Tensor,
    pixel_pred: torch.Tensor,
    prefix_lengths: torch.Tensor,
    patch_size: int,
    mean,
    std,
    notes: list[list[str]] | None = None,
    scale: int | None = None,
) -> Image.Image:
    """The whole picture for a batch; `scale` defaults to `upscale_factor` of the image size."""
    panels = prediction_panels(images, pixel_pred, prefix_lengths, patch_size, mean, std)
    return render_grid(panels, notes, upscale_factor(images.shape[-1]) if scale is None else scale)


def save_png(image: Image.Image, path: str | Path) -> Path:
    """Write a PNG atomically (optimized: these pictures are meant to be kept and shared)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    image.save(buf, format="PNG", optimize=True)
    atomic_write(path, buf.getvalue())
    return path
