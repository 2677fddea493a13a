"""Prediction grids of a real short run: the training callback's frames (PNG files and TensorBoard)
and `aimv2 visualize` on a checkpoint of that run."""

import pytest
from PIL import Image

from aimv2 import cli
from aimv2.viz.prediction_grid import grid_size
from conftest import jpeg_bytes
from viz_runs import EVERY, IMAGES, IMG, STEPS, short_runs

pytestmark = pytest.mark.slow  # every test reads the two short training runs of viz_runs (about 16 s)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return short_runs(tmp_path_factory)


def test_callback_writes_comparable_frames_and_logs_them_to_tensorboard(runs):
    assert runs["a_returncode"] == 0, runs["a_output"][-3000:]
    frames = runs["a"] / "visualizations"
    # Step 0 (untrained), every EVERY steps, and the last step; each the same fixed batch.
    assert sorted(p.name for p in frames.glob("step=*.png")) == [
        f"step={s:07d}.png" for s in range(0, STEPS + 1, EVERY)
    ]
    expected = grid_size(IMAGES, IMG, 224 // IMG, lines_per_row=2)  # 28 px shown 8x; prefix/true + generated lines
    assert all(Image.open(p).size == expected for p in frames.glob("step=*.png"))
    assert (frames / "fixed_batch.pt").is_file()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(runs["a"] / "logs" / "tensorboard"), size_guidance={"images": 0, "tensors": 0})
    events.Reload()
    assert [e.step for e in events.Images("predictions")] == list(range(0, STEPS + 1, EVERY))
    text = events.Tensors("captions/text_summary")[-1].tensor_proto.string_val[0].decode()
    assert "true caption" in text and "sample " in text  # the fixed batch's true captions are "sample i"


def test_visualize_cli_writes_grid_and_captions(runs, tmp_path, capsys):
    import numpy as np

    rng = np.random.default_rng(0)
    (tmp_path / "more").mkdir()
    for name in ("x", "more/y", "more/z"):
        (tmp_path / f"{name}.jpg").write_bytes(jpeg_bytes(rng, 40))
    (tmp_path / "x.txt").write_text("a noisy square\n")
    ckpt = runs["a"] / "checkpoints" / "last.ckpt"
    out = tmp_path / "out"
    # A file and a directory (all its images); captions from sibling .txt files.
    assert (
        cli.main(
            [
                "visualize",
                str(ckpt),
                "--images",
                str(tmp_path / "x.jpg"),
                str(tmp_path / "more"),
                "--out",
                str(out),
                "--prefix-ratio",
                "0.25",
                "--max-caption-tokens",
                "4",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "visualized 3 image(s)" in printed and "prefix 1/4 patches" in printed
    assert str(out / "visualize_last.png") in printed
    assert Image.open(out / "visualize_last.png").size == grid_size(3, IMG, 224 // IMG, lines_per_row=2)
    notes = (out / "visualize_last.md").read_text()
    assert "| 0 | a noisy square |" in notes and "| 1 | - |" in notes and "| 2 | - |" in notes
    # Mistakes are one line naming the path.
    assert cli.main(["visualize", str(ckpt), "--images", str(tmp_path / "nope.jpg")]) == 2
    assert (
        capsys.readouterr().err.strip() == f"aimv2 visualize: error: --images: image not found: {tmp_path / 'nope.jpg'}"
    )
    assert cli.main(["visualize", str(tmp_path / "x.txt"), "--images", str(tmp_path / "more")]) == 2
    assert "not a readable checkpoint" in capsys.readouterr().err


def test_visualize_reads_any_checkpoint_that_holds_the_decoder(runs, tmp_path):
    """One loader for pre-training checkpoints (aimv2.checkpoints.loading): the .ckpt and its
    `aimv2 export --with-decoder` directory draw the same picture; an encoder-only export is refused."""
    import numpy as np
    import pytest

    from aimv2.checkpoints import export_checkpoint
    from aimv2.errors import UserError
    from aimv2.viz.checkpoint import visualize_checkpoint

    (tmp_path / "x.jpg").write_bytes(jpeg_bytes(np.random.default_rng(1), 40))
    ckpt = runs["a"] / "checkpoints" / "last.ckpt"
    export_checkpoint(ckpt, tmp_path / "full", "aimv2", with_decoder=True)
    export_checkpoint(ckpt, tmp_path / "encoder", "aimv2")
    drawn = [
        visualize_checkpoint(src, [str(tmp_path / "x.jpg")], tmp_path / name, max_caption_tokens=0, device="cpu")
        for name, src in (("a", ckpt), ("b", tmp_path / "full"))
    ]
    assert drawn[0]["step"] == STEPS and drawn[1]["step"] is None
    assert Image.open(drawn[0]["grid"]).tobytes() == Image.open(drawn[1]["grid"]).tobytes()
    with pytest.raises(UserError, match="holds no pre-training decoder"):
        visualize_checkpoint(tmp_path / "encoder", [str(tmp_path / "x.jpg")], tmp_path / "c", max_caption_tokens=0)
