"""The speed benchmark and its Hugging Face baseline run end to end on tiny models; what they
count is checked, their timings are not."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from captioner.core.checkpoint import load_checkpoint
from captioner.core.models import CaptionerModel
from captioner.tools.baseline import hf_captioner, hf_loss
from captioner.tools.benchmark.decoding import cache_summary, decoding_benchmark
from captioner.tools.benchmark.fusion import fusion_scaling
from captioner.tools.benchmark.generation import generation_benchmark
from captioner.tools.benchmark.precision import precision_check
from captioner.tools.benchmark.timing import (
    BOS,
    EOS,
    PAD,
    counted_flops,
    matmul_peak,
    random_captions,
)
from captioner.tools.benchmark.training import training_benchmark
from tests.helpers import ROOT, tiny_config

CONFIG = tiny_config(vocab_size=50)


def test_hf_baseline_has_our_architecture_and_loss() -> None:
    hf = hf_captioner(CONFIG, BOS, EOS, PAD)
    encoder, decoder = hf.config.encoder, hf.config.decoder
    assert (encoder.hidden_size, encoder.num_hidden_layers, encoder.num_attention_heads) == (
        CONFIG.encoder.dim, CONFIG.encoder.depth, CONFIG.encoder.heads,
    )  # fmt: skip
    assert (decoder.hidden_size, decoder.num_hidden_layers, decoder.num_attention_heads) == (
        CONFIG.decoder.dim, CONFIG.decoder.depth, CONFIG.decoder.heads,
    )  # fmt: skip
    assert encoder.intermediate_size == 4 * CONFIG.encoder.dim
    assert decoder.intermediate_size == 4 * CONFIG.decoder.dim
    assert (
        decoder.vocab_size == CONFIG.vocab_size and encoder.patch_size == CONFIG.encoder.patch_size
    )
    ours = CaptionerModel(CONFIG).num_parameters()
    theirs = sum(p.numel() for p in hf.parameters())
    assert abs(theirs - ours) / ours < 0.05  # a CLS token, biases and BERT's head transform
    # its loss is the same teacher-forced loss: padded targets ignored
    images, tokens = torch.randn(3, 3, 16, 24), random_captions(CONFIG, 3, "coco")
    assert (tokens == PAD).any()
    logits = hf(pixel_values=images, decoder_input_ids=tokens[:, :-1]).logits
    expected = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten(), ignore_index=PAD)
    torch.testing.assert_close(hf_loss(hf, images, tokens, PAD), expected)


def test_random_captions_are_well_formed() -> None:
    full = random_captions(CONFIG, 5, "full")
    assert full.shape == (5, CONFIG.max_len) and not (full == PAD).any()
    assert (full[:, 0] == BOS).all() and (full[:, -1] == EOS).all()
    coco = random_captions(CONFIG, 64, "coco")
    lengths = (coco != PAD).sum(dim=1)
    assert coco.shape[1] == lengths.max() and lengths.min() >= 7 and lengths.float().std() > 0
    for row, length in zip(coco, lengths, strict=True):
        assert row[0] == BOS and row[length - 1] == EOS and (row[length:] == PAD).all()
        assert not ((row[1 : length - 1] == EOS) | (row[1 : length - 1] == PAD)).any()


def test_counted_flops_include_cpu_attention() -> None:
    batch, heads, length, dim = 2, 3, 5, 8
    q, k, v = (torch.randn(batch, heads, length, dim, requires_grad=True) for _ in range(3))
    with FlopCounterMode(display=False) as plain:
        F.scaled_dot_product_attention(q, k, v).sum().backward()
    flops = counted_flops(lambda: F.scaled_dot_product_attention(q, k, v).sum().backward())
    # forward: QK^T and PV; backward: QK^T again and four gradient products (torch's rule)
    assert flops == (2 + 5) * 2 * batch * heads * length * length * dim
    assert plain.get_total_flops() < flops  # torch's own table misses the CPU kernel


def test_training_benchmark_reports_both_models_and_counts_less_work_on_padding() -> None:
    rows = training_benchmark(CONFIG, batch_size=4, repeats=1)
    keys = {(r.model, r.dtype, r.captions) for r in rows}
    assert keys == {
        (m, d, c) for m in ("captioner", "hf") for d in ("fp32", "bf16") for c in ("full", "coco")
    }
    assert all(r.images_per_s > 0 and r.mfu > 0 and r.peak_gflops > 0 for r in rows)
    flops = {(r.model, r.captions): r.gflop_per_image for r in rows if r.dtype == "fp32"}
    # the same architecture on full captions: the same work, within HF's extras
    assert abs(flops["captioner", "full"] / flops["hf", "full"] - 1) < 0.1
    # on padded captions our loss never projects the padding
    assert flops["captioner", "coco"] < flops["hf", "coco"]
    assert flops["captioner", "coco"] < flops["captioner", "full"]


@pytest.mark.slow
def test_training_benchmark_times_the_compiled_step_as_the_same_work() -> None:
    frames = torch._dynamo.utils.counters["frames"]["ok"]
    rows = training_benchmark(
        CONFIG, batch_size=2, dtypes=("fp32",), captions=("coco",), repeats=1, hf=False,
        compiled=True,
    )  # fmt: skip
    assert torch._dynamo.utils.counters["frames"]["ok"] > frames
    eager, compiled = sorted(rows, key=lambda r: r.model)
    assert (eager.model, compiled.model) == ("captioner", "compiled")
    assert compiled.gflop_per_image == eager.gflop_per_image and compiled.images_per_s > 0


def test_generation_and_decoding_benchmarks_report_every_figure() -> None:
    rows = generation_benchmark(CONFIG, batch_sizes=(1, 2), caption_tokens=3, repeats=1)
    assert {(r.model, r.strategy, r.batch) for r in rows} == {
        (m, s, b) for m in ("captioner", "hf") for s in ("greedy", "beam-3") for b in (1, 2)
    }
    assert all(r.value > 0 and r.measure == "captions/s" for r in rows)
    rows = decoding_benchmark(
        CONFIG, batch_sizes=(1, 2), lengths=(2, 4), repeats=1, dtypes=("fp32", "bf16")
    )
    assert {(r.dtype, r.batch, r.tokens, r.cache) for r in rows} == {
        (d, b, n, c)
        for d in ("fp32", "bf16")
        for b in (1, 2)
        for n in (2, 4)
        for c in (True, False)
    }
    assert len(cache_summary(rows)) == 2 * 3  # of the fp32 rows
    assert matmul_peak(torch.float32, size=64, repeats=1) > 0


@pytest.mark.slow
def test_benchmark_script_writes_json() -> None:
    command = [
        sys.executable, str(ROOT / "scripts" / "benchmark.py"), "--image-size", "32",
        "--vocab-size", "40", "--train-batch", "2", "--batch-sizes", "1", "--repeats", "1",
        "--dtypes", "fp32", "--only", "training", "generation", "--json",
    ]  # fmt: skip
    out = subprocess.run(command, capture_output=True, text=True, check=True, cwd=ROOT)
    report = json.loads(out.stdout)
    assert report["setting"]["model"] == "tiny" and report["setting"]["image_size"] == 32
    assert {(r["model"], r["captions"]) for r in report["training"]} == {
        (m, c) for m in ("captioner", "hf") for c in ("full", "coco")
    }
    assert all(r["mfu"] > 0 for r in report["training"])
    assert len(report["generation"]) == 4 and report["decoding"] == []


def test_fusion_scaling_grows_the_image_and_counts_what_each_fusion_reads() -> None:
    rows = fusion_scaling(
        CONFIG, variants={"cross": {"kind": "cross"}, "prefix": {"kind": "prefix"}},
        patches=(4, 16), batch_size=2, tokens=3, repeats=1,
    )  # fmt: skip
    assert [(r.patches, r.variant) for r in rows] == [
        (4, "cross"), (4, "prefix"), (16, "cross"), (16, "prefix")
    ]  # fmt: skip
    cost = {(r.patches, r.variant): r for r in rows}
    for count in (4, 16):
        cross, prefix = cost[count, "cross"], cost[count, "prefix"]
        assert prefix.train_attention_gflop > cross.train_attention_gflop > 0
        assert prefix.caption_attention_mflop > cross.caption_attention_mflop > 0
        assert min(cross.train_ms_per_image, prefix.caption_ms) > 0
    # n image tokens cost the prefix (n + m)^2 and cross n * m: the gap widens with n
    gap = {n: cost[n, "prefix"].train_attention_gflop / cost[n, "cross"].train_attention_gflop
           for n in (4, 16)}  # fmt: skip
    assert gap[16] > gap[4]
    with pytest.raises(ValueError, match="square grid"):
        fusion_scaling(CONFIG, variants={"cross": {}}, patches=(5,), repeats=1)


@pytest.mark.slow
def test_variants_are_any_preset_with_overrides_and_report_every_cost() -> None:
    """The script's default variants (every key/value head count of the tiny preset's 3 heads,
    added or rotary positions) each get training speed, decoding per batch and length, and a
    cache that shrinks by heads / kv_heads."""
    command = [
        sys.executable, str(ROOT / "scripts" / "benchmark.py"), "--image-size", "32",
        "--vocab-size", "40", "--train-batch", "2", "--batch-sizes", "1", "2", "--repeats", "1",
        "--lengths", "2", "4", "--only", "variants", "--json", "model.decoder.depth=1",
    ]  # fmt: skip
    out = subprocess.run(command, capture_output=True, text=True, check=True, cwd=ROOT)
    rows = {r["variant"]: r for r in json.loads(out.stdout)["variants"]}
    assert list(rows) == ["MHA", "MQA", "MHA, RoPE", "MQA, RoPE"]
    for row in rows.values():
        assert row["train_images_per_s"] > 0 and row["dtype"] == "bf16"
        assert set(row["ms_per_token"]) == {
            f"batch {b}, {n} tokens" for b in (1, 2) for n in (2, 4)
        }
    for kind in ("MQA", "MQA, RoPE"):  # 3 heads share 1 key/value head
        assert rows[kind]["params"] < rows["MHA"]["params"]
        for length in ("2", "4"):
            assert 3 * rows[kind]["cache_bytes"][length] == rows["MHA"]["cache_bytes"][length]
    bad = subprocess.run(
        [*command[:-1], "model.decoder.kv_heads=2"], capture_output=True, text=True, cwd=ROOT
    )
    assert bad.returncode != 0 and "model.decoder.kv_heads" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_precision_check_compares_captions_and_speed(ckpt: Path) -> None:
    """float32 against itself agrees fully; bfloat16 is measured on the same test images."""
    contents = load_checkpoint(ckpt)
    same = precision_check(contents, torch.float32, limit=6, timed_images=2, repeats=1)
    assert [r.strategy for r in same] == ["greedy", "beam-3"]
    for row in same:
        assert (row.images, row.identical, row.logprob_gap) == (6, 1.0, 0.0)
        exact, fast = row.scene_acc
        assert exact == fast and 0.0 <= exact <= 1.0
    low = precision_check(contents, torch.bfloat16, limit=6, batch_sizes=(1, 2), repeats=1)
    for row in low:
        assert row.dtype == "bf16" and 0.0 <= row.identical <= 1.0 and row.logprob_gap >= 0
        assert set(row.captions_per_s) == {1, 2}
        assert all(v > 0 for pair in row.captions_per_s.values() for v in pair)
