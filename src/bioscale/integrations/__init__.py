"""bioscale models and data inside other frameworks' training loops: PEFT (:mod:`bioscale.integrations.peft`),
Accelerate (:mod:`bioscale.integrations.accelerate`; ``transformers``' ``Trainer`` needs nothing beyond the models'
own contract, :mod:`bioscale.models.hf_contract`) and PyTorch Lightning (:mod:`bioscale.integrations.lightning`).

Each framework is an optional extra (``bioscale[lora]``, ``bioscale[accelerate]``, ``bioscale[lightning]``) imported
only by the submodule that needs it; this package imports none of them. ``docs/frameworks.md`` shows the three paths.
"""
