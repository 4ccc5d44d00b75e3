# The LeNet-5/MNIST runs exported in export.json (normal configs; one float model shared by
# all three methods; /usr/bin/time wall seconds, 2-core CPU shared with a test suite, nice 10):
python -m qevo.train --config configs/lenet5.py --workdir /work/runs_export/float            # 152 s
python -m qevo.search --config configs/lenet5.py --workdir /work/runs_export/search \
    --config.float_from=/work/runs_export/float                                                 # 587 s
python -m qevo.compress --config configs/lenet5_sharing.py --workdir /work/runs_export/sharing \
    --config.float_from=/work/runs_export/float                                                 # 350 s
python -m qevo.coevolve --config configs/lenet5_cc.py --workdir /work/runs_export/coevolve \
    --config.float_from=/work/runs_export/float --config.coevolve.w_bits=2                      # 259 s
# the exports, each run in onnxruntime on the 10,000 MNIST test images:
python -m benchmarks.export --float /work/runs_export/search:float \
    --model /work/runs_export/search:front_00 --model /work/runs_export/search:front_01 \
    --model /work/runs_export/search:w4a4 --model /work/runs_export/search:w2a2 \
    --model /work/runs_export/sharing: --model /work/runs_export/sharing:int8 \
    --model /work/runs_export/coevolve: \
    --onnx-dir /work/runs_export/onnx --out benchmarks/results/lenet5_cpu_export/export.json
