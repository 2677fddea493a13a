"""The shard writer, its input readers, the demo set and `aimv2 shards`, on real files."""

from __future__ import annotations

import csv
import io
import json
import tarfile
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from braceexpand import braceexpand
from PIL import Image

from aimv2 import cli
from aimv2.data.demo import DIGIT_NAMES, build_demo_shards
from aimv2.data.shard_inputs import caption_file_samples, class_tree_samples
from aimv2.data.shardlist import head_digest, shard_sample_count
from aimv2.data.shards import ShardSample, classes_json, write_shards
from aimv2.errors import UserError


def image_bytes(fmt: str, seed: int, size: int = 16) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=fmt)
    return buf.getvalue()


def _read_tar(path: Path) -> dict[str, dict[str, bytes]]:
    """{key: {field: bytes}} in member order."""
    samples: dict[str, dict[str, bytes]] = defaultdict(dict)
    with tarfile.open(path) as tar:
        for member in tar.getmembers():
            key, field = member.name.split(".", 1)
            samples[key][field] = tar.extractfile(member).read()
    return dict(samples)


@pytest.fixture
def image_folder(tmp_path: Path) -> tuple[Path, list[tuple[str, str, bytes]]]:
    """7 real images (PNG and JPEG, one in a sub-folder) and their (path, caption, bytes)."""
    images = tmp_path / "images"
    (images / "sub").mkdir(parents=True)
    entries = []
    for i in range(7):
        ext, fmt = [("png", "PNG"), ("jpg", "JPEG"), ("jpeg", "JPEG")][i % 3]
        rel = f"sub/img{i}.{ext}" if i == 4 else f"img{i}.{ext}"
        data = image_bytes(fmt, i)
        (images / rel).write_bytes(data)
        entries.append((rel, f"caption number {i}, with a comma", data))
    return images, entries


def _write_captions(
    path: Path, rows: list[tuple[str, str]], image_col: str = "image", text_col: str = "caption"
) -> Path:
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps({image_col: p, text_col: c}) + "\n" for p, c in rows))
    else:
        with open(path, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow([image_col, text_col])
            writer.writerows(rows)
    return path


@pytest.mark.parametrize("kind", ["jsonl", "csv"])
def test_caption_round_trip(tmp_path, image_folder, kind):
    images, entries = image_folder
    columns = ("image", "caption") if kind == "jsonl" else ("path", "text")
    captions = _write_captions(tmp_path / f"captions.{kind}", [(p, c) for p, c, _ in entries], *columns)
    out = tmp_path / "shards"
    report = write_shards(caption_file_samples(images, captions), out, samples_per_shard=3, progress=False)

    assert report.counts == [3, 3, 1] and report.total == 7 and report.skipped == []
    assert [p.name for p in report.shards] == ["00000.tar", "00001.tar", "00002.tar"]
    assert sorted(p.name for p in out.glob("*.tar")) == ["00000.tar", "00001.tar", "00002.tar"]
    assert not list(out.glob(".*"))  # no temp files left
    assert list(braceexpand(report.urls)) == [str(p) for p in report.shards]

    written = {}
    for shard, count in zip(report.shards, report.counts):
        samples = _read_tar(shard)
        assert len(samples) == count
        written.update(samples)
        stats = json.loads(shard.with_name(shard.stem + "_stats.json").read_text())
        assert stats["successes"] == stats["count"] == count and stats["failed_to_download"] == 0
        assert shard_sample_count(str(shard)) == count
    assert sorted(written) == [f"{i:09d}" for i in range(7)]
    for i, (rel, caption, data) in enumerate(entries):
        fields = written[f"{i:09d}"]
        ext = "jpg" if rel.endswith((".jpg", ".jpeg")) else "png"
        assert set(fields) == {ext, "txt", "json"}
        assert fields[ext] == data  # original bytes, never re-encoded
        assert fields["txt"].decode() == caption
        meta = json.loads(fields["json"])
        width, height = Image.open(io.BytesIO(data)).size  # recorded as img2dataset does (native resolution)
        assert meta == {
            "key": f"{i:09d}",
            "caption": caption,
            "cls": None,
            "source": str(images / rel),
            "width": width,
            "height": height,
        }

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["total"] == 7 and manifest["urls"] == report.urls
    assert [{k: e[k] for k in ("name", "count", "bytes")} for e in manifest["shards"]] == [
        {"name": f"0000{i}.tar", "count": n, "bytes": (out / f"0000{i}.tar").stat().st_size}
        for i, n in enumerate([3, 3, 1])
    ]
    assert all(e["head"] == head_digest(out / e["name"]) for e in manifest["shards"]) and manifest["version"] == 1

    # The streaming library reads them back as whole samples.
    keys = [s["__key__"] for s in wds.WebDataset(report.urls, shardshuffle=False)]
    assert sorted(keys) == sorted(written)


def test_single_shard_pattern_and_absolute_paths(tmp_path, image_folder):
    images, entries = image_folder
    captions = _write_captions(tmp_path / "c.jsonl", [(str(images / p), c) for p, c, _ in entries])
    report = write_shards(caption_file_samples(images, captions), tmp_path / "o", progress=False)
    assert report.urls == f"{(tmp_path / 'o').resolve()}/00000.tar" and report.counts == [7]


def _bad_inputs(tmp_path: Path, images: Path) -> Path:
    (images / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    (images / "anim.gif").write_bytes(b"GIF89a")
    rows = [
        ("img0.png", "fine"),
        ("missing.png", "no such file"),
        ("corrupt.jpg", "bad bytes"),
        ("img1.jpg", "   "),
        ("anim.gif", "unsupported"),
        ("img2.jpeg", "also fine"),
    ]
    return _write_captions(tmp_path / "captions.jsonl", rows)


def test_bad_inputs_are_skipped_and_reported(tmp_path, image_folder):
    images, _ = image_folder
    captions = _bad_inputs(tmp_path, images)
    report = write_shards(
        caption_file_samples(images, captions), tmp_path / "out", progress=False, require_caption=True
    )
    assert report.total == 2
    written = _read_tar(report.shards[0])
    assert sorted(written) == ["000000000", "000000005"]  # keys follow the captions file's lines
    reasons = dict(report.skipped)
    assert set(reasons) == {str(images / n) for n in ("missing.png", "corrupt.jpg", "img1.jpg", "anim.gif")}
    assert reasons[str(images / "missing.png")] == "file not found"
    assert reasons[str(images / "corrupt.jpg")].startswith("undecodable image")
    assert reasons[str(images / "img1.jpg")] == "empty caption"
    assert "unsupported image extension" in reasons[str(images / "anim.gif")]
    assert all("\n" not in why for why in reasons.values())
    summary = report.summary()
    assert "wrote 2 samples in 1 shards" in summary and str(images / "missing.png") in summary
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["skipped"] == 4


def test_without_verification_bytes_are_written_as_is(tmp_path, image_folder):
    images, _ = image_folder
    captions = _bad_inputs(tmp_path, images)
    report = write_shards(
        caption_file_samples(images, captions),
        tmp_path / "out",
        verify_images=False,
        progress=False,
        require_caption=True,
    )
    written = _read_tar(report.shards[0])
    assert sorted(written) == ["000000000", "000000002", "000000003", "000000005"]
    assert written["000000002"]["jpg"] == (images / "corrupt.jpg").read_bytes()
    assert written["000000003"]["txt"] == b""
    # Inputs with no bytes at all still cannot be written.
    assert sorted(Path(p).name for p, _ in report.skipped) == ["anim.gif", "missing.png"]

    planted = [ShardSample("a", b"garbage", "JPEG", caption="x"), ShardSample("b", b"", "png", cls=3)]
    report = write_shards(planted, tmp_path / "planted", verify_images=False, progress=False)
    written = _read_tar(report.shards[0])
    assert written["a"]["jpg"] == b"garbage" and written["b"]["png"] == b"" and written["b"]["cls"] == b"3"


def test_malformed_captions_files(tmp_path, image_folder):
    images, _ = image_folder
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text('{"image": "img0.png", "caption": "ok"}\n\n{"image": "img1.jpg", "caption": \n')
    with pytest.raises(UserError, match=rf"{bad_json}:3: not valid JSON"):
        caption_file_samples(images, bad_json)
    no_caption = tmp_path / "nocap.jsonl"
    no_caption.write_text('{"image": "img0.png"}\n')
    with pytest.raises(UserError, match=rf"{no_caption}:1: no caption"):
        caption_file_samples(images, no_caption)
    bad_csv = tmp_path / "bad.csv"
    bad_csv.write_text("image,caption\nimg0.png,ok\nimg1.jpg\n")
    with pytest.raises(UserError, match=rf"{bad_csv}:3: expected 2 fields"):
        caption_file_samples(images, bad_csv)
    bad_header = tmp_path / "header.csv"
    bad_header.write_text("filename,caption\nimg0.png,ok\n")
    with pytest.raises(UserError, match=rf"{bad_header}:1: header has no image/path/file column"):
        caption_file_samples(images, bad_header)
    unknown = tmp_path / "captions.parquet"
    unknown.write_bytes(b"PAR1")
    with pytest.raises(UserError, match=rf"{unknown}: unknown captions file type .parquet"):
        caption_file_samples(images, unknown)
    with pytest.raises(UserError, match="captions file not found"):
        caption_file_samples(images, tmp_path / "nope.jsonl")
    with pytest.raises(UserError, match="images directory not found"):
        caption_file_samples(tmp_path / "nope", bad_json)


def test_class_tree_round_trip(tmp_path):
    root = tmp_path / "tree"
    expected = {}
    for cls, (name, fmt, ext) in enumerate([("cat", "PNG", "png"), ("dog", "JPEG", "jpg"), ("emu", "WEBP", "webp")]):
        (root / name).mkdir(parents=True)
        for i in range(3):
            data = image_bytes(fmt, 10 * cls + i)
            (root / name / f"{i}.{ext}").write_bytes(data)
            expected[data] = cls
    (root / "cat" / ".DS_Store").write_bytes(b"junk")  # hidden: ignored
    (root / "dog" / "notes.txt").write_text("not an image")  # reported as skipped

    samples = class_tree_samples(root)
    assert samples.classes == ["cat", "dog", "emu"]
    report = write_shards(
        samples,
        tmp_path / "out",
        samples_per_shard=4,
        progress=False,
        extra_files={"classes.json": classes_json(samples.classes)},
    )
    assert report.counts == [4, 4, 1]
    assert [Path(p).name for p, _ in report.skipped] == ["notes.txt"]
    assert json.loads((tmp_path / "out" / "classes.json").read_text()) == ["cat", "dog", "emu"]
    seen = {}
    for shard in report.shards:
        for fields in _read_tar(shard).values():
            (ext,) = set(fields) - {"cls", "json"}
            assert "txt" not in fields
            seen[fields[ext]] = int(fields["cls"])
            assert json.loads(fields["json"])["cls"] == int(fields["cls"])
    assert seen == expected


def test_class_tree_errors(tmp_path):
    root = tmp_path / "tree"
    (root / "a").mkdir(parents=True)
    (root / "a" / "x.png").write_bytes(image_bytes("PNG", 0))
    (root / "b").mkdir()
    (root / "b" / "readme.txt").write_text("no images here")
    with pytest.raises(UserError, match=rf"class directory has no images.*{root / 'b'}"):
        class_tree_samples(root)
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "x.png").write_bytes(image_bytes("PNG", 0))
    with pytest.raises(UserError, match="no class directories"):
        class_tree_samples(tmp_path / "flat")
    with pytest.raises(UserError, match="class tree root not found"):
        class_tree_samples(tmp_path / "missing")


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_interrupted_write_leaves_only_complete_shards(tmp_path, error):
    def samples():
        for i in range(5):
            yield ShardSample(f"{i:04d}", image_bytes("PNG", i), "png", caption=f"c{i}")
        raise error("stop mid-shard")

    out = tmp_path / "out"
    with pytest.raises(error):
        write_shards(samples(), out, samples_per_shard=3, progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["00000.tar", "00000_stats.json"]
    assert sorted(_read_tar(out / "00000.tar")) == ["0000", "0001", "0002"]
    assert shard_sample_count(str(out / "00000.tar")) == 3


def test_refuses_existing_shards_unless_overwrite(tmp_path):
    out = tmp_path / "out"
    many = [ShardSample(f"k{i}", image_bytes("PNG", i), "png") for i in range(5)]
    write_shards(many, out, samples_per_shard=2, progress=False)
    with pytest.raises(UserError, match=rf"{out} already holds 3 .tar shards"):
        write_shards(many[:1], out, progress=False)
    report = write_shards(many[:1], out, progress=False, overwrite=True)
    assert report.counts == [1]
    assert sorted(p.name for p in out.iterdir()) == ["00000.tar", "00000_stats.json", "manifest.json"]
    with pytest.raises(UserError, match="samples_per_shard must be at least 1"):
        write_shards(many, tmp_path / "x", samples_per_shard=0, progress=False)


def test_shard_sample_count(tmp_path):
    (tmp_path / "00007_stats.json").write_text(json.dumps({"successes": 7}))
    assert shard_sample_count(str(tmp_path / "00007.tar")) == 7
    # img2dataset's "count" includes failed downloads; "successes" is what is in the tar.
    (tmp_path / "00008_stats.json").write_text(json.dumps({"count": 10, "successes": 7, "failed_to_download": 3}))
    assert shard_sample_count(f"file:{tmp_path}/00008.tar") == 7
    (tmp_path / "00009_stats.json").write_text(json.dumps({"count": 4}))
    assert shard_sample_count(str(tmp_path / "00009.tar")) == 4
    assert shard_sample_count(str(tmp_path / "00010.tar")) is None
    assert shard_sample_count("https://example.com/00007.tar") is None
    (tmp_path / "00011_stats.json").write_text("{broken")
    with pytest.raises(UserError, match="00011_stats.json"):
        shard_sample_count(str(tmp_path / "00011.tar"))


def test_cli_captions_and_classes(tmp_path, image_folder, capsys):
    images, entries = image_folder
    captions = _write_captions(tmp_path / "c.csv", [(p, c) for p, c, _ in entries] + [("gone.png", "x")])
    out = tmp_path / "out"
    argv = ["shards", "captions", "--images", str(images), "--captions", str(captions), "--out", str(out)]
    assert cli.main(argv + ["--samples-per-shard", "4"]) == 0
    printed = capsys.readouterr().out
    assert f"{out.resolve()}/{{00000..00001}}.tar" in printed and "data.sources" in printed
    assert str(images / "gone.png") in printed and "file not found" in printed
    assert json.loads((out / "manifest.json").read_text())["total"] == 7

    assert cli.main(argv) == 2  # shards already there
    assert "--overwrite" in capsys.readouterr().err
    assert cli.main(argv + ["--overwrite", "--no-verify"]) == 0
    capsys.readouterr()

    assert (
        cli.main(
            ["shards", "captions", "--images", str(images), "--captions", str(tmp_path / "no.jsonl"), "--out", str(out)]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"captions file not found: {tmp_path / 'no.jsonl'}" in err

    root = tmp_path / "tree"
    for name in ("b", "a"):
        (root / name).mkdir(parents=True)
        (root / name / "0.png").write_bytes(image_bytes("PNG", 1))
    assert cli.main(["shards", "classes", "--root", str(root), "--out", str(tmp_path / "cls")]) == 0
    assert json.loads((tmp_path / "cls" / "classes.json").read_text()) == ["a", "b"]
    assert cli.main(["shards", "classes", "--root", str(tmp_path / "none"), "--out", str(tmp_path / "c2")]) == 2
    assert "class tree root not found" in capsys.readouterr().err


def test_cli_writes_nothing_is_an_error(tmp_path, image_folder, capsys):
    images, _ = image_folder
    captions = _write_captions(tmp_path / "c.jsonl", [("gone.png", "x")])
    argv = ["shards", "captions", "--images", str(images), "--captions", str(captions), "--out", str(tmp_path / "o")]
    assert cli.main(argv) == 2
    assert "no samples written" in capsys.readouterr().err


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("demo")
    return out, build_demo_shards(out)


def test_demo_set(demo_dir):
    out, result = demo_dir
    pretrain, probe_train, probe_val = (result[k] for k in ("pretrain", "probe_train", "probe_val"))
    assert pretrain["count"] + probe_val["count"] == 1797
    assert probe_train["count"] == pretrain["count"] and 300 < probe_val["count"] < 420
    assert result["classes"] == list(DIGIT_NAMES)

    def load(urls: str) -> dict[str, dict[str, bytes]]:
        samples = {}
        for url in braceexpand(urls):
            assert shard_sample_count(url) is not None
            samples.update(_read_tar(Path(url)))
        return samples

    pre, train, val = load(pretrain["urls"]), load(probe_train["urls"]), load(probe_val["urls"])
    assert len(pre) == pretrain["count"] and len(val) == probe_val["count"]
    assert not set(pre) & set(val)  # held out by key ...
    assert not {s["jpg"] for s in pre.values()} & {s["jpg"] for s in val.values()}  # ... and by content
    assert set(train) == set(pre)
    assert len({s["jpg"] for s in pre.values()}) == len(pre)  # the variation makes every JPEG distinct
    for split in (train, val):
        assert {int(s["cls"]) for s in split.values()} == set(range(10))
    for sub in ("probe/train", "probe/val"):
        assert json.loads((out / sub / "classes.json").read_text()) == list(DIGIT_NAMES)
    # Captions name the digit that the probe label says is in the same image.
    for key, sample in list(pre.items())[:50]:
        label = int(train[key]["cls"])
        text = sample["txt"].decode()
        assert DIGIT_NAMES[label] in text.split() or str(label) in text.split()
        img = Image.open(io.BytesIO(sample["jpg"]))
        assert img.size == (112, 112) and img.mode == "RGB"
    # The word list holds every word of every caption: the word tokenizer never says <unk> on them.
    from aimv2.data.tokenizer import WordTokenizer

    tokenizer = WordTokenizer(result["vocabulary"], max_length=16)
    assert set(DIGIT_NAMES) <= set(Path(result["vocabulary"]).read_text().split())
    for sample in pre.values():
        assert tokenizer.unk_id not in tokenizer.encode(sample["txt"].decode())


def test_demo_set_is_idempotent(demo_dir, capsys):
    out, result = demo_dir
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    assert build_demo_shards(out) == result
    assert cli.main(["shards", "demo", "--out", str(out)]) == 0
    assert result["pretrain"]["urls"] in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == before
