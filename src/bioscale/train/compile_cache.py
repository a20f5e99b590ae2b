"""Where ``torch.compile`` keeps what it compiled, and how much of a run's compile came from there.

Why. A recipe's first step waits for Dynamo, AOTAutograd and Inductor (tens of seconds to minutes for a 3B model).
torch caches the results on disk — Inductor's FX-graph cache, the AOTAutograd cache, Triton's kernel cache — so a
second run of the same recipe can skip most of it. torch's default place is ``/tmp/torchinductor_<user>``, which many
clusters wipe between jobs; bioscale points it at the user cache (``$BIOSCALE_CACHE/inductor``, default
``~/.cache/bioscale/inductor``) unless ``TORCHINDUCTOR_CACHE_DIR`` is set already or the recipe names a directory
(``compile.cache_dir``). Nothing there is read except by torch's own cache, which keys every entry by the graph, the
torch version and the device, so a changed model or upgrade compiles afresh rather than reusing a stale kernel.

:func:`compile_counters` reads torch's counters so ``summary.json`` and every metrics line can say how many graphs
were compiled and how many came from the cache: a steady-state slowdown that coincides with a new graph is a
recompile, and a second run whose ``fx_graph_cache_miss`` is 0 compiled nothing new.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

logger = logging.getLogger(__name__)

ENV_VAR = "TORCHINDUCTOR_CACHE_DIR"


def default_compile_cache_dir() -> Path:
    """``$BIOSCALE_CACHE/inductor``, or ``~/.cache/bioscale/inductor``."""
    root = os.environ.get("BIOSCALE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "bioscale")
    return Path(root) / "inductor"


def use_compile_cache(cache_dir: str | os.PathLike[str] | None = None) -> Path | None:
    """Point torch's compile caches at ``cache_dir`` (None: the environment's ``TORCHINDUCTOR_CACHE_DIR`` if set,
    else :func:`default_compile_cache_dir`). Call before the first compile. Returns the directory in use, or None
    when it cannot be created (then torch keeps its default, with a warning)."""
    if cache_dir is None and os.environ.get(ENV_VAR):
        return Path(os.environ[ENV_VAR])
    path = Path(cache_dir) if cache_dir is not None else default_compile_cache_dir()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        logger.warning("compile cache %s cannot be created (%s); torch's default cache directory is used", path, error)
        return None
    os.environ[ENV_VAR] = str(path)
    return path


def compile_counters() -> dict[str, int]:
    """This process's compile work so far: Dynamo graphs captured (a recompile adds one), and the Inductor FX-graph
    and AOTAutograd cache hits and misses (a miss is a graph compiled from scratch)."""
    from torch._dynamo.utils import counters

    return {
        "graphs_compiled": int(counters["stats"]["unique_graphs"]),
        "fx_graph_cache_hit": int(counters["inductor"]["fxgraph_cache_hit"]),
        "fx_graph_cache_miss": int(counters["inductor"]["fxgraph_cache_miss"]),
        "aot_autograd_cache_hit": int(counters["aot_autograd"]["autograd_cache_hit"]),
        "aot_autograd_cache_miss": int(counters["aot_autograd"]["autograd_cache_miss"]),
    }
