"""`aimv2 shards`: write WebDataset shards from a captions file, a class folder tree, the offline
demo set or the generated scene set (aimv2.data.scenes), and print where they went and the brace
pattern a config needs; or `aimv2 shards index DIR`: the manifest of a directory another tool wrote
(img2dataset), so that runs read one file instead of one per shard (aimv2.data.shardlist).

Skipped inputs (missing or undecodable images, empty captions) are reported, not fatal: the
command exits 0 as long as something was written.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from aimv2.errors import UserError

if TYPE_CHECKING:  # the writer imports webdataset and torch: only when a shard is written, not for --help
    from aimv2.data.shards import WriteReport

HELP = (
    "write WebDataset tar shards from a captions file, a class folder tree, the offline demo set or generated "
    "scenes; index a directory of shards"
)


def _add_output_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, required=True, help="directory for 00000.tar, 00001.tar, ...")
    parser.add_argument("--samples-per-shard", type=int, default=1000, help="samples per tar (default 1000)")
    parser.add_argument(
        "--no-verify", action="store_true", help="write bytes as-is without decoding each image (faster, unchecked)"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace shards already in --out")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="shards_source", required=True, metavar="SOURCE")

    captions = sub.add_parser(
        "captions",
        help="image-caption shards from a JSONL/CSV captions file",
        description="Captions file: JSONL lines {'image': path, 'caption': text} or CSV/TSV with a header "
        "(image|path|file, caption|text). Image paths are relative to --images (absolute also ok).",
    )
    captions.add_argument("--images", type=Path, required=True, help="directory the image paths are relative to")
    captions.add_argument("--captions", type=Path, required=True, help="captions file (.jsonl, .csv or .tsv)")
    _add_output_arguments(captions)
    captions.set_defaults(_shards_run=_run_captions)

    classes = sub.add_parser(
        "classes",
        help="class-labelled shards from ROOT/<class_name>/<images> (ImageFolder layout)",
        description="Classes are the sorted directory names; their order is written to classes.json.",
    )
    classes.add_argument("--root", type=Path, required=True, help="directory with one sub-directory per class")
    _add_output_arguments(classes)
    classes.set_defaults(_shards_run=_run_classes)

    demo = sub.add_parser(
        "demo",
        help="the offline demo set (real handwritten digits shipped with scikit-learn)",
        description="Writes OUT/pretrain (image-caption), OUT/probe/train and OUT/probe/val (labelled). "
        "Does nothing if a complete set is already there.",
    )
    demo.add_argument("--out", type=Path, required=True, help="directory for the demo set")
    demo.set_defaults(_shards_run=_run_demo)

    scenes = sub.add_parser(
        "scenes",
        help="generated scenes of shapes whose captions name shape and colour but never position, size or count",
        description="Writes OUT/pretrain (image-caption) and OUT/probe/<task>/{train,val} (labelled) for the tasks "
        "shape, colour, position, size and count. Does nothing if a complete set is already there.",
    )
    scenes.add_argument("--out", type=Path, required=True, help="directory for the scene set")
    scenes.add_argument(
        "--counts",
        type=int,
        nargs=3,
        default=[6000, 1000, 500],
        metavar=("PRETRAIN", "TRAIN", "VAL"),
        help="scenes for pre-training, probe train and probe val (default 6000 1000 500)",
    )
    scenes.add_argument("--image-size", type=int, default=112, help="image side in pixels (default 112)")
    scenes.add_argument("--seed", type=int, default=0, help="generator seed (default 0)")
    scenes.set_defaults(_shards_run=_run_scenes)

    index = sub.add_parser(
        "index",
        help="write DIR/manifest.json for shards another tool wrote (img2dataset: NNNNN.tar + NNNNN_stats.json)",
        description="Reads each shard's stats file (its 'successes'; a shard without one is counted by listing its "
        "tar), size and first 4 KiB once, in parallel, and writes DIR/manifest.json: a training run then reads this "
        "one file instead of a file per shard on every rank, and checks its shards' identity on resume.",
    )
    index.add_argument("dir", type=Path, help="directory holding the .tar shards")
    index.add_argument("--threads", type=int, default=16, help="parallel reads (default 16)")
    index.set_defaults(_shards_run=_run_index)


def run(args: argparse.Namespace) -> int:
    return args._shards_run(args)


def _finish(report: WriteReport) -> int:
    """Print the report; writing nothing at all is the user's problem to fix, not a success."""
    print(report.summary())
    if report.total == 0:
        first = f" (first: {report.skipped[0][0]}: {report.skipped[0][1]})" if report.skipped else ""
        raise UserError(f"no samples written to {report.out_dir}: {len(report.skipped)} inputs skipped{first}")
    return 0


def _run_captions(args: argparse.Namespace) -> int:
    from aimv2.data.shard_inputs import caption_file_samples
    from aimv2.data.shards import write_shards

    samples = caption_file_samples(args.images, args.captions)
    report = write_shards(
        samples,
        args.out,
        args.samples_per_shard,
        verify_images=not args.no_verify,
        require_caption=True,
        overwrite=args.overwrite,
    )
    return _finish(report)


def _run_classes(args: argparse.Namespace) -> int:
    from aimv2.data.shard_inputs import class_tree_samples
    from aimv2.data.shards import classes_json, write_shards

    samples = class_tree_samples(args.root)
    report = write_shards(
        samples,
        args.out,
        args.samples_per_shard,
        verify_images=not args.no_verify,
        overwrite=args.overwrite,
        extra_files={"classes.json": classes_json(samples.classes)},
    )
    print(f"{len(samples.classes)} classes, names in index order in {report.out_dir / 'classes.json'}")
    return _finish(report)


def _run_demo(args: argparse.Namespace) -> int:
    from aimv2.data.demo import build_demo_shards  # deferred: pulls in scikit-learn

    result = build_demo_shards(args.out)
    print(f"demo set in {result['out_dir']} ({len(result['classes'])} classes)")
    for name in ("pretrain", "probe_train", "probe_val"):
        split = result[name]
        print(f"  {name:<12} {split['count']:>5} samples in {split['shards']} shards: {split['urls']}")
    print(f'config, under data.sources:  - urls: "{result["pretrain"]["urls"]}"')
    print(f"the captions' word list (data.tokenizer.kind=words, data.tokenizer.path): {result['vocabulary']}")
    return 0


def _run_index(args: argparse.Namespace) -> int:
    from aimv2.data.shardlist import index_directory

    index = index_directory(args.dir, threads=args.threads)
    total, size = sum(e.count for e in index.entries), sum(e.size for e in index.entries)
    print(f"indexed {len(index.entries)} shards ({total} samples, {size / 2**30:.2f} GiB) in {index.path}")
    if index.listed:
        print(f"  {index.listed} shard(s) had no stats file: their tars were listed to count their samples")
    print(f'config, under data.sources:  - urls: "{index.urls}"')
    return 0


def _run_scenes(args: argparse.Namespace) -> int:
    from aimv2.data.scenes import build_scene_shards

    if min(args.counts) < 1 or args.image_size < 8:
        raise UserError("--counts must be >= 1 each and --image-size >= 8")
    pretrain, train, val = args.counts
    result = build_scene_shards(
        args.out,
        pretrain=pretrain,
        probe_train=train,
        probe_val=val,
        image_size=args.image_size,
        seed=args.seed,
        progress=True,
    )
    print(
        f"scene set in {result['out_dir']}: {result['pretrain']['count']} captioned scenes in "
        f"{result['pretrain']['shards']} shards (captions name {' and '.join(result['named'])})"
    )
    for task, entry in result["tasks"].items():
        said = "named in captions" if entry["named"] else "never named"
        print(
            f"  probe task {task:<9} {len(entry['classes'])} classes ({said}): "
            f"{entry['train']['dir']} ({entry['train']['count']}), {entry['val']['dir']} ({entry['val']['count']})"
        )
    print(f'config, under data.sources:  - urls: "{result["pretrain"]["urls"]}"')
    print(f"the captions' word list (data.tokenizer.kind=words, data.tokenizer.path): {result['vocabulary']}")
    return 0
