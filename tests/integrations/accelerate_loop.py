"""Run by test_accelerate_launch.py under ``accelerate launch`` with two CPU processes: bioscale's loader in a plain
Accelerate loop through ``prepare_loader`` (each rank its own stream, state saved and resumed per rank), next to what
``accelerator.prepare(loader)`` does to it. Prints one JSON line per rank."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from accelerate import Accelerator

from bioscale.data import build_dataloader, get_tokenizer
from bioscale.integrations.accelerate import prepare_loader
from bioscale.models import build_config, build_model

CFG = {"source": "demo:protein", "tokenizer": "protein", "objective": "mlm", "max_seq_length": 64,
       "use_sequence_packing": True, "max_tokens_per_batch": 256, "shuffle_buffer_size": 64}  # fmt: skip


def fingerprints(batches) -> list[int]:
    return [int(b["input_ids"].sum()) * 1000003 + int(b["input_ids"].numel()) for b in batches]


def main(state_dir: Path) -> None:
    accelerator = Accelerator(cpu=True)
    rank, world = accelerator.process_index, accelerator.num_processes
    tokenizer = get_tokenizer("protein")
    torch.manual_seed(0)
    model = build_model(build_config("esm2", "debug"), device="cpu")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model, optimizer = accelerator.prepare(model, optimizer)
    loader = prepare_loader(accelerator, build_dataloader(CFG, tokenizer, rank=rank, world_size=world))
    stream = iter(loader)
    first = [next(stream) for _ in range(3)]
    for batch in first:  # a few real steps: the loader feeds the prepared (DDP) model
        loss = model(**batch).loss
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
    accelerator.save_state(str(state_dir))
    # save_state returns on each rank when that rank has written its part; without a barrier a fast rank can look
    # for another rank's files before they exist (seen once on a loaded 2-core machine).
    accelerator.wait_for_everyone()
    after = [next(stream) for _ in range(2)]
    accelerator.load_state(str(state_dir))  # rewinds every rank's loader to the saved position
    again = iter(loader)
    continued = [next(again) for _ in range(2)]
    # What accelerator.prepare does to the same loader, for the record.
    try:
        prepared = accelerator.prepare(build_dataloader(CFG, tokenizer, rank=rank, world_size=world))
        trap = fingerprints([b for _, b in zip(range(2), prepared)])
    except Exception as exc:  # noqa: BLE001  (reported, not raised: the point is that it does not work)
        trap = f"{type(exc).__name__}: {exc}"[:200]
    print("RESULT " + json.dumps({
        "rank": rank, "world": world, "first": fingerprints(first), "after": fingerprints(after),
        "continued": fingerprints(continued), "device": str(first[0]["input_ids"].device),
        "packed": "cu_seq_lens_q" in first[0], "prepared": trap,
    }), flush=True)  # fmt: skip


if __name__ == "__main__":
    main(Path(sys.argv[1]))
