"""The shared init (``BioscalePreTrainedModel._init_module``) under FSDP2, for the families that use it (ESM-2,
Llama 3, AMPLIFY): two gloo ranks build each on ``meta``, shard, ``to_empty`` and ``init_weights``, and the gathered
weights equal the unsharded init with the same seed, with the ``<pad>`` row and the vocabulary-padding rows zero.

In-place writes to a slice of a DTensor do not reach its shards and DTensor's random ops do not reproduce the
unsharded draw, so before ``init_in_place`` these rows came out random under FSDP2 and the weights differed from a
one-GPU run with the same seed. CodonFM and Geneformer have their own inits, checked in their own files. One
``torchrun`` for all three families: its start-up is most of the cost.
"""

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
# family -> (config overrides, word-embedding key, pad id)
CASES = {
    "esm2": (dict(padded_vocab_size=40), "esm.embeddings.word_embeddings.weight"),
    "llama3": (dict(padded_vocab_size=40), "model.embed_tokens.weight"),
    "amplify": (dict(padded_vocab_size=40), "amplify.embed_tokens.weight"),
}
for family, (overrides, embedding_key) in CASES.items():
    config = build_config(family, "debug", **overrides)
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
        embedding = state[embedding_key]
        pad = config.pad_token_id
        problems = list(bad)
        if pad is not None and torch.count_nonzero(embedding[pad]):
            problems.append("<pad> row not zero")
        if torch.count_nonzero(embedding[config.vocab_size:]):
            problems.append("vocabulary-padding rows not zero")
        print(family, "MISMATCH", problems) if problems else print(family, "OK")
dist.destroy_process_group()
"""


@pytest.mark.slow  # two processes: ~20 s on 2 CPU cores
def test_fsdp2_sharded_init_equals_the_unsharded_init_for_the_shared_init(tmp_path: Path) -> None:
    script = tmp_path / "fsdp_init.py"
    script.write_text(SCRIPT)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT / "src"), env.get("PYTHONPATH")]))
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script)],
        capture_output=True, text=True, timeout=300, env=env, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    for family in ("esm2", "llama3", "amplify"):
        assert f"{family} OK" in proc.stdout, proc.stdout + proc.stderr[-2000:]
