"""Learning signal on real images, as the user sees it: `aimv2 demo` pre-trains the debug size on the
offline demo set (real digit scans from scikit-learn, captions naming the digit), then probes its
last checkpoint and its step-0 checkpoint (the same architecture at the random initialization
training started from) on the same held-out digits. The README claims the pre-trained encoder wins
by at least 20 top-1 points with the attentive head and 20 with the linear one; this test holds the
demo to that claim, with its own settings (configs/pretrain/demo.yaml, configs/probe/toy.yaml), and
checks its other outputs.

Why 2000 steps at 56 px: the debug size first learns the caption templates and the image statistics;
the digit's name -- the part of the caption that needs the image's content -- starts being predicted
after about 500-700 steps. Before that, pre-trained features probe no better than random ones. The
captions' word list as tokenizer makes a step cheap enough for 2000 steps in about two minutes.
Measured over five seeds (smallest gains well above the bars): eval/results/demo_seeds.md.
"""

import json

import pytest

from aimv2 import cli
from aimv2.probe.features import load_probe_encoder

MARGIN = {"attentive": 20.0, "linear": 20.0}  # top-1 points the pre-trained encoder must gain


@pytest.mark.slow
def test_demo_pretrained_encoder_probes_better_than_its_random_init(tmp_path, capsys):
    out = tmp_path / "demo"
    assert cli.main(["demo", "--out", str(out), "trainer.progress_bar=false"]) == 0
    printed = capsys.readouterr().out
    comparison = json.loads((out / "probe_comparison.json").read_text())
    for kind, margin in MARGIN.items():
        trained, random_init = comparison["rows"]["pre-trained"][kind], comparison["rows"]["random init"][kind]
        print(f"{kind}: pre-trained {trained:.1f}, random init {random_init:.1f}")
        assert trained >= random_init + margin, kind
    # Both probes ran on the same held-out digits, from the run's last and step-0 checkpoints.
    trained, random_init = (json.loads((out / d / "results.json").read_text()) for d in ("probe", "probe_random_init"))
    assert trained["val_count"] == random_init["val_count"] == comparison["val_count"] > 300
    assert trained["checkpoint"].endswith("last.ckpt") and random_init["checkpoint"].endswith("step=0000000.ckpt")
    assert "| random init |" in printed and "gain (pre-trained - random init)" in printed
    assert load_probe_encoder(out / "pretrain/checkpoints/last.ckpt")[1] == 56
    # The demo's other outputs.
    assert (out / "pretrain/visualizations/visualize_last.png").is_file()
    assert (out / "pretrain/visualizations/step=0002000.png").is_file()
    assert (out / "pretrain/report/report.md").is_file() and (out / "probe_comparison.md").is_file()
