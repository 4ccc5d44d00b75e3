"""Evolution: one ``init/ask/tell`` protocol over ``flax.struct`` states
(:mod:`~qevo.evolution.strategies`: NSGA-III of :mod:`~qevo.evolution.nsga3` with the integer
variation of :mod:`~qevo.evolution.variation`, random search, the evosax drivers of
:mod:`~qevo.evolution.drivers`), the one resumable generation loop
(:mod:`~qevo.evolution.loop`), and the population evaluation that scores a whole population
in one compiled program (:mod:`~qevo.evolution.population`)."""
