"""Final training (the search's budget: 4 QAT epochs, seed 0) of the shared-draw front model below w4a4."""
import json
import pathlib
import sys

import ml_collections

from qevo import search
from qevo.harness import fill_defaults

run = pathlib.Path("runs/resnet20_cpu_search_shared")
cfg = search.validate(ml_collections.ConfigDict(fill_defaults(json.loads((run / "config.json").read_text()),
                                                               search.defaults().to_dict())))
w = [32] + [4] * 10 + [1] + [4] * 7 + [32]
a = [32] + [4] * 18 + [32]
out = pathlib.Path(sys.argv[1])
problem = search.prepare(cfg, run)
rows = search.train_final(cfg, problem, [{"name": "front_1071", "kind": "front", "w_bits": w, "a_bits": a}], out)
print(json.dumps(rows, indent=1))
