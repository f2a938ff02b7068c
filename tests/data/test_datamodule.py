"""Batches from the shapes DataModule: tokens, padding, references and ground truth."""

from __future__ import annotations

from types import SimpleNamespace

import torch
from lightning import Trainer

from captioner.data import ShapesDataModule
from captioner.data.datamodule import EpochShuffle


def test_batches_are_well_formed() -> None:
    dm = ShapesDataModule(image_size=32, num_train=40, num_val=10, num_test=6, batch_size=8,
                          holdout_combos=[["red", "circle"]])  # fmt: skip
    tok = dm.tokenizer
    batch = next(iter(dm.train_dataloader()))
    assert batch["images"].shape == (8, 3, 32, 32) and batch["images"].dtype == torch.float32
    assert batch["images"].min() >= -1.0 and batch["images"].max() <= 1.0
    tokens = batch["tokens"]
    assert torch.all(tokens[:, 0] == tok.bos_id)
    for row, refs in zip(tokens, batch["references"], strict=True):
        ids = row.tolist()
        end = ids.index(tok.eos_id)
        assert all(i == tok.pad_id for i in ids[end + 1 :])
        assert tok.decode(ids) in refs  # the trained caption is one of the image's references
    assert batch["split"] == "train" and len(batch["scenes"]) == 8
    names = [loader.collate_fn.split for loader in dm.test_dataloader()]
    assert names == ["test", "test_comp"]


def test_vocabulary_comes_from_training_captions_only() -> None:
    dm = ShapesDataModule(image_size=32, num_train=30, holdout_combos=[["red", "circle"]])
    words = set(dm.tokenizer.itos)
    train_words = {
        w for i in range(30) for c in dm.world.scene("train", i).captions for w in c.split()
    }
    assert words - {"<pad>", "<bos>", "<eos>", "<unk>"} == train_words


def test_training_draws_different_references_of_an_image() -> None:
    torch.manual_seed(0)
    dm = ShapesDataModule(image_size=32, num_train=8, batch_size=8, min_objects=3, max_objects=3)
    loader = dm.train_dataloader()
    batches = [loader.collate_fn([loader.dataset[(0, epoch)]]) for epoch in range(30)]
    drawn = {tuple(batch["tokens"][0].tolist()) for batch in batches}
    assert len(drawn) > 1  # image 0 in 30 epochs
    again = loader.collate_fn([loader.dataset[(0, 0)]])["tokens"]
    assert torch.equal(again, batches[0]["tokens"])  # and the same one for the same epoch


def test_batches_survive_lightning_input_conversion() -> None:
    """`precision=bf16-true` converts every tensor of a batch and refuses frozen dataclasses."""
    from lightning.pytorch.plugins.precision import HalfPrecision

    dm = ShapesDataModule(image_size=32, num_train=8, num_val=4, num_test=4, batch_size=4)
    batch = HalfPrecision("bf16-true").convert_input(next(iter(dm.val_dataloader())))
    assert batch["images"].dtype == torch.bfloat16
    assert [
        scene.captions[0] in refs
        for scene, refs in zip(batch["scenes"], batch["references"], strict=True)
    ] == [True] * 4


def test_word_boxes_follow_the_reference_each_image_is_trained_on() -> None:
    torch.manual_seed(0)
    dm = ShapesDataModule(image_size=32, num_train=16, batch_size=16, min_objects=2)
    batch = next(iter(dm.train_dataloader()))
    tok, named = dm.tokenizer, 0
    for row, boxes, scene in zip(
        batch["tokens"], batch["word_boxes"], batch["scenes"], strict=True
    ):
        pick = scene.captions.index(tok.decode(row.tolist()))
        alignment = scene.alignments[pick]
        for position in range(len(row)):  # token i is word i - 1
            k = alignment[position - 1] if 1 <= position <= len(alignment) else -1
            expected = scene.objects[k].box if k >= 0 else (0, 0, 0, 0)
            assert boxes[position].tolist() == list(expected)
            named += k >= 0
    assert named > 16  # every caption names at least one object, most several words each


def test_batches_are_pinned_only_for_a_gpu() -> None:
    """Pinning helps copies to a GPU; on a CPU run it would only cost time."""
    dm = ShapesDataModule(image_size=32, num_train=8, num_val=4, num_test=4, batch_size=2)
    assert dm.pin_memory and not dm.pins_memory()  # no trainer yet
    dm.trainer = Trainer(accelerator="cpu", logger=False, enable_progress_bar=False)
    assert not dm.pins_memory() and not dm.val_dataloader().pin_memory
    # what a GPU trainer's strategy reports (none on this machine to build one with)
    gpu = SimpleNamespace(root_device=torch.device("cuda", 0))
    dm.trainer = SimpleNamespace(strategy=gpu, world_size=1)
    assert dm.pins_memory() and dm.val_dataloader().pin_memory
    dm.pin_memory = False
    assert not dm.pins_memory()


def test_the_training_order_depends_on_seed_and_epoch_and_is_dealt_out_to_ranks() -> None:
    ranks = [EpochShuffle(10, seed=3, epoch=1, rank=r, world_size=3) for r in range(3)]
    passes = [[list(sampler) for _ in range(2)] for sampler in ranks]  # epochs 1 and 2
    shares = [[index for index, _ in epochs[0]] for epochs in passes]
    assert [len(share) for share in shares] == [len(sampler) for sampler in ranks] == [3, 3, 3]
    assert len(set().union(*shares)) == 9  # disjoint; the tenth image waits for another epoch
    assert {epoch for epochs in passes for _, epoch in epochs[0]} == {1}
    assert {epoch for epochs in passes for _, epoch in epochs[1]} == {2}
    assert passes[1][1] != passes[1][0]  # a new order each pass
    ranks[1].set_epoch(7)  # Lightning's epoch number is not taken: the sampler counts
    assert [epoch for _, epoch in ranks[1]] == [3, 3, 3]
    assert [i for i, _ in EpochShuffle(10, seed=3, epoch=1, rank=1, world_size=3)] == shares[1]
    assert [i for i, _ in EpochShuffle(10, seed=4, epoch=1, rank=1, world_size=3)] != shares[1]

    resumed = EpochShuffle(10, seed=3, epoch=1, skip=2, rank=1, world_size=3)
    assert [i for i, _ in resumed] == shares[1][2:]  # what a run resumed mid-epoch goes on with
    assert list(resumed) == passes[1][1]  # and the next pass is the whole next epoch
