"""EnCodon's block-structured MAGNETO init (query / key rows of the fused projection, padding rows) under FSDP2: two
gloo ranks build on ``meta``, shard, ``to_empty`` and ``init_weights``, and the gathered weights equal the unsharded
init with the same seed. In-place ops on a slice of a DTensor do not reach its shards, which is what this guards."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]

SCRIPT = r"""
import sys, torch, torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from bioscale.distributed.parallelize import apply_fsdp
from bioscale.models import build_config, build_model

dist.init_process_group("gloo")
config = build_config("codonfm", "debug", padded_vocab_size=72)
model = build_model(config, device="meta")
apply_fsdp(model)
model.to_empty(device="cpu")
torch.manual_seed(7)
model.init_weights()
state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
if dist.get_rank() == 0:
    torch.manual_seed(7)
    plain = build_model(config, device="meta")
    plain.to_empty(device="cpu")
    plain.init_weights()
    bad = [k for k, v in plain.state_dict().items() if not torch.equal(state[k], v)]
    h = config.hidden_size
    qkv = state["encodon.layers.0.attention.qkv_proj.weight"]
    assert qkv[:h].std() > 5 * qkv[2 * h:].std(), "query rows were not initialised with gain 1"
    assert torch.count_nonzero(state["lm_head.decoder.weight"][69:]) == 0, "decoder padding rows are not zero"
    assert torch.count_nonzero(state["encodon.embed_tokens.weight"][3]) == 0, "the <PAD> embedding is not zero"
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
