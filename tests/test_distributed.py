"""Scaling out: DDP runs split the training data, score every evaluation image once, agree on
the metrics and write each file once; the trainer and SLURM configs build what they name."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from hydra.errors import InstantiationException
from hydra.utils import get_class, instantiate
from lightning.pytorch.utilities import rank_zero_only

from captioner.cli.config import compose
from captioner.core.errors import ConfigError, DataError
from captioner.core.models import CaptionerModel
from captioner.core.models.blocks import Block, DecoderBlock
from captioner.data import ShapesDataModule, WebDataModule
from captioner.metrics import GroundingMeter
from captioner.training.evaluation import EvalRow, gather_rows, merge_rows
from tests.helpers import (
    DDP_RUN,
    TINY_IMAGE_MODEL,
    compose_train,
    tiny_config,
    train_script,
    write_shards,
)

CPU = SimpleNamespace(root_device=torch.device("cpu"))  # a CPU trainer's strategy
TINY_IMAGES = (*TINY_IMAGE_MODEL, "data.batch_size=2", "data.num_workers=0", "data.epoch_samples=8")
SHAPES = (
    "experiment=shapes_tiny", "data.num_train=64", "data.num_val=9", "data.num_test=9",
    "data.batch_size=4",
)  # fmt: skip


def shapes_data(root: Path) -> tuple[tuple[str, ...], dict[str, list]]:
    """Shapes with odd val/test sizes, so a padding sampler would score an image twice."""
    every = list(range(9))
    return SHAPES, {"val": every, "test": every, "test_comp": every}


def shard_data(root: Path) -> tuple[tuple[str, ...], dict[str, list]]:
    """One validation shard for two processes (dealt out by sample) and three test shards
    (dealt out by shard, two to rank 0)."""
    keys = {"val": [f"00000{k:04d}" for k in range(5)]}
    keys["test"] = [f"{s:05d}{k:04d}" for s in range(3) for k in range(2)]
    paths = {
        "train_shards": write_shards(root, "train", shards=2, per_shard=4),
        "val_shards": write_shards(root, "val", shards=1, per_shard=5),
        "test_shards": write_shards(root, "test", shards=3, per_shard=2),
    }
    overrides = ("data=webdataset", *(f"data.{k}='{v}'" for k, v in paths.items()), *TINY_IMAGES)
    return overrides, keys


@pytest.mark.slow
@pytest.mark.parametrize("data", [shapes_data, shard_data], ids=["shapes", "webdataset"])
def test_ddp_splits_training_and_scores_every_image_once(data, tmp_path: Path) -> None:
    overrides, expected = data(tmp_path / "data")
    result = train_script(*overrides, *DDP_RUN, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    runs = list((tmp_path / "root" / "logs" / "train" / "runs").iterdir())
    assert len(runs) == 1  # rank 1 ran in rank 0's folder, not in a second one
    run = runs[0]
    probes = [json.loads((run / f"probe_rank{r}.json").read_text()) for r in range(2)]

    # training: each process saw its own images
    train = [set(p["train"]) for p in probes]
    assert train[0] and train[1] and not train[0] & train[1]

    # evaluation: each image in exactly one process's share, scored once, on rank 0
    for stage, splits in (("val", ["val"]), ("test", [s for s in expected if s != "val"])):
        for split in splits:
            shares = [p[stage].get(split, []) for p in probes]
            assert shares[0] and shares[1], (split, shares)
            assert sorted(shares[0] + shares[1]) == sorted(expected[split]), (split, shares)
            assert probes[0]["predictions"][split] == sorted(expected[split])
    assert probes[1]["predictions"] == {}
    assert probes[0]["java"] > 0 and probes[1]["java"] == 0  # pycocoevalcap runs on rank 0

    # every rank ends with the same metrics, which are the ones written, and the same best
    metrics = probes[0]["metrics"]
    assert {"test/CIDEr", "test/loss"} <= set(metrics) and probes[1]["metrics"] == metrics
    saved = json.loads((run / "metrics.json").read_text())
    assert {k: v for k, v in saved.items() if k in metrics} == pytest.approx(metrics)
    assert probes[0]["best"] == probes[1]["best"]

    # files: rank 1 writes nothing; rank 0 writes metrics.json once and the checkpoints
    assert probes[1]["writes"] == []
    assert probes[0]["writes"].count("metrics.json") == 1
    checkpoints = {p.name for p in (run / "checkpoints").iterdir()}
    assert checkpoints == {"last.ckpt", Path(probes[0]["best"]).name}
    assert {f"checkpoints/{name}" for name in checkpoints} <= set(probes[0]["writes"])
    for name in checkpoints:
        ckpt = torch.load(run / "checkpoints" / name, map_location="cpu", weights_only=True)
        assert ckpt["captioner"]["config"] and ckpt["state_dict"]
    assert result.stdout.count("headline metrics") == 1  # the table is printed once


def test_eval_sampler_gives_each_process_a_share_without_repeats() -> None:
    dm = ShapesDataModule(image_size=32, num_train=8, num_val=5, num_test=1, batch_size=2)
    shares = []
    for rank in range(2):
        dm.trainer = SimpleNamespace(
            world_size=2,
            strategy=CPU,
            distributed_sampler_kwargs={"num_replicas": 2, "rank": rank},
        )
        shares.append([i for batch in dm.val_dataloader() for i in batch["image_ids"]])
    assert shares == [[0, 2, 4], [1, 3]]
    with pytest.raises(ConfigError, match="the test split has 1 images for 2 processes"):
        dm.test_dataloader()


@pytest.mark.parametrize("num_workers", [0, 2])
def test_eval_shards_are_shared_out_by_sample_when_fewer_than_processes(
    num_workers: int, tmp_path: Path
) -> None:
    train = write_shards(tmp_path, "train", shards=2, per_shard=2)
    val = write_shards(tmp_path, "val", shards=2, per_shard=3)
    shares = []
    for rank in range(3):  # 2 shards, 3 processes
        dm = WebDataModule(train, val, image_size=32, num_workers=num_workers, min_freq=1)
        dm.trainer = SimpleNamespace(global_rank=rank, world_size=3, current_epoch=0, strategy=CPU)
        shares.append([key for batch in dm.val_dataloader() for key in batch["image_ids"]])
    keys = sorted(f"{s:05d}{k:04d}" for s in range(2) for k in range(3))
    assert all(shares) and sorted(k for share in shares for k in share) == keys


def test_gathered_rows_count_each_image_once() -> None:
    """What a padding sampler does to the last batch: the repeated image and its grounding
    are counted once. Two images under one id are refused, not merged."""
    attention = torch.zeros(1, 1, 2, 2, 2)  # (L, H, T, grid 2 x 2)
    attention[..., 0, 0] = 1.0  # every word looks at the top-left patch

    def row(image_id: int, box: tuple[int, ...], source: str = "") -> EvalRow:
        meter = GroundingMeter(patch_size=8)
        meter.update(attention, [0, -1], [box])
        source = source or f"{image_id}.png"
        return EvalRow(
            image_id, source, "a caption", ["a reference"], 1.0, 3, 2.0, 2.0, None, None, meter
        )

    hit, miss = (0, 0, 8, 8), (8, 8, 16, 16)
    parts = gather_rows({"val": [row(0, hit), row(1, miss)]})
    assert parts is not None
    rows = merge_rows([*parts, {"val": [row(0, hit)]}])  # a second process's padded repeat
    assert [r.image_id for r in rows["val"]] == [0, 1]
    total = GroundingMeter(patch_size=8)
    for r in rows["val"]:
        total.merge(r.grounding)
    assert total.compute()["grounding/pointing_acc"] == 0.5 and total.words == 2
    with pytest.raises(DataError, match="image id 0 names two images of the val split"):
        merge_rows([*parts, {"val": [row(0, hit, "another.png")]}])


def test_ddp_configs_build_trainers(tmp_path: Path) -> None:
    cfg = compose_train("trainer=ddp_sim", output_dir=tmp_path)
    trainer = instantiate(cfg.trainer, logger=False, enable_progress_bar=False)
    assert type(trainer.strategy).__name__ == "DDPStrategy"
    assert trainer.strategy.process_group_backend == "gloo" and trainer.num_devices == 2
    # trainer=ddp on a machine without GPUs: only the accelerator and precision differ
    cfg = compose_train(
        "trainer=ddp", "trainer.accelerator=cpu", "trainer.precision=32-true",
        "trainer.devices=2", "trainer.num_nodes=3", output_dir=tmp_path,
    )  # fmt: skip
    trainer = instantiate(cfg.trainer, logger=False)  # every key is a Trainer argument
    assert type(trainer.strategy).__name__ == "DDPStrategy"
    assert trainer.num_devices == 2 and trainer.num_nodes == 3


def test_fsdp_config_wraps_each_encoder_and_decoder_block(tmp_path: Path) -> None:
    cfg = compose_train("trainer=fsdp", output_dir=tmp_path)
    assert cfg.trainer.precision == "bf16-mixed" and cfg.trainer.accelerator == "gpu"
    strategy = instantiate(cfg.trainer.strategy, _convert_="all")
    assert type(strategy).__name__ == "FSDPStrategy"
    assert strategy.sharding_strategy.name == "FULL_SHARD"
    policy = strategy.kwargs["auto_wrap_policy"]
    model = CaptionerModel(tiny_config())
    wrapped = [m for m in model.modules() if policy(module=m, recurse=False, nonwrapped_numel=0)]
    blocks = [m for m in model.modules() if isinstance(m, Block | DecoderBlock)]
    assert wrapped == blocks and len(blocks) == 4
    # Lightning runs FSDP on GPUs only; every other key is a Trainer argument (else TypeError)
    with pytest.raises(InstantiationException, match="requires a GPU accelerator"):
        instantiate(cfg.trainer, _convert_="all", accelerator="cpu")


def test_slurm_launcher_asks_for_one_task_per_gpu(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    cfg = compose("train", [
        "hydra/launcher=slurm", "trainer=ddp", "trainer.devices=4", "trainer.num_nodes=2",
        "experiment=shapes_tiny",
    ], hydra_config=True)  # fmt: skip
    launcher = cfg.hydra.launcher
    assert (launcher.nodes, launcher.tasks_per_node, launcher.gpus_per_node) == (2, 4, 4)
    assert launcher.partition is None and launcher.timeout_min > 60
    assert get_class(launcher._target_).__name__ == "SlurmLauncher"  # the plugin is there
    # what srun sets for task 5 of 8 (node 1, its second GPU): Lightning's SLURM environment
    # makes that task rank 5 of 8 and starts no processes of its own
    slurm = {
        "SLURM_NTASKS": "8", "SLURM_NTASKS_PER_NODE": "4", "SLURM_NNODES": "2",
        "SLURM_PROCID": "5", "SLURM_LOCALID": "1", "SLURM_NODEID": "1", "SLURM_JOB_ID": "77",
        "SLURM_JOB_NAME": launcher.name, "SLURM_NODELIST": "gpu[1-2]",
    }  # fmt: skip
    for key, value in slurm.items():
        monkeypatch.setenv(key, value)
    # the trainer makes this process rank 5 for Lightning's rank-zero-only logging: undone after
    monkeypatch.setattr(rank_zero_only, "rank", rank_zero_only.rank)
    trainer = instantiate(
        cfg.trainer, _convert_="all", accelerator="cpu", precision="32-true", logger=False,
        default_root_dir=str(tmp_path),
    )  # fmt: skip
    environment = trainer.strategy.cluster_environment
    assert type(environment).__name__ == "SLURMEnvironment"
    assert environment.creates_processes_externally
    assert (environment.global_rank(), environment.world_size()) == (5, 8)
    assert (environment.local_rank(), environment.node_rank()) == (1, 1)


@pytest.mark.slow
def test_submitit_launcher_runs_a_training_job(tmp_path: Path) -> None:
    """The launcher plugin that hydra/launcher=slurm uses, run locally (no SLURM needed)."""
    result = train_script(
        "-m", "hydra/launcher=submitit_local", "experiment=shapes_tiny", "debug=fdr",
        "data.num_train=64", "data.num_test=8", "callbacks.attention_samples=null",
        "callbacks.rich_progress_bar=null", "callbacks.lr_monitor=null", "~logger",
        f"hydra.sweep.dir={tmp_path / 'sweep'}", cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((tmp_path / "sweep" / "0" / "metrics.json").read_text())
    assert "test/CIDEr" in metrics
    assert list((tmp_path / "sweep" / ".submitit").iterdir())  # it went through submitit


@pytest.mark.slow
def test_sweep_that_would_start_ddp_processes_says_what_to_use(tmp_path: Path) -> None:
    result = train_script(
        "-m", "experiment=shapes_tiny", "trainer=ddp_sim", "data.num_train=64", "~logger",
        f"hydra.sweep.dir={tmp_path / 'sweep'}", cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 2
    assert "config error: a -m sweep cannot start the DDP processes itself" in result.stderr
