"""Data → train → evaluate as three stages that write typed, traceable artifact directories.

Each stage is a Python function and a ``bioscale`` command: :func:`curate` (``bioscale data``), :func:`train_stage`
(``bioscale train --input``), :func:`evaluate` (``bioscale eval``) and :func:`run_pipeline` (``bioscale pipeline``).
Stages hand each other artifact directories whose ``metadata.json`` is validated by :class:`ArtifactMetadata`
(artifacts.py); on the command line the hand-over is one JSON line on stdout, so the stages pipe.
"""

from bioscale.pipeline.artifacts import (
    Artifact,
    ArtifactMetadata,
    LineageEntry,
    load_artifact,
    read_artifact,
    trace_lineage,
    write_artifact,
)
from bioscale.pipeline.curate import curate
from bioscale.pipeline.stages import evaluate, run_pipeline, train_stage

__all__ = [
    "Artifact",
    "ArtifactMetadata",
    "LineageEntry",
    "curate",
    "evaluate",
    "load_artifact",
    "read_artifact",
    "run_pipeline",
    "trace_lineage",
    "train_stage",
    "write_artifact",
]
