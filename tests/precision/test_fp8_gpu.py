"""FP8 on a GPU with FP8 tensor cores (sm_89+): real FP8 GEMMs, packed varlen batches, compile, FSDP2, quant stats.

Run on the H100 with ``python -m pytest -q tests/precision/test_fp8_gpu.py``. Every test skips without CUDA (the
``gpu`` marker) and on GPUs older than sm_89.
"""

from __future__ import annotations

import os
import socket

import numpy as np
import pytest
import torch
from torch import nn

pytest.importorskip("torchao.float8")

from bioscale.data import MLMCollator, pack_sequences, protein_tokenizer  # noqa: E402
from bioscale.models import build_config, build_model  # noqa: E402
from bioscale.precision import (  # noqa: E402
    QuantStats,
    apply_fp8,
    fp8_block_indices,
    fp8_layer_names,
    precompute_fp8_scales,
)

pytestmark = pytest.mark.gpu

BLOCK_LINEARS = ("attention.qkv_proj", "attention.out_proj", "mlp.up_proj", "mlp.down_proj")
TOKENS_PER_BATCH = 4096


@pytest.fixture(autouse=True)
def _needs_fp8_gpu() -> None:
    if torch.cuda.is_available() and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("needs an sm_89+ GPU (FP8 tensor cores)")
    yield
    torch._dynamo.reset()


def esm_model(num_layers: int = 4, hidden: int = 512, fp8_layers: list[int] | None = None, recipe: str | None = None,
              compile_blocks: bool = False, seed: int = 0) -> nn.Module:
    """A small ESM-2 (FP8-friendly widths), built on meta, optionally converted and compiled, then initialised."""
    config = build_config(
        "esm2", "debug", num_hidden_layers=num_layers, hidden_size=hidden, num_attention_heads=hidden // 64,
        intermediate_size=4 * hidden, attn_backend="varlen",
    )
    model = build_model(config, device="meta")
    if recipe is not None:
        apply_fp8(model, recipe=recipe, layers=fp8_layers)
    if compile_blocks:
        for block in model.layers:
            block.compile(fullgraph=True)
    model.to_empty(device="cuda")
    torch.manual_seed(seed)
    with torch.no_grad():
        model.init_weights()
    return model.train()


def motif_batches(num_batches: int, seed: int = 0) -> list[dict]:
    """Packed, masked micro-batches of protein-like sequences built from a few recurring motifs (learnable)."""
    tokenizer = protein_tokenizer()
    rng = np.random.default_rng(seed)
    residues = np.array(list("ACDEFGHIKLMNPQRSTVWY"))
    motifs = ["".join(rng.choice(residues, size=8)) for _ in range(32)]
    collator = MLMCollator(tokenizer)

    def sequences():
        while True:
            count = int(rng.integers(8, 64))
            yield tokenizer("".join(rng.choice(motifs, size=count)))["input_ids"]

    packs = pack_sequences(sequences(), TOKENS_PER_BATCH, pad_to_multiple_of=16)
    batches = []
    for _, batch in zip(range(num_batches), packs):
        batch = collator.apply(batch, np.random.default_rng([seed, len(batches)]))
        batches.append({k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in batch.items()})
    return batches


def train_losses(model: nn.Module, batches: list[dict], *, quant_stats: QuantStats | None = None,
                 after_step=None) -> list[float]:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    losses = []
    for step, batch in enumerate(batches, start=1):
        if quant_stats is not None:
            quant_stats.begin_step(step)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if after_step is not None:
            after_step()
        if quant_stats is not None:
            quant_stats.end_step(step)
        losses.append(loss.detach())
    return torch.stack(losses).float().tolist()


def test_per_layer_fp8_puts_exactly_the_named_blocks_in_fp8() -> None:
    model = esm_model(num_layers=4, fp8_layers=[2, 4], recipe="tensorwise")
    assert fp8_block_indices(model) == [2, 4]
    assert fp8_layer_names(model) == [f"esm.layers.{i}.{name}" for i in (1, 3) for name in BLOCK_LINEARS]
    assert type(model.lm_head.dense) is nn.Linear and type(model.esm.embeddings.word_embeddings) is nn.Embedding
    # The FP8 blocks really run FP8 GEMMs: torch._scaled_mm appears in the profile, for them only.
    from torch.profiler import ProfilerActivity, profile

    batch = motif_batches(1)[0]
    with profile(activities=[ProfilerActivity.CPU]) as prof, torch.autocast("cuda", dtype=torch.bfloat16):
        loss = model(**batch).loss
    loss.backward()
    scaled_mm_calls = sum(e.count for e in prof.key_averages() if e.key == "aten::_scaled_mm")
    assert scaled_mm_calls == 2 * len(BLOCK_LINEARS)  # forward GEMMs of blocks 2 and 4
    assert torch.isfinite(loss)


@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
def test_fp8_training_loss_tracks_bf16(recipe: str) -> None:
    batches = motif_batches(40)
    reference = train_losses(esm_model(hidden=768), batches)
    fp8 = train_losses(esm_model(hidden=768, recipe=recipe), batches)
    assert reference[-1] < reference[0] - 0.5  # the runs learn, so the comparison means something
    tail_ref, tail_fp8 = np.mean(reference[-10:]), np.mean(fp8[-10:])
    assert abs(tail_fp8 - tail_ref) / tail_ref < 0.03, (reference[-10:], fp8[-10:])


def test_compiled_fp8_equals_eager_fp8_and_compiles_once() -> None:
    batches = motif_batches(4)
    eager = esm_model(recipe="tensorwise")
    compiled = esm_model(recipe="tensorwise", compile_blocks=True)
    from torch._dynamo.utils import counters

    counters.clear()
    for batch in batches:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            want = eager(**batch).loss
            got = compiled(**batch).loss
        torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)
        got.backward()
        want.backward()
    grad_want = eager.layers[1].mlp.down_proj.weight.grad
    grad_got = compiled.layers[1].mlp.down_proj.weight.grad
    cosine = torch.nn.functional.cosine_similarity(grad_got.flatten(), grad_want.flatten(), dim=0)
    assert cosine > 0.99
    # T is fixed (the packing budget) and max_length_q changes per batch; at most one recompile (automatic
    # dynamic shapes), never one per batch.
    assert counters["stats"]["unique_graphs"] <= 2 * 2, dict(counters["stats"])


def test_quant_stats_under_compile_record_every_fp8_tensor(tmp_path) -> None:
    model = esm_model(num_layers=2, recipe="tensorwise", compile_blocks=True)
    quant_stats = QuantStats(model, freq=2, output_dir=tmp_path)
    train_losses(model, motif_batches(4), quant_stats=quant_stats)
    lines = (tmp_path / QuantStats.FILENAME).read_text().splitlines()
    import json

    records = [json.loads(line) for line in lines]
    assert {r["step"] for r in records} == {2, 4}
    assert len(records) == 2 * 2 * len(BLOCK_LINEARS) * 3  # steps x blocks x linears x (input, weight, grad_output)
    for record in records:
        assert record["amax"] > 0 and 0.0 <= record["underflow_frac"] <= 1.0 and record["saturate_frac"] == 0.0
        assert record["dtype"] == ("float8_e5m2" if record["role"] == "grad_output" else "float8_e4m3fn")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_fp8_all_gather_under_fsdp2_single_rank(tmp_path) -> None:
    import torch.distributed as dist

    from bioscale.distributed.parallelize import apply_fsdp

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), RANK="0", WORLD_SIZE="1")
    dist.init_process_group("nccl", rank=0, world_size=1)
    try:
        config = build_config("esm2", "debug", num_hidden_layers=2, hidden_size=512, num_attention_heads=8,
                              intermediate_size=2048, attn_backend="varlen")
        model = build_model(config, device="meta")
        apply_fp8(model, recipe="tensorwise", fsdp_float8_all_gather=True)
        for block in model.layers:
            block.compile()
        apply_fsdp(model, param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        model.to_empty(device="cuda")
        with torch.no_grad():
            model.init_weights()
        weight = model.layers[0].mlp.up_proj.weight
        assert type(weight).__name__ == "DTensor" and type(weight._local_tensor).__name__ == (
            "WeightWithDynamicFloat8CastTensor"
        )
        quant_stats = QuantStats(model, freq=3, output_dir=tmp_path)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        losses = []
        for step, batch in enumerate(motif_batches(6), start=1):
            quant_stats.begin_step(step)
            loss = model(**batch).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            precompute_fp8_scales(model)
            quant_stats.end_step(step)
            losses.append(loss.item())
        assert all(np.isfinite(losses)) and losses[-1] < losses[0]
        assert (tmp_path / QuantStats.FILENAME).exists()
    finally:
        dist.destroy_process_group()
