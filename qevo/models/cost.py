"""Cost model: BitOps, model size and the QuantEA reference's "flops"/"params".

All figures come from static per-layer counts (a :class:`LayerTable`) and are vectorised
over any leading population axis of the bit arrays: ``w_bits``/``a_bits`` int ``[..., L]``
give results ``[...]``. Layers at 32 bits are float.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from qevo.quant.interception import QevoModel
from qevo.quant.layers import collect_per_layer
from qevo.quant.quantizers import FLOAT_BITS


@dataclasses.dataclass(frozen=True)
class LayerTable:
    """Static counts of a model's quantizable layers.

    Attributes:
      names: ``L`` layer names.
      macs: int64 ``[L]`` multiply-accumulates per image (a shortcut adds to its layer).
      weights: int64 ``[L]`` quantizable weights per layer (kernels only).
      other_params: trainable parameters that stay float (biases, BatchNorm scale and offset).
    """

    names: tuple[str, ...]
    macs: np.ndarray
    weights: np.ndarray
    other_params: int

    @property
    def num_layers(self) -> int:
        return len(self.names)


def layer_table(model: QevoModel, variables, input_shape: tuple[int, ...]) -> LayerTable:
    """Count MACs and weights of every quantizable layer for one image of ``input_shape`` (HWC)."""
    x = jnp.zeros((1, *input_shape), jnp.float32)
    _, state = model.apply(variables, x, None, train=False, mutable=["layer_stats"])
    stats = collect_per_layer(state["layer_stats"], model.num_layers, lambda vals: np.sum(np.stack(vals), axis=0))
    stats = np.asarray(stats, np.int64)
    total = sum(int(np.size(leaf)) for leaf in jax.tree_util.tree_leaves(variables["params"]))
    return LayerTable(
        names=tuple(model.layer_names),
        macs=stats[:, 0],
        weights=stats[:, 1],
        other_params=total - int(stats[:, 1].sum()),
    )


def _as_float(bits) -> jax.Array:
    return jnp.asarray(bits, jnp.float32)


def bitops(table: LayerTable, w_bits, a_bits) -> jax.Array:
    """BitOps per image: ``sum_l MACs_l * w_l * a_l`` (float32)."""
    return jnp.sum(jnp.asarray(table.macs, jnp.float32) * _as_float(w_bits) * _as_float(a_bits), axis=-1)


def size_bits(table: LayerTable, w_bits) -> jax.Array:
    """Model size in bits: ``sum_l weights_l * w_l + 32 * other_params``."""
    return jnp.sum(jnp.asarray(table.weights, jnp.float32) * _as_float(w_bits), axis=-1) + FLOAT_BITS * float(
        table.other_params
    )


def reference_flops(table: LayerTable, w_bits, a_bits) -> jax.Array:
    """QuantEA's "flops": ``MACs * (w + a) / 32`` per quantized layer, ``MACs`` per float layer."""
    w, a = _as_float(w_bits), _as_float(a_bits)
    factor = jnp.where((w >= FLOAT_BITS) & (a >= FLOAT_BITS), 1.0, (w + a) / FLOAT_BITS)
    return jnp.sum(jnp.asarray(table.macs, jnp.float32) * factor, axis=-1)


def reference_params(table: LayerTable, w_bits) -> jax.Array:
    """QuantEA's "params": ``sum_l weights_l * w_l / 32 + other_params``."""
    return size_bits(table, w_bits) / FLOAT_BITS
