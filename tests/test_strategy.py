"""Scale-out configuration: every shipped strategy preset merges over every pretrain config and
validates, and builds the Lightning strategy it promises (DDP, FSDP wrapping timm Blocks, DeepSpeed
ZeRO-2/3 with offload). Lightning refuses FSDP and DeepSpeed on the CPU accelerator, so those are
checked as built objects here and run only on GPUs; the model-side switches (activation
checkpointing, compile) run here on CPU."""

from pathlib import Path

import pytest
import torch
from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy
from timm.models.vision_transformer import Block

from aimv2 import cli
from aimv2.commands.pretrain import strategy_preset
from aimv2.config import load_config
from aimv2.engine.checkpointing import AtomicCheckpointIO
from aimv2.engine.optim import param_groups
from aimv2.engine.trainer import build_strategy, ddp_buffer_sync, prepare_model
from aimv2.errors import UserError
from aimv2.models import AIMv2, get_size
from conftest import REPO

PRESETS = sorted((REPO / "configs" / "strategy").glob("*.yaml"))
PRETRAIN = sorted((REPO / "configs" / "pretrain").glob("*.yaml"))


def test_the_six_presets_are_shipped():
    assert {p.stem for p in PRESETS} == {
        "ddp",
        "fsdp",
        "fsdp2",
        "deepspeed_zero2",
        "deepspeed_zero3",
        "deepspeed_zero3_offload",
    }


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.stem)
@pytest.mark.parametrize("recipe", PRETRAIN, ids=lambda p: p.stem)
def test_every_preset_merges_over_every_recipe(recipe, preset):
    cfg = load_config([recipe, preset], ["trainer.max_steps=10", "trainer.accelerator=gpu"])
    assert cfg.trainer.strategy in ("ddp", "fsdp", "fsdp2", "deepspeed") and cfg.trainer.precision == "bf16-mixed"
    assert cfg.model == load_config(recipe, ["trainer.max_steps=10"]).model  # presets touch trainer.* only


def built(name):
    cfg = load_config([REPO / "configs/pretrain/debug.yaml", strategy_preset(name)], ["trainer.accelerator=gpu"])
    return build_strategy(cfg.trainer, batch_size=32)


def test_ddp_and_fsdp_presets_build_their_strategies():
    ddp = built("ddp")
    assert isinstance(ddp, DDPStrategy) and isinstance(ddp.checkpoint_io, AtomicCheckpointIO)
    # forward_sync_buffers=False (broadcast_buffers=False before torch 2.13): no buffer broadcast in forward
    assert ddp._ddp_kwargs == {**ddp_buffer_sync(), "gradient_as_bucket_view": True}
    assert list(ddp_buffer_sync().values()) == [False]
    fsdp = built("fsdp")
    assert isinstance(fsdp, FSDPStrategy) and isinstance(fsdp.checkpoint_io, AtomicCheckpointIO)
    assert fsdp.kwargs["auto_wrap_policy"]._module_classes == {Block} and fsdp._activation_checkpointing_kwargs
    assert fsdp.sharding_strategy.name == "FULL_SHARD" and fsdp._state_dict_type == "full"
    assert fsdp.kwargs["use_orig_params"] is True  # optimizer param groups and compile need original params


def test_ddp_wraps_without_a_deprecation_warning_and_syncs_no_buffers_in_forward(tmp_path):
    """Our DDP keyword is the installed torch's current one: no FutureWarning about `broadcast_buffers` at
        every start (torch >= 2.13), and no forward broadcasts rank 0's buffers (the per-rank data counters are
    kept apart from the buffers anyway: engine.logs.RankCounters)."""
    import warnings

    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    model = torch.nn.Linear(2, 2)
    model.register_buffer("skipped_samples", torch.zeros((), dtype=torch.long))
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            ddp = DistributedDataParallel(model, **ddp_buffer_sync())
        assert getattr(ddp, "forward_sync_buffers", None) is False or ddp.broadcast_buffers is False
    finally:
        dist.destroy_process_group()


def test_fsdp2_preset_builds_a_model_parallel_strategy_saving_dcp_directories():
    from lightning.pytorch.strategies import ModelParallelStrategy

    from aimv2.engine.trainer import FSDP2Strategy

    strategy = built("fsdp2")
    assert isinstance(strategy, FSDP2Strategy) and isinstance(strategy, ModelParallelStrategy)
    assert strategy._save_distributed_checkpoint is True and strategy._tensor_parallel_size == 1
    assert strategy._data_parallel_size == "auto"  # every process, resolved at setup (FSDP2Strategy.setup_environment)
    # Unlike fsdp and deepspeed, it validates on the CPU accelerator: Lightning runs it there with gloo.
    cfg = load_config([REPO / "configs/pretrain/debug.yaml", strategy_preset("fsdp2")], ["trainer.accelerator=cpu"])
    assert cfg.trainer.strategy == "fsdp2" and isinstance(build_strategy(cfg.trainer), FSDP2Strategy)


@pytest.mark.parametrize(
    "name,stage,offload",
    [("deepspeed_zero2", 2, False), ("deepspeed_zero3", 3, False), ("deepspeed_zero3_offload", 3, True)],
)
def test_deepspeed_presets_build_zero_configs(name, stage, offload):
    pytest.importorskip("deepspeed")
    strategy = built(name)
    zero = strategy.config["zero_optimization"]
    assert zero["stage"] == stage
    assert ("offload_optimizer" in zero) == offload and ("offload_param" in zero) == (offload and stage == 3)
    assert strategy.config["train_micro_batch_size_per_gpu"] == 32
    assert type(strategy).__name__ == "AtomicDeepSpeedStrategy"  # ZeRO directories written under a temp name


def test_activation_checkpointing_and_compile_keep_checkpoints_interchangeable():
    torch.manual_seed(0)
    plain = AIMv2(get_size("debug"), 28, vocab_size=64, max_text_len=8)
    wrapped = AIMv2(get_size("debug"), 28, vocab_size=64, max_text_len=8)
    wrapped.load_state_dict(plain.state_dict())
    cfg = load_config(
        [REPO / "configs/pretrain/debug.yaml"], ["trainer.activation_checkpointing=true", "trainer.compile=true"]
    ).trainer
    prepare_model(wrapped, cfg)
    blocks = [m for m in wrapped.modules() if isinstance(m, Block)]
    assert len(blocks) == 4 and all(b._compiled_call_impl is not None for b in blocks)  # 2 encoder + 2 decoder
    assert sum(type(m).__name__ == "CheckpointWrapper" for m in wrapped.modules()) == 4
    assert wrapped.state_dict().keys() == plain.state_dict().keys()  # no wrapper prefixes in checkpoints
    # The optimizer's no-decay split is the same through the wrappers.
    sizes = [[len(g["params"]) for g in param_groups(model, 0.1)] for model in (wrapped, plain)]
    assert sizes[0] == sizes[1]
    # Recomputation gives the same gradients (compile left out here: it needs a C++ toolchain at run time).
    checkpointed = AIMv2(get_size("debug"), 28, vocab_size=64, max_text_len=8)
    checkpointed.load_state_dict(plain.state_dict())
    prepare_model(
        checkpointed,
        load_config(REPO / "configs/pretrain/debug.yaml", ["trainer.activation_checkpointing=true"]).trainer,
    )
    images, tokens = torch.randn(2, 3, 28, 28), torch.randint(0, 64, (2, 8))
    prefix = torch.tensor([1, 2])
    for model in (plain, checkpointed):
        pixels, logits = model(images, tokens, prefix)
        (pixels.square().mean() + logits.logsumexp(-1).mean()).backward()
    for (name, a), b in zip(plain.named_parameters(), checkpointed.parameters(), strict=True):
        assert torch.allclose(a.grad, b.grad, atol=1e-6), name


def test_strategy_option_on_the_command_line(tmp_path, capsys):
    parser = cli.build_parser()
    args = cli.parse_args(parser, ["pretrain", "c.yaml", "a=1", "--strategy", "fsdp", "b=2"])
    assert (args.config, args.strategy, args.overrides) == ("c.yaml", "fsdp", ["a=1", "b=2"])
    args = cli.parse_args(parser, ["pretrain", "--strategy=ddp", "c.yaml"])
    assert (args.config, args.strategy, args.overrides) == ("c.yaml", "ddp", [])
    assert strategy_preset("deepspeed_zero3") == REPO / "configs/strategy/deepspeed_zero3.yaml"
    with pytest.raises(UserError, match=r"--strategy: no preset 'zero9' \(known: ddp, deepspeed_zero2"):
        strategy_preset("zero9")
    code = cli.main(
        ["pretrain", str(REPO / "configs/pretrain/debug.yaml"), "--strategy", "ddp", "trainer.strategy=megatron"]
    )
    assert (
        code == 2
        and "config key 'trainer.strategy': must be one of auto, ddp, fsdp, deepspeed" in capsys.readouterr().err
    )


@pytest.mark.parametrize(
    "argv,dest",
    [
        (["pretrain", "c.yaml", "--strategy", "ddp", "a=1"], "overrides"),
        (["demo", "--out", "d", "a=1"], "overrides"),
        (["probe", "p.yaml", "--devices", "1", "a=1"], "items"),
        (["ablation", "c.yaml", "--seeds", "0", "--task", "t=x,y", "a=1"], "items"),
        (["compress", "train", "c.yaml", "--rehearse-devices", "2", "a=1"], "overrides"),
    ],
)
def test_every_verb_with_overrides_takes_them_after_its_options(argv, dest):
    assert getattr(cli.parse_args(cli.build_parser(), argv), dest)[-1] == "a=1"


@pytest.mark.parametrize(
    "override,match",
    [
        ("trainer.zero_stage=1", r"trainer\.zero_stage"),
        ("trainer.offload=true", r"trainer\.offload"),
        ("trainer.strategy=fsdp", r"trainer\.strategy': fsdp needs GPUs"),
        ("trainer.keep_checkpoints=0", r"trainer\.keep_checkpoints"),
        ("trainer.max_nonfinite_steps=0", r"trainer\.max_nonfinite_steps"),
        ("trainer.accumulate_grad_batches=0", r"trainer\.accumulate_grad_batches"),
    ],
)
def test_bad_trainer_values_name_the_key(override, match):
    with pytest.raises(UserError, match=match):
        load_config(REPO / "configs/pretrain/debug.yaml", [override])


def test_launch_templates_are_what_the_guide_submits():
    for name in ("slurm_1node.sbatch", "slurm_multinode.sbatch"):
        text = (REPO / "launch" / name).read_text()
        for needle in (
            "#SBATCH --ntasks-per-node=",
            "#SBATCH --signal=SIGUSR1@90",
            "#SBATCH --requeue",
            "srun ",
            'trainer.devices="$SLURM_NTASKS_PER_NODE"',
            "${STRATEGY:+--strategy",
        ):
            assert needle in text, (name, needle)
    assert "NCCL" in (REPO / "launch/slurm_multinode.sbatch").read_text()
    readme = (REPO / "docs" / "scale-out.md").read_text()  # the SLURM guide
    assert "launch/slurm_1node.sbatch" in readme and "launch/slurm_multinode.sbatch" in readme
    assert Path(REPO / "launch/torchrun.sh").stat().st_mode & 0o111
