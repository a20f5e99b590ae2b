"""Training: typed Hydra configs, the one-file training loop, checkpoints, metrics, profiling and export.

``bioscale train --config-name L0_sanity`` (see :mod:`bioscale.train.cli`) composes a recipe from
``bioscale/configs`` into a :class:`~bioscale.train.config.TrainConfig` (:func:`~bioscale.train.config.load_config`)
and runs :func:`bioscale.train.train.train` on it. Submodules are imported where used, so ``import bioscale.train``
stays light (the loop's function is not re-exported here: its name is also its module's).
"""
