"""Models and their costs: the networks qevo ships (:mod:`~qevo.models.networks`, by name in
:mod:`~qevo.models.zoo`), per-layer costs (:mod:`~qevo.models.cost`: MACs, BitOps, size),
losses and metrics (:mod:`~qevo.models.losses`), and what a run computes on, resolved from
its config or given from Python (:mod:`~qevo.models.inputs`)."""
