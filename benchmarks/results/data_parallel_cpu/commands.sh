#!/bin/bash
# Data-parallel float training: 1 device against 2 forced host devices (2-core CPU), from the
# repository root with QEVO_DATA_DIR set. Each folder here holds config.json, history.csv
# (per epoch: loss, validation accuracy, cumulative training seconds) and results.json.
export JAX_PLATFORMS=cpu
for d in 1 2; do
  XLA_FLAGS=--xla_force_host_platform_device_count=$d python -m qevo.train --config configs/lenet5.py \
      --workdir runs/dp/lenet5_d$d
done
for d in 1 2; do
  XLA_FLAGS=--xla_force_host_platform_device_count=$d python -m qevo.train --config configs/resnet20_cpu.py \
      --workdir runs/dp/resnet20_d$d --config.train.epochs=4 --config.data.max_train_images=10000
done
