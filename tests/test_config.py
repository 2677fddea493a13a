"""Config schema: every shipped config loads and validates; mistakes are one-line errors, exit 2."""

from pathlib import Path

import pytest

from aimv2 import cli
from aimv2.config import PretrainConfig, load_config, save_config
from aimv2.errors import UserError

REPO = Path(__file__).resolve().parents[1]
PRETRAIN_CONFIGS = sorted((REPO / "configs" / "pretrain").glob("*.yaml"))


def test_there_are_shipped_configs():
    names = {p.stem for p in PRETRAIN_CONFIGS}
    assert {"debug", "aimv2_large_224", "aimv2_huge_224", "aimv2_1b_224", "aimv2_3b_224"} <= names


@pytest.mark.parametrize("path", PRETRAIN_CONFIGS, ids=lambda p: p.stem)
def test_shipped_pretrain_config_loads_and_validates(path):
    cfg = load_config(path)
    assert isinstance(cfg, PretrainConfig) and cfg.data.sources


def test_paper_recipe_values():
    cfg = load_config(REPO / "configs/pretrain/aimv2_large_224.yaml")
    assert (cfg.model.size, cfg.model.img_size) == ("large", 224)
    assert cfg.optim.lr == 1e-3 and cfg.optim.min_lr == 1e-5 and cfg.optim.betas == [0.9, 0.95]
    assert cfg.optim.weight_decay == 1e-4 and cfg.optim.warmup_steps == 12_500 and cfg.optim.grad_clip == 1.0
    assert cfg.trainer.max_steps == 1_500_000 and cfg.trainer.precision == "bf16-mixed"
    assert cfg.data.batch_size * cfg.trainer.devices * cfg.trainer.num_nodes == 8192
    assert cfg.data.crop_scale == [0.4, 1.0] and cfg.objective.alpha == 0.4
    weights = [s.weight for s in cfg.data.sources]
    assert weights == [0.30, 0.30, 0.09, 0.28, 0.03]
    assert load_config(REPO / "configs/pretrain/aimv2_3b_224.yaml").optim.lr == 4e-4


def test_overrides_apply_with_types(tmp_path):
    cfg = load_config(
        REPO / "configs/pretrain/debug.yaml",
        ["trainer.max_steps=7", "optim.lr=0.5", 'data.sources=[{urls: "/x/{0..3}.tar", weight: 2}]'],
    )
    assert cfg.trainer.max_steps == 7 and cfg.optim.lr == 0.5
    assert cfg.data.sources[0].urls == "/x/{0..3}.tar" and cfg.data.sources[0].weight == 2.0
    save_config(cfg, tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml") == cfg  # the saved config reproduces the run


@pytest.mark.parametrize(
    "overrides,match",
    [
        (["trainer.max_stepz=3"], r"trainer\.max_stepz"),
        (["trainer.max_steps=lots"], r"trainer\.max_steps"),
        (["optim.lr"], r"key=value"),
        (["data.mode=shuffled"], r"data\.mode"),
        (["model.size=gigantic"], r"model\.size"),
        (["model.img_size=100"], r"model\.img_size.*multiple of the patch size"),
        (["data.mode=resampled", "trainer.max_steps=-1"], r"trainer\.max_steps"),
        (["data.sources=[]"], r"data\.sources"),
        (["data.tokenizer.kind=hf"], r"data\.tokenizer\.path"),
        (["data.sources=[{urls: /x/{0..3}.tar}]"], r"data\.sources.*quote shard patterns"),
        (["optim.lr=-1e-3"], r"optim\.lr.*must be >= 0"),
        (["optim.lr=0"], r"optim\.min_lr.*within \[0, optim\.lr=0\], got 1e-05"),  # debug.yaml's min_lr
        (["optim.weight_decay=-1"], r"optim\.weight_decay"),
    ],
)
def test_bad_values_name_the_key(overrides, match):
    with pytest.raises(UserError, match=match):
        load_config(REPO / "configs/pretrain/debug.yaml", overrides)


def test_zero_lr_is_a_supported_value():
    cfg = load_config(REPO / "configs/pretrain/debug.yaml", ["optim.lr=0", "optim.min_lr=0"])
    assert cfg.optim.lr == 0.0  # trains nothing (tests/test_optim.py: no update, no decay)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(UserError, match="config file not found: .*nope.yaml"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(UserError, match="bad.yaml: not valid YAML"):
        load_config(bad)
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("model:\n  sise: debug\n")
    with pytest.raises(UserError, match=r"model\.sise"):
        load_config(unknown)


def test_cli_prints_one_line_and_exits_2(tmp_path, capsys):
    code = cli.main(["pretrain", str(REPO / "configs/pretrain/debug.yaml"), "trainer.bogus=1"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and "trainer.bogus" in err and err.startswith("aimv2 pretrain: error:")
    assert cli.main(["pretrain", str(tmp_path / "missing.yaml")]) == 2
    assert "config file not found" in capsys.readouterr().err


def test_missing_shard_is_reported_before_training(tmp_path, capsys):
    code = cli.main(
        [
            "pretrain",
            str(REPO / "configs/pretrain/debug.yaml"),
            f"data.sources=[{{urls: '{tmp_path}/{{00000..00001}}.tar'}}]",
            f"run_dir={tmp_path}/run",
        ]
    )
    assert code == 2
    assert f"shard not found: {tmp_path}/00000.tar" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_base_chains_resolve_relative_to_the_file_and_overlays_win(tmp_path):
    (tmp_path / "recipes").mkdir()
    (tmp_path / "root.yaml").write_text("run_dir: runs/root\noptim:\n  lr: 0.5\n  min_lr: 0.0\n")
    (tmp_path / "recipes" / "mid.yaml").write_text("base: ../root.yaml\nmodel:\n  img_size: 28\noptim:\n  lr: 0.25\n")
    (tmp_path / "recipes" / "top.yaml").write_text("base: mid.yaml\nrun_dir: runs/top\n")
    cfg = load_config([REPO / "configs/pretrain/debug.yaml", tmp_path / "recipes" / "top.yaml"], ["optim.lr=0.125"])
    assert (cfg.run_dir, cfg.model.img_size, cfg.optim.min_lr, cfg.optim.lr) == ("runs/top", 28, 0.0, 0.125)
    assert cfg.data.sources[0].name == "demo_digits"  # debug.yaml, the first file, stays under the chain
    save_config(cfg, tmp_path / "saved.yaml")
    assert "base" not in (tmp_path / "saved.yaml").read_text()


@pytest.mark.parametrize(
    "files,match",
    [
        (
            {"a.yaml": "base: b.yaml\n", "b.yaml": "base: a.yaml\n"},
            r"a\.yaml: its base chain loops \(a\.yaml -> b\.yaml -> a\.yaml\)",
        ),
        ({"a.yaml": "base: a.yaml\n"}, r"its base chain loops \(a\.yaml -> a\.yaml\)"),
        ({"a.yaml": "base: gone.yaml\n"}, r"config file not found: .*gone\.yaml \(the base of .*a\.yaml\)"),
        ({"a.yaml": "base: [x.yaml]\n"}, r"a\.yaml: 'base' must name a config file"),
    ],
)
def test_base_mistakes_are_one_line_errors(tmp_path, files, match):
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    with pytest.raises(UserError, match=match):
        load_config(tmp_path / "a.yaml")


def test_every_section_validates_itself_under_any_parent():
    """The trainer section's checks run for compress as for pre-training; keys are named in full."""
    from aimv2.compress.config import CompressConfig

    with pytest.raises(UserError, match=r"config key 'trainer\.keep_checkpoints': must be >= 1"):
        load_config(REPO / "configs/compress/tiny.yaml", ["trainer.keep_checkpoints=0"], schema=CompressConfig)
    with pytest.raises(UserError, match=r"config key 'trainer\.strategy': fsdp needs GPUs"):
        load_config(REPO / "configs/compress/tiny.yaml", ["trainer.strategy=fsdp"], schema=CompressConfig)
    with pytest.raises(UserError, match=r"config key 'data\.sources\.0\.weight': must be > 0"):
        load_config(REPO / "configs/pretrain/debug.yaml", ["data.sources=[{urls: 'x.tar', weight: 0}]"])
    with pytest.raises(UserError, match=r"config key 'visualize\.prefix_ratio': must be within \(0, 1\)"):
        load_config(REPO / "configs/pretrain/debug.yaml", ["visualize.prefix_ratio=1.5"])
    with pytest.raises(UserError, match=r"config key 'objective': alpha and text_weight are both 0"):
        load_config(REPO / "configs/pretrain/debug.yaml", ["objective.alpha=0", "objective.text_weight=0"])
