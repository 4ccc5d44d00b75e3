"""Bit-width search (QuantEA), ``python -m qevo.search``: its config
(:mod:`~qevo.search.config`), the searched space and the population's objectives
(:mod:`~qevo.search.problem`), the generations (:mod:`~qevo.search.generations`), the final
training of the front (:mod:`~qevo.search.final`), its figure (:mod:`~qevo.search.report`)
and the protocol end to end (:mod:`~qevo.search.method`)."""
