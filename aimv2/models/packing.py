"""Where every token of a packed batch goes: the index tensors that let the model run several images
of any grid, with their captions, in one row, and score each exactly as if it were alone.

A batch is R rows. Encoder row r holds the patches of its images one after another (raster order per
image), then padding, T tokens in all. Decoder row r holds, per image in the same order, its projected
patches then its caption ([start, t_1 .. t_{l-1}] for a caption of l real tokens), then padding, S
tokens in all. Built on the host by the collator (no device sync in the step), used by
`AIMv2.forward_packed` and `packed_aimv2_loss`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def pack_layout(grids: Sequence[tuple[int, int]], text_lengths: Sequence[int], rows: Sequence[Sequence[int]],
                row_tokens: int, text_len: int) -> dict[str, torch.Tensor]:
    """Index tensors for images with patch grids `grids` (gh, gw), captions of `text_lengths` real
    tokens (padded to `text_len`), placed in `rows` (lists of image indices, each image once) of
    `row_tokens` encoder tokens.

    Keys (long tensors; flat positions index the flattened (R*T) or (R*S) tensors):
      patch_image, patch_pos (R, T): image of each encoder token (-1: padding) and its raster index;
      coords (R, T, 2): its (row, column) in its image; image_start (n,): flat position of its patch 0;
      dec_source (R, S): where each decoder input comes from, in [patch features (R*T) | caption
        inputs (n*L) | a zero vector]; dec_image (R, S): its image (-1: padding);
      pixel_pred, pixel_target (K,): flat decoder position of patch j and flat encoder position of
        patch j+1 of the same image; pixel_image, pixel_target_pos (K,): that image and j+1;
      text_pred (n_real,): flat decoder positions of caption slots with a real target;
      text_target (n_real,): flat positions of those targets in the (n, L) tokens.
    """
    n = len(grids)
    placed = sorted(i for row in rows for i in row)
    if placed != list(range(n)):
        raise ValueError(f"every image must be placed exactly once; rows hold {placed} for {n} images")
    num_rows, t_len = len(rows), row_tokens
    patch_image = torch.full((num_rows, t_len), -1, dtype=torch.long)
    patch_pos = torch.zeros((num_rows, t_len), dtype=torch.long)
    coords = torch.zeros((num_rows, t_len, 2), dtype=torch.long)
    image_start = torch.zeros(n, dtype=torch.long)
    pad_source = num_rows * t_len + n * text_len
    dec_rows, dec_images = [], []
    pixel_pred, pixel_target, pixel_image, pixel_pos = [], [], [], []
    text_pred, text_target = [], []
    segments = []  # (row, decoder offset, image) to turn row offsets into flat positions once S is known
    for r, row in enumerate(rows):
        offset, sources, images = 0, [], []
        dec_offset = 0
        for i in row:
            gh, gw = grids[i]
            count, length = gh * gw, int(text_lengths[i])
            if count < 2:
                raise ValueError(f"image {i} has a {gh}x{gw} patch grid: at least 2 patches are needed")
            if not 1 <= length <= text_len:
                raise ValueError(f"image {i}: caption length {length} outside [1, {text_len}]")
            if offset + count > t_len:
                raise ValueError(f"row {r} holds {offset + count} patches, more than its {t_len} tokens")
            pos = torch.arange(count)
            patch_image[r, offset:offset + count] = i
            patch_pos[r, offset:offset + count] = pos
            coords[r, offset:offset + count, 0] = pos // gw
            coords[r, offset:offset + count, 1] = pos % gw
            start = r * t_len + offset
            image_start[i] = start
            sources += [start + pos, num_rows * t_len + i * text_len + torch.arange(length)]
            images.append(torch.full((count + length,), i, dtype=torch.long))
            segments.append((r, dec_offset, i, count, length, start))
            offset += count
            dec_offset += count + length
        dec_rows.append(torch.cat(sources) if sources else torch.zeros(0, dtype=torch.long))
        dec_images.append(torch.cat(images) if images else torch.zeros(0, dtype=torch.long))
    s_len = max(len(d) for d in dec_rows)
    dec_source = torch.full((num_rows, s_len), pad_source, dtype=torch.long)
    dec_image = torch.full((num_rows, s_len), -1, dtype=torch.long)
    for r, (src, img) in enumerate(zip(dec_rows, dec_images)):
        dec_source[r, :len(src)], dec_image[r, :len(img)] = src, img
    for r, dec_offset, i, count, length, start in segments:
        base = r * s_len + dec_offset
        j = torch.arange(count - 1)
        pixel_pred.append(base + j)
        pixel_target.append(start + j + 1)
        pixel_image.append(torch.full((count - 1,), i, dtype=torch.long))
        pixel_pos.append(j + 1)
        text_pred.append(base + count + torch.arange(length))
        text_target.append(i * text_len + torch.arange(length))
    return {
        "patch_image": patch_image, "patch_pos": patch_pos, "coords": coords, "image_start": image_start,
        "dec_source": dec_source, "dec_image": dec_image,
        "pixel_pred": torch.cat(pixel_pred), "pixel_target": torch.cat(pixel_target),
        "pixel_image": torch.cat(pixel_image), "pixel_target_pos": torch.cat(pixel_pos),
        "text_pred": torch.cat(text_pred), "text_target": torch.cat(text_target),
    }


def pack_patches(patches: Sequence[torch.Tensor], layout: dict[str, torch.Tensor]) -> torch.Tensor:
    """(R, T, P) rows from each image's (N_i, P) patches, at the places the layout gave them."""
    num_rows, t_len = layout["patch_image"].shape
    out = patches[0].new_zeros((num_rows * t_len, patches[0].shape[-1]))
    for i, p in enumerate(patches):
        start = int(layout["image_start"][i])
        out[start:start + p.shape[0]] = p
    return out.view(num_rows, t_len, -1)
