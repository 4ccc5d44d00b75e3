#!/usr/bin/env bash
# The full ResNet-20 protocols on a lent GPU machine (the project's device `run` tool), in
# commands that stop within one call's limit and resume where they stopped.
#
#   bash benchmarks/lease.sh prepare          # here, once: into .lease/ (git-ignored, ~20 MB)
#                                             # the wheels the GPU image lacks and the CIFAR-10
#                                             # archive from $QEVO_DATA_DIR
#   bash benchmarks/lease.sh search [S [ARGS]] # there, with carry [".lease"]: configs/resnet20.py
#                                             # (float model, search, final training) in
#                                             # runs/resnet20_gpu
#   bash benchmarks/lease.sh coevolve [S [ARGS]] # there: configs/resnet20_cc.py (4 bits) from that
#                                             # float model, in runs/resnet20_gpu_cc_w4
#
# ARGS go to the command as they are (config overrides such as --config.generations=2).
# Each run stops after S seconds (default 540) and exits 124 if unfinished; the next call
# resumes it while the machine is still warm (ignored folders such as runs/ stay there
# between calls). After every call the run's small outputs (config, CSVs, JSON, plots, the
# log; no weights) are copied to $OUT/<run>/, so what a lease got to comes back even if it
# ends mid-run.
set -euo pipefail

what=${1:?usage: bash benchmarks/lease.sh prepare|search|coevolve [SECONDS [ARGS...]]}
seconds=${2:-540}
extra=("${@:3}")

if [[ $what == prepare ]]; then
    : "${QEVO_DATA_DIR:?set QEVO_DATA_DIR to the folder holding cifar10/CIFAR-10-images-jpg.tar.gz}"
    grep -qx '/.lease/' .git/info/exclude 2>/dev/null || echo '/.lease/' >> .git/info/exclude
    mkdir -p .lease/whl .lease/data/cifar10
    cp "$QEVO_DATA_DIR/cifar10/CIFAR-10-images-jpg.tar.gz" .lease/data/cifar10/
    # the GPU image has jax, flax, optax, Pillow, matplotlib, tqdm; not these (pure Python)
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux2014_x86_64 -d .lease/whl evosax==0.3.2 dotmap ml_collections
    du -sh .lease
    exit 0
fi

case $what in
    search) run=resnet20_gpu
            cmd=(python3 -m qevo.search --config configs/resnet20.py --workdir runs/$run) ;;
    coevolve) run=resnet20_gpu_cc_w4
              cmd=(python3 -m qevo.coevolve --config configs/resnet20_cc.py --workdir runs/$run
                   --config.float_from=runs/resnet20_gpu/float) ;;
    *) echo "unknown protocol '$what': use prepare, search or coevolve" >&2; exit 2 ;;
esac

python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .lease/whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
export QEVO_DATA_DIR=$PWD/.lease/data QEVO_CACHE_DIR=/tmp/qevo_cache
OUT=${OUT:-runs/out}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 -c 'import jax; print("jax", jax.__version__, jax.devices())'

mkdir -p "runs/$run" "$OUT/$run"
status=0
start=$SECONDS
timeout "$seconds" "${cmd[@]}" "${extra[@]}" >> "runs/$run.log" 2>&1 || status=$?
echo "$what: exit $status after $((SECONDS - start)) s" | tee -a "runs/$run.log"
(cd runs && find "$run" -type f \( -name '*.json' -o -name '*.jsonl' -o -name '*.csv' -o -name '*.png' \) \
    -exec cp --parents {} "$OUT/" \;)
cp "runs/$run.log" "$OUT/$run/"
tail -c 3000 "runs/$run.log" | tr '\r' '\n' | tail -n 30
[[ $status -eq 124 ]] && echo "stopped after $seconds s: call again to resume"
exit "$status"
