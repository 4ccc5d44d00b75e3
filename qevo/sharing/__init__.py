"""Weight sharing by evolved per-layer clustering, ``python -m qevo.sharing``: its config
(:mod:`~qevo.sharing.config`), k-means (:mod:`~qevo.sharing.kmeans`), the cluster tables and
shared-weight scoring (:mod:`~qevo.sharing.clusters`), codebook formats
(:mod:`~qevo.sharing.codebook`), the generations (:mod:`~qevo.sharing.generations`), the
per-format report (:mod:`~qevo.sharing.report`) and the protocol end to end
(:mod:`~qevo.sharing.method`)."""
