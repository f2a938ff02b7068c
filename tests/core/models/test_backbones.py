"""Library encoders (timm, OpenCLIP, torchvision ResNet) and the conv-stem ViT: weights from a
file, their attention read by hooks, freezing, optimizer groups, geometry with prefix tokens.

Every backbone here is tiny and random; a test that needs "pretrained" weights saves a
random model's weights to a file and loads them, as a user without a network would.
"""

from __future__ import annotations

from pathlib import Path

import open_clip
import pytest
import timm
import torch
import torchvision
from safetensors.torch import save_file

from captioner.core.checkpoint import CheckpointContents, export, load_checkpoint
from captioner.core.errors import ConfigError
from captioner.core.generation import Generated
from captioner.core.inference import to_captions
from captioner.core.models import CaptionerConfig, CaptionerModel
from captioner.data import ImagePreprocess, Tokenizer
from captioner.metrics.grounding import GroundingMeter
from captioner.training.lit_module import parameter_groups, teacher_forced_loss
from captioner.viz.overlay import attention_to_pixels

SIZE = (32, 48)  # non-square: a 4 x 6 grid of 8 px patches
TIMM = {"patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2, "reg_tokens": 2}
CLIP = {
    "embed_dim": 16,
    "vision_cfg": {"layers": 2, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 8, "vocab_size": 50, "width": 16, "heads": 1, "layers": 1},
}


def model_config(encoder: dict, **top: object) -> CaptionerConfig:
    decoder = {"dim": 24, "depth": 2, "heads": 2}
    return CaptionerConfig.from_dict(
        {"vocab_size": 19, "max_len": 10, "encoder": {"image_size": SIZE, **encoder},
         "decoder": decoder, **top}
    )  # fmt: skip


def timm_encoder(**changes: object) -> dict:
    return {"kind": "timm", "name": "vit_small_patch16_224", "kwargs": TIMM, **changes}


def clip_encoder(**changes: object) -> dict:
    return {"kind": "open_clip", "name": "ViT-B-16", "kwargs": CLIP, **changes}


@pytest.fixture(scope="module")
def timm_weights(tmp_path_factory: pytest.TempPathFactory) -> tuple[torch.nn.Module, Path]:
    """A random timm ViT (CLS + 2 registers) and its weights in a safetensors file."""
    torch.manual_seed(1)
    model = timm.create_model("vit_small_patch16_224", num_classes=0, img_size=SIZE, **TIMM)
    path = tmp_path_factory.mktemp("timm") / "vit.safetensors"
    save_file(model.state_dict(), path)
    return model.eval(), path


@pytest.fixture(scope="module")
def clip_weights(tmp_path_factory: pytest.TempPathFactory) -> tuple[torch.nn.Module, Path]:
    """A random OpenCLIP model and its whole (visual + text) weights in a .bin file."""
    torch.manual_seed(2)
    vision = {**CLIP["vision_cfg"], "image_size": SIZE}
    model = open_clip.create_model("ViT-B-16", **{**CLIP, "vision_cfg": vision})
    path = tmp_path_factory.mktemp("clip") / "open_clip_model.bin"
    torch.save(model.state_dict(), path)
    return model.eval(), path


def test_timm_weights_from_a_file_give_the_library_models_outputs(timm_weights) -> None:
    library, path = timm_weights
    net = CaptionerModel(model_config(timm_encoder(weights=str(path)))).eval()
    images = torch.randn(2, 3, *SIZE)
    tokens, _ = net.encoder(images)
    torch.testing.assert_close(tokens, library.forward_features(images), rtol=0, atol=0)
    assert net.encoder.num_prefix_tokens == 3 and net.encoder.grid_size == (4, 6)
    memory, _ = net.encode(images)  # the decoder reads the patches only, by default
    torch.testing.assert_close(memory, tokens[:, 3:], rtol=0, atol=0)


def test_open_clip_weights_from_a_file_give_the_library_models_outputs(clip_weights) -> None:
    library, path = clip_weights
    net = CaptionerModel(model_config(clip_encoder(weights=str(path)))).eval()
    images = torch.randn(2, 3, *SIZE)
    tokens, _ = net.encoder(images)
    library.visual.output_tokens = True
    pooled, patches = library.visual(images)  # its joint embedding: the CLS token, projected
    torch.testing.assert_close(tokens[:, 1:], patches, rtol=0, atol=0)
    torch.testing.assert_close(tokens[:, 0] @ library.visual.proj, pooled, rtol=1e-6, atol=1e-6)
    # a CLIP preprocessing, not ours
    assert net.encoder.preprocessing()["mean"] == pytest.approx(open_clip.OPENAI_DATASET_MEAN)


def test_resnet_weights_from_a_file_and_its_grid(tmp_path: Path) -> None:
    torch.manual_seed(3)
    library = torchvision.models.resnet18().eval()
    path = tmp_path / "resnet18.pth"
    torch.save(library.state_dict(), path)
    config = model_config({"kind": "resnet", "stages": 2, "weights": str(path)})
    net = CaptionerModel(config).eval()
    images = torch.randn(2, 3, *SIZE)
    x = library.maxpool(library.relu(library.bn1(library.conv1(images))))
    expected = library.layer2(library.layer1(x))  # (B, 128, 4, 6): stride 8
    tokens, weights = net.encoder(images, need_weights=True)
    norm = net.encoder.norm
    torch.testing.assert_close(tokens, norm(expected.flatten(2).transpose(1, 2)))
    assert net.encoder.grid_size == (4, 6) and net.encoder.patch_size == 8 and weights == []


@pytest.mark.parametrize(
    ("file", "message"),
    [
        ("missing.safetensors", "no such file"),
        ("notes.txt", "not a weights file"),
        ("other.safetensors", r"could not be loaded into timm model vit_small_patch16_224"),
    ],
)
def test_a_wrong_weights_file_is_named_in_one_error(tmp_path: Path, file: str, message: str):
    (tmp_path / "notes.txt").write_text("these are not weights\n")
    save_file({"layer.weight": torch.zeros(3, 3)}, tmp_path / "other.safetensors")
    path = tmp_path / file
    with pytest.raises(ConfigError, match=message) as err:
        CaptionerModel(model_config(timm_encoder(weights=str(path))))
    assert str(path) in str(err.value)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"name": "no_such_vit"}, "is not a timm model"),
        ({"kwargs": {"pretrained_cfg_overlay": {"file": "x"}}}, "may not set"),
        ({"kwargs": {"model_args": {"checkpoint_path": "x"}}}, "may not set checkpoint_path"),
        ({"pretrained": True, "weights": "x.pth"}, "keep one"),
        ({"read_prefix_tokens": "yes"}, "true or false"),
    ],
)
def test_backbone_config_errors_name_the_key(changes: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        CaptionerModel(model_config(timm_encoder(**changes)))


def test_timm_attention_equals_a_hand_computation(timm_weights) -> None:
    """The weights a hook reads from timm's own softmax, against q k^T computed from the
    block's parameters; the fused path is back on afterwards and gives the same tokens."""
    _, path = timm_weights
    encoder = CaptionerModel(model_config(timm_encoder(weights=str(path)))).encoder.eval()
    images = torch.randn(2, 3, *SIZE)
    with torch.no_grad():
        tokens, weights = encoder(images, need_weights=True)
        model = encoder.model
        x = model.norm_pre(model._pos_embed(model.patch_embed(images)))
        assert len(weights) == len(model.blocks)
        for block, got in zip(model.blocks, weights, strict=True):
            attn = block.attn
            qkv = attn.qkv(block.norm1(x)).unflatten(-1, (3, attn.num_heads, -1))  # (B,N,3,H,d)
            q, k = qkv[:, :, 0].transpose(1, 2), qkv[:, :, 1].transpose(1, 2)  # (B, H, N, d)
            expected = (q @ k.transpose(-2, -1) * attn.head_dim**-0.5).softmax(-1)
            torch.testing.assert_close(got, expected)
            x = block(x)
        fused, none = encoder(images)
    assert none is None and all(block.attn.fused_attn for block in model.blocks)
    torch.testing.assert_close(tokens, fused, rtol=1e-5, atol=1e-5)
    assert weights[0].shape == (2, 2, 27, 27)  # CLS + 2 registers + 4 x 6 patches


def test_open_clip_attention_equals_a_hand_computation(clip_weights) -> None:
    _, path = clip_weights
    encoder = CaptionerModel(model_config(clip_encoder(weights=str(path)))).encoder.eval()
    images = torch.randn(2, 3, *SIZE)
    with torch.no_grad():
        _, weights = encoder(images, need_weights=True)
        x = encoder.model._embeds(images)
        for block, got in zip(encoder.model.transformer.resblocks, weights, strict=True):
            mha = block.attn
            q, k, _ = (block.ln_1(x) @ mha.in_proj_weight.T + mha.in_proj_bias).chunk(3, -1)
            q, k = (t.unflatten(-1, (mha.num_heads, -1)).transpose(1, 2) for t in (q, k))
            expected = (q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5).softmax(-1)
            torch.testing.assert_close(got, expected)
            x = block(x)
    assert len(weights) == 2 and weights[0].shape == (2, 2, 25, 25)


@pytest.mark.parametrize("read_prefix", [False, True])
def test_image_attention_maps_each_patch_to_its_pixels_behind_prefix_tokens(read_prefix):
    """A CLS token and two registers lead the encoder's tokens: a look at patch (r, c) must
    land on patch (r, c)'s pixels in the caption's map, its overlay and pointing."""
    net = CaptionerModel(model_config(timm_encoder(read_prefix_tokens=read_prefix))).eval()
    prefix, (rows, cols) = net.image_prefix_tokens, net.encoder.grid_size
    assert prefix == (3 if read_prefix else 0)
    memory, _ = net.encode(torch.randn(1, 3, *SIZE))
    assert memory.shape[1] == net.image_tokens == prefix + rows * cols
    looks = [(0, 0), (3, 5), (1, 4)]  # (row, column) each token looks at
    attention = torch.zeros(1, 1, 1, len(looks), net.image_tokens)
    for t, (r, c) in enumerate(looks):
        attention[..., t, prefix + r * cols + c] = 1.0
    tokens = torch.tensor([[4, 5, 2]])
    out = Generated(
        tokens, torch.tensor([3]), torch.zeros(1, 3), attention, torch.ones(1, 1, 1, 3, 3)
    )
    tokenizer = type(
        "T", (), {"decode": lambda self, ids: "", "itos": [str(i) for i in range(19)]}
    )()
    (caption,) = to_captions(out, tokenizer, net)
    p = net.encoder.patch_size
    meter = GroundingMeter(p)
    boxes = [(c * p, r * p, (c + 1) * p, (r + 1) * p) for r, c in looks]  # (x0, y0, x1, y1)
    meter.update(caption.image_attention, [0, 1, 2], boxes)
    assert float(meter.hits[0, 0]) == len(looks)  # every look points inside its box
    for t, (r, c) in enumerate(looks):
        grid = caption.image_attention[0, 0, t]
        assert grid.shape == (rows, cols) and grid[r, c] == 1.0 and grid.sum() == 1.0
        heat = attention_to_pixels(grid, SIZE)  # (H, W)
        y, x = divmod(int(heat.argmax()), SIZE[1])
        assert (y // p, x // p) == (r, c)


@pytest.mark.parametrize("encoder", ["timm", "resnet", "vit"])
def test_freezing_keeps_frozen_weights_bit_identical_and_trains_the_rest(encoder: str) -> None:
    encoders = {
        "timm": timm_encoder(), "resnet": {"kind": "resnet", "stages": 2},
        "vit": {"kind": "vit", "patch_size": 8, "dim": 32, "depth": 2, "heads": 2},
    }  # fmt: skip
    net = CaptionerModel(model_config(encoders[encoder]))
    net.encoder.freeze("last_n=1")
    net.train()
    stages = net.encoder.stages()
    first, last = list(stages[0].parameters()), list(stages[-1].parameters())
    assert not any(p.requires_grad for p in first) and all(p.requires_grad for p in last)
    assert not stages[0].training and stages[-1].training  # frozen parts stay in eval mode
    before = {k: v.clone() for k, v in net.state_dict().items()}
    optimizer = torch.optim.AdamW(parameter_groups(net, 1e-2), lr=1e-2)
    images, tokens = torch.randn(4, 3, *SIZE), torch.randint(3, 19, (4, 6))
    teacher_forced_loss(net, images, tokens, pad_id=0)[0].backward()
    optimizer.step()
    after = net.state_dict()
    frozen = {f"encoder.{n}" for n, p in net.encoder.named_parameters() if not p.requires_grad}
    for name, module in net.encoder.named_modules():  # batch-norm statistics of frozen parts
        if not module.training:
            frozen |= {f"encoder.{name}.{b}" for b, _ in module.named_buffers(recurse=False)}
    frozen &= set(after)
    assert frozen and all(torch.equal(before[k], after[k]) for k in frozen)
    trained = [k for k, p in net.named_parameters() if p.requires_grad]
    assert any(k.startswith("encoder.") for k in trained)
    assert all(not torch.equal(before[k], after[k]) for k in trained if "decoder.blocks.1" in k)


def test_freeze_all_and_bad_values() -> None:
    net = CaptionerModel(model_config(timm_encoder()))
    net.encoder.freeze("all")
    assert not any(p.requires_grad for p in net.encoder.parameters())
    net.train()
    assert not any(m.training for m in net.encoder.model.modules())
    for bad in ("last_n=0", "some", "last_n=3"):  # the encoder has 2 blocks
        with pytest.raises(ConfigError, match="freeze"):
            CaptionerModel(model_config(timm_encoder())).encoder.freeze(bad)


def test_optimizer_groups_scale_the_encoder_and_skip_decay_on_its_tokens() -> None:
    net = CaptionerModel(model_config(timm_encoder()))
    groups = parameter_groups(net, lr=1.0, encoder_lr_scale=0.1, layer_decay=0.5)
    lr = {id(p): g["lr"] for g in groups for p in g["params"]}
    decays = {id(p): g.get("weight_decay") != 0.0 for g in groups for p in g["params"]}
    named = dict(net.named_parameters())
    # 2 blocks: embeddings at depth 0, blocks 1 and 2, final norm 3
    assert lr[id(named["encoder.model.norm.weight"])] == pytest.approx(0.1)
    assert lr[id(named["encoder.model.blocks.1.attn.qkv.weight"])] == pytest.approx(0.05)
    assert lr[id(named["encoder.model.blocks.0.attn.qkv.weight"])] == pytest.approx(0.025)
    assert lr[id(named["encoder.model.patch_embed.proj.weight"])] == pytest.approx(0.0125)
    assert lr[id(named["decoder.blocks.0.cross_attn.q_proj.weight"])] == 1.0
    for name in ("cls_token", "reg_token", "pos_embed"):
        assert not decays[id(named[f"encoder.model.{name}"])]
    assert decays[id(named["encoder.model.blocks.0.attn.qkv.weight"])]
    assert sum(len(g["params"]) for g in groups) == len(named)


def test_our_init_leaves_a_library_encoder_as_loaded(timm_weights) -> None:
    library, path = timm_weights
    net = CaptionerModel(model_config(timm_encoder(weights=str(path))))
    for name, value in library.state_dict().items():
        assert torch.equal(net.encoder.model.state_dict()[name], value), name


def test_conv_stem_vit() -> None:
    config = model_config({"kind": "vit", "patch_size": 8, "dim": 32, "depth": 2, "heads": 2,
                           "stem": "conv"})  # fmt: skip
    net = CaptionerModel(config)
    convs = [m for m in net.encoder.patch_embed.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [c.stride for c in convs] == [(2, 2)] * 3 + [(1, 1)]  # 8 px: three halvings
    assert config.label.endswith("(encoder: conv stem)")
    memory, _ = net.encode(torch.randn(2, 3, *SIZE))
    assert memory.shape == (2, 24, 32) and net.encoder.grid_size == (4, 6)
    with pytest.raises(ConfigError, match="power of 2"):
        model_config({"kind": "vit", "patch_size": 6, "dim": 32, "depth": 1, "heads": 2,
                      "stem": "conv"})  # fmt: skip


@pytest.mark.parametrize("kind", ["timm", "open_clip", "resnet"])
def test_an_export_rebuilds_every_library_encoder_offline(kind: str, tmp_path: Path) -> None:
    """The architecture from the library (no weights fetched: the checkpoint's config has
    its source switched off), then every weight from the file."""
    encoders = {
        "timm": timm_encoder(pretrained=True), "open_clip": clip_encoder(),
        "resnet": {"kind": "resnet", "stages": 2},
    }  # fmt: skip
    built = {**encoders[kind], "pretrained": False}  # here: random, nothing to download
    source = CaptionerModel(model_config(built)).eval()
    config = model_config(encoders[kind])  # a timm config that says "download", as trained
    tokenizer = Tokenizer([f"w{i}" for i in range(15)])  # 4 special tokens + 15 = 19
    preprocess = ImagePreprocess(SIZE, interpolation="bicubic").to_dict()
    contents = CheckpointContents(
        tmp_path / "run.ckpt", "lightning", config, tokenizer.to_dict(), preprocess,
        source.state_dict(),
    )  # fmt: skip
    export(contents, tmp_path / "export")
    loaded = load_checkpoint(tmp_path / "export")
    assert getattr(loaded.config.encoder, "pretrained", False) is False
    assert loaded.preprocess["interpolation"] == "bicubic"
    rebuilt = loaded.build_model()
    images, tokens = torch.randn(2, 3, *SIZE), torch.randint(3, 19, (2, 5))
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(images, tokens), source(images, tokens))


def test_a_checkpoints_kwargs_cannot_build_a_huge_model() -> None:
    with pytest.raises(ConfigError, match="integers up to 65536"):
        model_config(timm_encoder(kwargs={**TIMM, "depth": 10**7}))
