"""Training metrics: throughput and MFU arithmetic, and one logger that writes them everywhere they are read.

Model FLOPs utilisation (MFU) follows the PaLM paper's definition (Chowdhery et al. 2022, appendix B)::

    MFU = flops_per_token(S_eff) x real_tokens_per_sec_per_gpu / peak_bf16_flops_per_gpu

``flops_per_token`` comes from the model spec (training = forward + backward: 6 x the non-embedding parameters that
act per token, plus attention's 12 x layers x hidden x S_eff score/value matmuls). ``real_tokens`` exclude padding, so
padding never inflates MFU, and ``S_eff = sum(L_i^2) / sum(L_i)`` over the sequences of the logged window is the
token-weighted mean sequence length: attention costs ``L_i^2`` per sequence, so with a formula linear in ``S`` this
counts exactly the attention FLOPs of the real sequences (padded or packed alike). Peaks are dense bf16 tensor-core
numbers from NVIDIA's datasheets; on CPU or an unknown GPU MFU is reported as null.

:class:`MetricsLogger` (rank 0 only) appends one JSON object per logged step to ``metrics.jsonl``, mirrors the numbers
to TensorBoard (and Weights & Biases if asked), drives a tqdm progress bar on stderr, and draws ``loss.png`` (loss and
throughput against step) at the end.
"""

from __future__ import annotations

import json
import logging
import math
import resource
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

# Dense (no sparsity) bf16 tensor-core peak FLOP/s per GPU, matched against torch.cuda.get_device_name() in order
# (more specific names first).
GPU_PEAK_BF16_FLOPS: tuple[tuple[str, float], ...] = (
    ("GB200", 2.5e15),
    ("B200", 2.25e15),
    ("H200", 989e12),
    ("GH200", 989e12),
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),  # SXM
    ("H800", 989e12),
    ("H20", 148e12),
    ("L40S", 362e12),
    ("L4", 121e12),
    ("A100", 312e12),
    ("A10G", 70e12),
    ("A6000", 155e12),
)


def gpu_peak_flops(device: torch.device) -> float | None:
    """Peak dense bf16 FLOP/s of ``device``, or None on CPU or for a GPU not in :data:`GPU_PEAK_BF16_FLOPS`."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, peak in GPU_PEAK_BF16_FLOPS:
        if key in name:
            return peak
    logger.warning("no bf16 peak FLOP/s known for GPU %r; MFU will be reported as null", name)
    return None


def effective_seq_len(seq_lens_sq_sum: float, num_real_tokens: float) -> float:
    """Token-weighted mean sequence length ``sum(L^2) / sum(L)`` (see the module docstring)."""
    return seq_lens_sq_sum / max(num_real_tokens, 1.0)


def compute_mfu(flops_per_token: float, real_tokens_per_sec_per_gpu: float, peak_flops: float | None) -> float | None:
    """Model FLOPs utilisation in [0, 1], or None without a known peak."""
    if peak_flops is None:
        return None
    return flops_per_token * real_tokens_per_sec_per_gpu / peak_flops


def peak_memory_gb(device: torch.device) -> float:
    """Peak memory so far in GB (1e9 bytes): CUDA allocator peak on GPU, the process's peak RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    # ru_maxrss is in KiB on Linux, bytes on macOS.
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 1e9


def perplexity(loss: float) -> float:
    """``exp(loss)``, inf when it overflows or the loss is not finite."""
    try:
        return math.exp(loss)
    except OverflowError:
        return math.inf


def _json_number(value: Any) -> Any:
    # JSON has no NaN/Infinity; write null so every line stays parseable by strict readers.
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl`` file, in order."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


class MetricsLogger:
    """Writes each logged step to ``metrics.jsonl``, TensorBoard, optionally wandb, and a progress bar.

    Only rank 0 constructs one with ``enabled=True``; other ranks get a logger that does nothing, so the loop calls it
    unconditionally.

    Args:
        run_dir: the run directory.
        total_steps: the run's last step (for the progress bar).
        start_step: the step the run resumes after (0 for a fresh run). Records of later steps left in
            ``metrics.jsonl`` by an interrupted run are dropped, so the file reads as one uninterrupted run.
        config: the resolved config, sent to wandb.
    """

    def __init__(
        self,
        run_dir: str | Path,
        *,
        enabled: bool,
        total_steps: int,
        start_step: int = 0,
        tensorboard: bool = True,
        wandb: bool = False,
        wandb_project: str = "bioscale",
        progress_bar: bool = True,
        config: Mapping[str, Any] | None = None,
    ) -> None:
        self.enabled = enabled
        self._closed = False
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / "metrics.jsonl"
        self._tb = None
        self._wandb = None
        self._bar = None
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        kept = (
            [r for r in read_metrics(self.path) if r["step"] <= start_step] if start_step and self.path.exists() else []
        )
        with open(self.path, "w") as f:
            f.writelines(json.dumps(record) + "\n" for record in kept)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step hides events of steps after the resume point that an interrupted run had written.
            self._tb = SummaryWriter(
                str(self.run_dir / "tensorboard"), purge_step=start_step + 1 if start_step else None
            )
        if wandb:
            try:
                import wandb as wandb_module
            except ImportError as err:
                raise ValueError("logging.wandb=true needs the wandb package: pip install 'bioscale[wandb]'") from err
            self._wandb = wandb_module.init(
                project=wandb_project, dir=str(self.run_dir), config=dict(config or {}), resume="allow"
            )
        if progress_bar:
            from tqdm.auto import tqdm

            self._bar = tqdm(
                total=total_steps,
                initial=start_step,
                desc="train",
                unit="step",
                file=sys.stderr,
                dynamic_ncols=True,
                mininterval=0.5,
            )

    def advance(self, step: int) -> None:
        """Move the progress bar to ``step`` (called every step, logged or not)."""
        if self._bar is not None:
            self._bar.update(step - self._bar.n)

    def log(self, record: Mapping[str, Any]) -> None:
        """Write one record (must hold ``step``) everywhere."""
        if not self.enabled:
            return
        assert "step" in record, record
        step = int(record["step"])
        with open(self.path, "a") as f:
            f.write(json.dumps({k: _json_number(v) for k, v in record.items()}) + "\n")
        numeric = {k: float(v) for k, v in record.items() if k != "step" and isinstance(v, (int, float))}
        if self._tb is not None:
            for key, value in numeric.items():
                self._tb.add_scalar(f"train/{key}", value, step)
        if self._wandb is not None:
            self._wandb.log({f"train/{k}": v for k, v in numeric.items()}, step=step)
        if self._bar is not None:
            postfix = {"loss": f"{record.get('loss', float('nan')):.4f}"}
            if record.get("lr") is not None:
                postfix["lr"] = f"{record['lr']:.2e}"
            if record.get("tokens_per_sec_per_gpu") is not None:
                postfix["tok/s/gpu"] = f"{record['tokens_per_sec_per_gpu']:.3g}"
            if record.get("mfu") is not None:
                postfix["mfu"] = f"{100 * record['mfu']:.1f}%"
            self._bar.set_postfix(postfix, refresh=False)

    def close(self, *, plot: bool = True) -> Path | None:
        """Close the writers; draw ``loss.png`` from ``metrics.jsonl``. Returns the plot's path (or None)."""
        if not self.enabled or self._closed:
            return None
        self._closed = True
        if self._bar is not None:
            self._bar.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()
        if not plot or not self.path.exists():
            return None
        return plot_metrics(read_metrics(self.path), self.run_dir / "loss.png")


def plot_metrics(records: list[dict[str, Any]], out_path: str | Path) -> Path | None:
    """Loss (left) and throughput per GPU (right) against step, as a PNG. None if there is nothing to plot."""
    if not records:
        return None
    import matplotlib

    matplotlib.use("Agg")  # no display on training nodes
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in records]
    fig, (ax_loss, ax_tput) = plt.subplots(1, 2, figsize=(11, 4))
    ax_loss.plot(steps, [r.get("loss") if r.get("loss") is not None else math.nan for r in records])
    ax_loss.set(xlabel="step", ylabel="loss", title="training loss")
    ax_loss.grid(alpha=0.3)
    for key, label in (("tokens_per_sec_per_gpu", "all tokens"), ("real_tokens_per_sec_per_gpu", "real tokens")):
        values = [r.get(key) if r.get(key) is not None else math.nan for r in records]
        ax_tput.plot(steps, values, label=label)
    ax_tput.set(xlabel="step", ylabel="tokens / s / GPU", title="throughput")
    ax_tput.grid(alpha=0.3)
    ax_tput.legend()
    fig.tight_layout()
    out_path = Path(out_path)
    fig.savefig(out_path, dpi=100)
    plt.close(fig)
    return out_path
