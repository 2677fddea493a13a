"""Probing at native resolution: each image at its own aspect ratio through a native encoder, token
sets of different lengths zero-padded in the feature cache, and heads that ignore the padding (the
same logits as each image alone)."""

import pytest
import torch

from aimv2.config import load_config
from aimv2.data.shards import ShardSample, classes_json, write_shards
from aimv2.errors import UserError
from aimv2.pretraining.pretrain import pretrain
from aimv2.probe.config import ProbeConfig
from aimv2.probe.features import pad_tokens
from aimv2.probe.heads import AttentiveHeads, LinearHeads
from aimv2.probe.run import run_probe
from conftest import REPO
from test_native_data import SIZES, jpeg, words
from test_native_pretrain import shards

P = 14


@pytest.mark.parametrize("kind", ["attentive", "linear"])
def test_heads_ignore_padding(kind):
    torch.manual_seed(0)
    heads = AttentiveHeads(3, 16, 5, attention_heads=2) if kind == "attentive" else LinearHeads(3, 16, 5)
    rows = [torch.randn(n, 16) for n in (7, 3, 12)]
    heads.train()
    padded, lengths = pad_tokens(rows)
    heads(padded, lengths)  # BatchNorm statistics of the real tokens (attentive) or their means (linear) ...
    real = torch.cat(rows) if kind == "attentive" else torch.stack([r.mean(0) for r in rows])
    assert torch.allclose(heads.bn.running_mean, 0.1 * real.mean(0), atol=1e-6)
    heads.eval()  # ... and with fixed statistics each row's logits are its own
    out = heads(padded, lengths)
    for i, row in enumerate(rows):
        assert torch.allclose(out[i], heads(row[None])[0], atol=1e-5)


def class_shards(root):
    samples = [ShardSample(f"c{i:04d}", jpeg(*SIZES[i % len(SIZES)], i), "jpg", cls=i % 2) for i in range(24)]
    for split in ("train", "val"):
        write_shards(
            samples,
            root / split,
            samples_per_shard=12,
            progress=False,
            extra_files={"classes.json": classes_json(["even", "odd"])},
        )
    return str(root / "train"), str(root / "val")


def native_checkpoint(root):
    cfg = load_config(
        REPO / "configs/pretrain/debug_native.yaml",
        [
            f"run_dir={root / 'run'}",
            f"data.sources=[{{urls: '{shards(root)}'}}]",
            f"data.tokenizer.path={words(root)}",
            "data.num_workers=0",
            "trainer.max_steps=2",
            "trainer.progress_bar=false",
        ],
    )
    return str(pretrain(cfg).checkpoints / "last.ckpt")


def test_a_native_encoder_probes_each_image_at_its_own_grid(tmp_path):
    checkpoint = native_checkpoint(tmp_path)
    train, val = class_shards(tmp_path / "probe")
    cfg = load_config(
        REPO / "configs/probe/quick.yaml",
        [
            f"checkpoint={checkpoint}",
            f"run_dir={tmp_path / 'probe_run'}",
            f"data.train={train}",
            f"data.val={val}",
            "native_patches=[4, 24]",
            "optim.epochs=2",
            "optim.warmup_epochs=0",
            "data.batch_size=8",
            "data.num_workers=0",
            "progress_bar=false",
        ],
        schema=ProbeConfig,
    )
    results = run_probe(cfg)
    assert results["native_patches"] == [4, 24] and len(results["heads"]) > 0
    from safetensors.torch import load_file

    cache = load_file(str(tmp_path / "probe_run/features/train.safetensors"))
    # Each image's own grid (width x height px -> rows x columns): 70x42 -> 3x5 = 15, 42x98 -> 7x3 = 21,
    # 56x56 -> 16, 140x28 -> 2x10 = 20, 28x70 -> 5x2 = 10, 84x84 (36 > 24) -> 4x4 = 16, 98x42 -> 21, 42x42 -> 9
    assert sorted(set(cache["lengths"].tolist())) == [9, 10, 15, 16, 20, 21]
    assert cache["features"].shape[1] == 21  # padded to the longest
    # A fixed-size encoder cannot: one line naming the key.
    fixed = tmp_path / "fixed"
    cfg_fixed = load_config(
        REPO / "configs/pretrain/demo.yaml",
        [
            f"run_dir={fixed}",
            f"data.sources=[{{urls: '{shards(tmp_path / 'f')}'}}]",
            f"data.tokenizer.path={words(tmp_path)}",
            "data.num_workers=0",
            "trainer.max_steps=1",
            "trainer.progress_bar=false",
            "visualize.every_n_steps=0",
        ],
    )
    with pytest.raises(UserError, match="native_patches.*fixed-size encoder"):
        run_probe(
            load_config(
                REPO / "configs/probe/quick.yaml",
                [
                    f"checkpoint={pretrain(cfg_fixed).checkpoints / 'last.ckpt'}",
                    f"data.train={train}",
                    f"data.val={val}",
                    f"run_dir={tmp_path / 'p2'}",
                    "native_patches=[4, 24]",
                ],
                schema=ProbeConfig,
            )
        )


def test_shares_of_several_processes_merge_with_their_padding():
    """Two ranks' shares, each padded to its own longest (3 and 5 tokens), merge sorted by key and padded
    together, every image's tokens intact."""
    from aimv2.probe.features import merge_parts

    rows = {k: torch.full((n, 2), float(i)) for i, (k, n) in enumerate([("a", 3), ("b", 5), ("c", 2), ("d", 1)])}
    parts = []
    for keys in (["c", "a"], ["d", "b"]):
        features, lengths = pad_tokens([rows[k] for k in keys])
        parts.append(
            {
                "keys": keys,
                "features": features,
                "lengths": lengths,
                "labels": torch.tensor([ord(k) for k in keys]),
                "skipped": 0,
            }
        )
    merged = merge_parts(parts)
    assert merged["keys"] == ["a", "b", "c", "d"] and merged["lengths"].tolist() == [3, 5, 2, 1]
    assert merged["features"].shape == (4, 5, 2) and merged["labels"].tolist() == [97, 98, 99, 100]
    for i, k in enumerate(merged["keys"]):
        n = rows[k].shape[0]
        assert torch.equal(merged["features"][i, :n], rows[k]) and not merged["features"][i, n:].any()
