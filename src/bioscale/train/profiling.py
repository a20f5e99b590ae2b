"""Profile a window of training steps, for Nsight Systems or as a ``torch.profiler`` trace.

``mode="nsys"``: the window ``start_step..end_step`` (inclusive) is bracketed by ``cudaProfilerStart/Stop``, so
``nsys profile --capture-range=cudaProfilerApi --capture-range-end=stop`` records only those steps, and every step
and phase (``data``, ``forward``, ``backward``, ``optimizer``) is an NVTX range, so the timeline reads like the loop.
``mode="torch"``: the same window is recorded by ``torch.profiler`` (CPU and CUDA activity, phases as
``record_function`` labels) and written as a Chrome/Perfetto trace ``<run_dir>/profile/trace_rank<R>.json``; without
CUDA, ``nsys`` mode falls back to it with a warning (``benchmarks/trace_summary.py`` reads it: kernel families, GPU
idle time, the longest gaps and the host syncs). ``mode="syncs"``: every operation in the window that makes the host
wait for the GPU (``torch.cuda.set_sync_debug_mode("warn")``: ``.item()``, ``nonzero``, boolean indexing, blocking
copies) is recorded with its Python call stack; ``<run_dir>/profile/syncs_rank<R>.txt`` lists each distinct stack
with its count, most frequent first, and the log names the top call sites. A sync drains the GPU's queue, so in a
loop meant to run ahead of the GPU each one is a gap; this is how to find them. Without CUDA nothing syncs.

Outside the window every call here is a cheap no-op, so the loop calls the profiler unconditionally.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import traceback
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

PROFILER_MODES = ("nsys", "torch", "syncs")
# The frames of a sync's stack kept in the report (innermost last), enough to reach the model / trainer code.
SYNC_STACK_FRAMES = 14


class SyncRecorder:
    """Count the synchronizing CUDA operations between :meth:`start` and :meth:`stop` by Python call stack."""

    def __init__(self) -> None:
        self.stacks: collections.Counter[str] = collections.Counter()
        self._catch: contextlib.AbstractContextManager | None = None

    def start(self, cuda: bool) -> None:
        if cuda:  # before recording: the call itself warns (measured: torch 2.11), it is not the run's
            torch.cuda.set_sync_debug_mode("warn")
        self._catch = warnings.catch_warnings()
        self._catch.__enter__()
        warnings.simplefilter("always")  # every occurrence, not once per call site
        shown = warnings.showwarning

        def record(message, category, filename, lineno, file=None, line=None):  # noqa: ANN001 - warnings' API
            if "synchronizing" in str(message):
                self.stacks["".join(traceback.format_stack(limit=SYNC_STACK_FRAMES + 2)[:-2])] += 1
            else:
                shown(message, category, filename, lineno, file, line)

        warnings.showwarning = record

    def stop(self, cuda: bool) -> None:
        assert self._catch is not None
        self._catch.__exit__(None, None, None)
        self._catch = None
        if cuda:
            torch.cuda.set_sync_debug_mode("default")

    def report(self) -> str:
        total = sum(self.stacks.values())
        parts = [f"{total} synchronizing CUDA operation(s), {len(self.stacks)} distinct call stack(s)\n"]
        for stack, count in self.stacks.most_common():
            parts.append(f"\n==== {count} x\n{stack}")
        return "".join(parts)

    def top_sites(self, n: int = 5) -> list[str]:
        """The innermost frame outside torch of the ``n`` most frequent stacks, with their counts."""
        sites = []
        for stack, count in self.stacks.most_common(n):
            frames = [f.strip().splitlines()[0] for f in stack.split("  File ")[1:]]
            ours = [f for f in frames if "/torch/" not in f] or frames
            sites.append(f"{count}x {ours[-1] if ours else '?'}")
        return sites


class StepProfiler:
    """Start/stop profiling around steps ``start_step..end_step`` and label phases inside them."""

    def __init__(
        self,
        *,
        enabled: bool,
        mode: str,
        start_step: int,
        end_step: int,
        run_dir: str | Path,
        rank: int,
        device: torch.device,
    ) -> None:
        if mode not in PROFILER_MODES:
            raise ValueError(f"profiler.mode must be one of {', '.join(PROFILER_MODES)}; got {mode!r}")
        self.enabled = enabled
        self.mode = mode
        self.start_step = start_step
        self.end_step = end_step
        self.trace_dir = Path(run_dir) / "profile"
        self.rank = rank
        self.cuda = device.type == "cuda"
        self._active = False
        self._torch_profiler: torch.profiler.profile | None = None
        self._syncs: SyncRecorder | None = None
        if enabled and mode == "nsys" and not self.cuda:
            # Nsight Systems has nothing to capture without CUDA; a torch.profiler trace of the same window still
            # answers "where does the step time go", so `profiler.enabled=true` on a CPU machine is never a no-op.
            logger.warning(
                "profiler.mode=nsys needs a CUDA device; writing a torch.profiler trace to %s instead",
                self.trace_dir,
            )
            self.mode = "torch"

    def _nvtx(self) -> bool:
        return self.enabled and self.mode == "nsys" and self.cuda

    def step_begin(self, step: int) -> None:
        """Call at the top of each step; starts capture at ``start_step``."""
        if not self.enabled or step != self.start_step:
            return
        self._active = True
        if self.mode == "nsys":
            torch.cuda.synchronize()
            torch.cuda.profiler.start()
        elif self.mode == "syncs":
            if not self.cuda:
                logger.warning("profiler.mode=syncs: no CUDA device, so nothing can make the host wait for it")
            self._syncs = SyncRecorder()
            self._syncs.start(self.cuda)
        else:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if self.cuda:
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self._torch_profiler = torch.profiler.profile(activities=activities, record_shapes=True)
            self._torch_profiler.__enter__()
        logger.info("profiling steps %d..%d (%s)", self.start_step, self.end_step, self.mode)

    def step_end(self, step: int) -> None:
        """Call at the bottom of each step; stops capture after ``end_step``."""
        if not self._active or step != self.end_step:
            return
        self._stop()

    def close(self) -> None:
        """Stop a capture the run ended inside of (fewer steps than ``end_step``)."""
        if self._active:
            self._stop()

    def _stop(self) -> None:
        self._active = False
        if self.mode == "nsys":
            torch.cuda.synchronize()
            torch.cuda.profiler.stop()
            return
        if self.mode == "syncs":
            assert self._syncs is not None
            self._syncs.stop(self.cuda)
            self.trace_dir.mkdir(parents=True, exist_ok=True)
            path = self.trace_dir / f"syncs_rank{self.rank}.txt"
            path.write_text(self._syncs.report())
            logger.info("steps %d..%d: %d host syncs, top call sites %s; stacks in %s", self.start_step,
                        self.end_step, sum(self._syncs.stacks.values()), self._syncs.top_sites(), path)  # fmt: skip
            self._syncs = None
            return
        assert self._torch_profiler is not None
        self._torch_profiler.__exit__(None, None, None)
        self.trace_dir.mkdir(parents=True, exist_ok=True)
        path = self.trace_dir / f"trace_rank{self.rank}.json"
        self._torch_profiler.export_chrome_trace(str(path))
        self._torch_profiler = None
        logger.info("torch.profiler trace written to %s", path)

    @contextlib.contextmanager
    def range(self, name: str) -> Iterator[None]:
        """Label a step or phase: an NVTX range (nsys) or a ``record_function`` block (torch) while capturing."""
        if self._nvtx():
            torch.cuda.nvtx.range_push(name)
            try:
                yield
            finally:
                torch.cuda.nvtx.range_pop()
        elif self._active and self.mode == "torch":
            with torch.profiler.record_function(name):
                yield
        else:
            yield
