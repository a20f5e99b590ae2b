"""Geneformer's init under FSDP2: two gloo ranks build on ``meta``, shard, ``to_empty`` and ``init_weights``; the
gathered weights equal the unsharded init with the same seed, the ``<pad>`` row and the vocabulary-padding rows of the
word embedding are zero, and one packed training step runs. In-place ops on a row of a DTensor do not reach its
shards (the ``<pad>`` row and the padding rows came out random before ``geneformer.modeling._fill``), which is what
this guards."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]

SCRIPT = r"""
import torch, torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from bioscale.distributed.parallelize import apply_fsdp
from bioscale.models import build_config, build_model

dist.init_process_group("gloo")
config = build_config("geneformer", "debug", vocab_size=50, padded_vocab_size=64)
model = build_model(config, device="meta")
apply_fsdp(model)
model.to_empty(device="cpu")
torch.manual_seed(7)
model.init_weights()
state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
# One packed step through the sharded model (the tied decoder reads the sharded word embedding).
ids = torch.randint(2, 50, (1, 24))
cu = torch.tensor([0, 10, 24], dtype=torch.int32)
out = model(input_ids=ids, cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=14, max_length_k=14,
            labels=torch.where(torch.arange(24)[None] % 4 == 0, ids, -100))
out.loss.backward()
assert torch.isfinite(out.loss)
if dist.get_rank() == 0:
    torch.manual_seed(7)
    plain = build_model(config, device="meta")
    plain.to_empty(device="cpu")
    plain.init_weights()
    bad = [k for k, v in plain.state_dict().items() if not torch.equal(state[k], v)]
    embedding = state["bert.embeddings.word_embeddings.weight"]
    assert torch.count_nonzero(embedding[0]) == 0, "the <pad> embedding row is not zero"
    assert torch.count_nonzero(embedding[50:]) == 0, "the vocabulary-padding rows are not zero"
    print("MISMATCH", bad) if bad else print("OK")
dist.destroy_process_group()
"""


@pytest.mark.slow  # two processes: ~20 s on 2 CPU cores
def test_fsdp2_sharded_init_equals_the_unsharded_init(tmp_path: Path) -> None:
    script = tmp_path / "fsdp_init.py"
    script.write_text(SCRIPT)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT / "src"), env.get("PYTHONPATH")]))
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script)],
        capture_output=True, text=True, timeout=300, env=env, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "OK" in proc.stdout, proc.stdout + proc.stderr[-2000:]
