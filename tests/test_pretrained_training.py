"""Training on a pretrained backbone: its weights from a file, its preprocessing in the
checkpoint, partial freezing, the checkpoint rebuilt offline; and training from stored
features, which must give the loss and gradients of the live frozen encoder."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import save_file

from captioner.cli import caption as caption_command
from captioner.core.checkpoint import export, load_checkpoint
from captioner.core.inference import Captioner
from captioner.core.models import CaptionerConfig, CaptionerModel
from captioner.data import ImagePreprocess, ShapesDataModule
from captioner.training.callbacks import weights_hash
from captioner.training.lit_module import teacher_forced_loss
from captioner.training.tasks import evaluate, train
from tests.helpers import QUIET, compose_train

NAME = "vit_small_patch16_224.dino"  # trained on ImageNet statistics, not our default 0.5s
TINY = {"patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2}
TINY_OVERRIDE = "model.encoder.kwargs={patch_size:8,embed_dim:32,depth:2,num_heads:2}"
SHORT = (
    "experiment=shapes", "model/encoder=timm", f"model.encoder.name={NAME}", TINY_OVERRIDE,
    "data.image_size=[32,48]", "data.num_train=64", "data.num_val=8", "data.num_test=8",
    "data.batch_size=16", "model.decoder.dim=32", "model.decoder.heads=2",
    "trainer.max_steps=6", "trainer.val_check_interval=4", "trainer.precision=32", *QUIET,
)  # fmt: skip


@pytest.fixture(scope="module")
def pretrained_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A shapes run on a timm ViT whose starting weights are a file, its last block trained."""
    root = tmp_path_factory.mktemp("pretrained")
    torch.manual_seed(5)
    backbone = timm.create_model(NAME, num_classes=0, img_size=(32, 48), **TINY)
    weights = root / "backbone.safetensors"
    save_file(backbone.state_dict(), weights)
    cfg = compose_train(
        *SHORT, f"model.encoder.weights={weights}", "model.encoder.freeze=last_1",
        output_dir=root / "run",
    )  # fmt: skip
    metrics, objects = train(cfg)
    return {"root": root, "backbone": backbone, "weights": weights, "metrics": metrics,
            "objects": objects, "ckpt": root / "run" / "checkpoints" / "last.ckpt"}  # fmt: skip


def test_training_keeps_the_frozen_blocks_and_the_backbones_preprocessing(pretrained_run):
    contents = load_checkpoint(pretrained_run["ckpt"])
    start = pretrained_run["backbone"].state_dict()
    trained = {k.removeprefix("encoder.model."): v for k, v in contents.state_dict.items()
               if k.startswith("encoder.model.")}  # fmt: skip
    assert all(torch.equal(trained[k], start[k]) for k in start if k.startswith("blocks.0."))
    assert not torch.equal(trained["blocks.1.attn.qkv.weight"], start["blocks.1.attn.qkv.weight"])
    assert torch.equal(trained["patch_embed.proj.weight"], start["patch_embed.proj.weight"])
    # the backbone's mean, std and interpolation: in the checkpoint, and what training used
    expected = timm.get_pretrained_cfg(NAME).to_dict()
    assert contents.preprocess["mean"] == pytest.approx(expected["mean"])
    assert contents.preprocess["std"] == pytest.approx(expected["std"])
    assert contents.preprocess["interpolation"] == expected["interpolation"] == "bicubic"
    used = pretrained_run["objects"]["datamodule"].preprocess
    assert used == ImagePreprocess.from_dict(contents.preprocess)
    assert pretrained_run["metrics"]["train/steps"] == 6


def test_the_checkpoint_rebuilds_offline_and_captions(pretrained_run, tmp_path, capsys):
    """Without the weights file or a network: the library builds the architecture, the
    checkpoint (.ckpt or the safetensors export) fills in every weight."""
    pretrained_run["weights"].rename(tmp_path / "moved.safetensors")
    ckpt = pretrained_run["ckpt"]
    contents = load_checkpoint(ckpt)
    assert contents.config.encoder.weights is None and contents.config.encoder.kind == "timm"
    export(contents, tmp_path / "export")
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 70, 3), np.uint8))
    first, second = (
        Captioner.from_checkpoint(path).caption(image, return_attention=True)[0]
        for path in (ckpt, tmp_path / "export")
    )
    assert first.text == second.text
    torch.testing.assert_close(first.image_attention, second.image_attention)
    assert first.image_attention.shape[-2:] == (4, 6)  # the patches only: CLS left out
    image.save(tmp_path / "photo.png")
    figures = tmp_path / "figures"
    code = caption_command.main(
        ["--ckpt", str(ckpt), "--beam-size", "1", "--save-attention", str(figures), "--json",
         str(tmp_path / "photo.png")]
    )  # fmt: skip
    assert code == 0
    (printed,) = json.loads(capsys.readouterr().out)
    assert printed["caption"] == first.text
    assert {p.name for p in figures.iterdir()} == {"photo.png", "photo.gif", "photo_matrices.png"}
    eval_cfg = compose_train(f"ckpt_path={ckpt}", output_dir=tmp_path / "eval",
                             config_name="eval")  # fmt: skip
    metrics, _ = evaluate(eval_cfg)
    assert {"test/CIDEr", "test/scene_acc", "test/METEOR"} <= set(metrics)


def tiny_data(tmp_path: Path, **changes: object) -> ShapesDataModule:
    data = ShapesDataModule(
        image_size=(32, 48), num_train=40, num_val=4, num_test=4, max_objects=2, batch_size=16,
        cache_features=True, feature_dir=str(tmp_path / "features"), **changes,
    )  # fmt: skip
    data.tokenizer  # noqa: B018  (built from the training captions)
    return data


def tiny_net(vocab: int, seed: int = 0) -> CaptionerModel:
    torch.manual_seed(seed)
    config = CaptionerConfig.from_dict({
        "vocab_size": vocab, "max_len": 24,
        "encoder": {"kind": "timm", "name": NAME, "image_size": (32, 48), "kwargs": TINY},
        "decoder": {"dim": 32, "depth": 2, "heads": 2},
    })  # fmt: skip
    net = CaptionerModel(config)
    net.encoder.freeze("all")
    return net


class CountingEncoder:
    """`store_features`'s encode, counting the images it encodes; fails after `fail_after`."""

    def __init__(self, net: CaptionerModel, fail_after: int | None = None) -> None:
        self.net, self.images, self.fail_after = net, 0, fail_after

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if self.fail_after is not None and self.images >= self.fail_after:
            raise KeyboardInterrupt("killed while storing features")
        self.images += len(images)
        return self.net.eval().encode(images)[0]


def store(data: ShapesDataModule, net: CaptionerModel, encode: CountingEncoder) -> None:
    description = {"name": "tiny", "weights": weights_hash(net.encoder)}
    data.store_features(encode, description, net.image_tokens, net.encoder.dim)


def test_stored_features_give_the_live_encoders_loss_and_gradients(tmp_path: Path) -> None:
    data = tiny_data(tmp_path)
    net = tiny_net(len(data.tokenizer))
    store(data, net, CountingEncoder(net))
    batch = next(iter(data.train_dataloader()))
    assert "images" not in batch and batch["features"].dtype == torch.float16
    rows = batch["image_ids"]  # a shapes scene's id is its index, its row in the store
    images = torch.stack([data.feature_images("train")[r]["image"] for r in rows])
    live = data.preprocess.normalize(images)
    pad = data.tokenizer.pad_id
    grads = []
    for inputs in ({"images": live}, {"images": None, "memory": batch["features"].float()}):
        net.zero_grad()
        loss, _ = teacher_forced_loss(net, tokens=batch["tokens"], pad_id=pad, **inputs)
        loss.backward()
        grads.append((loss.detach(), [p.grad.clone() for p in net.decoder.parameters()]))
    (live_loss, live_grads), (stored_loss, stored_grads) = grads
    torch.testing.assert_close(stored_loss, live_loss, rtol=2e-3, atol=2e-3)  # float16 storage
    for a, b in zip(stored_grads, live_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=0.05, atol=2e-3)
    assert not any(p.grad is not None for p in net.encoder.parameters())


def test_the_store_is_rebuilt_when_weights_or_preprocessing_change_and_resumes(tmp_path):
    data = tiny_data(tmp_path)
    net = tiny_net(len(data.tokenizer))
    killed = CountingEncoder(net, fail_after=16)  # one batch of 16 stored, then killed
    with pytest.raises(KeyboardInterrupt):
        store(data, net, killed)
    resumed = CountingEncoder(net)
    store(data, net, resumed)
    assert resumed.images == 40 - 16  # only the rows not yet on disk
    again = CountingEncoder(net)
    store(tiny_data(tmp_path), net, again)
    assert again.images == 0  # the same key: reused
    other = tiny_net(len(data.tokenizer), seed=1)  # other weights
    rebuilt = CountingEncoder(other)
    store(tiny_data(tmp_path), other, rebuilt)
    assert rebuilt.images == 40
    changed = tiny_data(tmp_path)
    changed.use_preprocess(ImagePreprocess((32, 48), (0.4, 0.4, 0.4), (0.2, 0.2, 0.2)))
    recoded = CountingEncoder(other)
    store(changed, other, recoded)
    assert recoded.images == 40


def test_training_from_stored_features_end_to_end(tmp_path: Path) -> None:
    cfg = compose_train(
        *SHORT, "model.encoder.freeze=all", "data.cache_features=true",
        f"data.feature_dir={tmp_path / 'features'}", output_dir=tmp_path / "run",
    )  # fmt: skip
    metrics, objects = train(cfg)
    store_ = objects["datamodule"].features
    assert store_ is not None and store_.complete and store_.rows == 64
    assert metrics["train/steps"] == 6 and np.isfinite(metrics["test/scene_acc"])
    unfrozen = compose_train(*SHORT, "data.cache_features=true", output_dir=tmp_path / "bad")
    with pytest.raises(Exception, match="model.encoder.freeze=all"):
        train(unfrozen)
