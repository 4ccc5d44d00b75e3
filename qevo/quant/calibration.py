"""Calibration of activation clip ranges from a batch of float activations."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from qevo.quant.interception import QevoModel
from qevo.quant.layers import collect_per_layer


def calibrate(model: QevoModel, variables: dict, images: jax.Array) -> dict:
    """Set ``quant/a_clip`` to each layer's 99.99th-percentile ``|input|`` on ``images``.

    Args:
      model: a qevo model.
      variables (dict): its variables (``params``, ``batch_stats``, ``quant``).
      images: normalised float ``[N, H, W, C]``; a few hundred images suffice.

    Returns:
      variables (dict): ``variables`` with a new ``quant/a_clip`` float32 ``[L]`` (floored at 1e-3).
    """
    _, state = model.apply(variables, images, None, train=False, mutable=["calibration"])
    clips = collect_per_layer(state["calibration"], model.num_layers, lambda vals: jnp.max(jnp.stack(vals)))
    a_clip = jnp.maximum(jnp.stack(clips).astype(jnp.float32), 1e-3)
    return {**variables, "quant": {"a_clip": a_clip}}
