"""Gradient-free training of integer weights by cooperative coevolution, ``python -m
qevo.coevolve``: its config (:mod:`~qevo.coevolve.config`), the algorithm
(:mod:`~qevo.coevolve.algorithm`) and the protocol end to end (:mod:`~qevo.coevolve.method`)."""
