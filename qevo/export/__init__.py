"""ONNX export, ``python -m qevo.export``: a finished run's model loaded through its method
(:mod:`qevo.methods`) and written as ONNX, checked in onnxruntime (:mod:`~qevo.export.exporter`),
from the graph builder of :mod:`~qevo.export.onnxgraph`."""
