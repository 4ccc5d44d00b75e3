"""Quantization and the layers it acts on: the quantizers (:mod:`~qevo.quant.quantizers`),
qevo's quantized Conv/Dense layers and BatchNorm (:mod:`~qevo.quant.layers`), oneDNN's CPU
convolutions (:mod:`~qevo.quant.onednn`), quantizing a user's unchanged Flax network from
outside (:mod:`~qevo.quant.interception`), clip-range calibration
(:mod:`~qevo.quant.calibration`) and the integer forward pass (:mod:`~qevo.quant.intforward`)."""
