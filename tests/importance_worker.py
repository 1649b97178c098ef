"""Run under torchrun: both estimators with a gloo process group; rank 0 writes the results."""
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).parent))
import fxmerge  # noqa: E402
from importance_models import data, neg_loss, small_net  # noqa: E402
from fxmerge.importance import sgd_finetune  # noqa: E402

torch.set_num_threads(1)
out = Path(sys.argv[1])
dist.init_process_group("gloo")
model, batches = small_net(), data()
x = batches[0][0]
calibrated = fxmerge.ImportanceTable.calibrate(model, [b[0] for b in batches])
estimated = fxmerge.ImportanceTable.estimate(model, (x,), eval_fn=neg_loss(batches),
                                             train_fn=sgd_finetune(batches, steps=3, lr=0.01),
                                             path=out.with_suffix(".estimate.json"))
if dist.get_rank() == 0:
    out.write_text(json.dumps({"world": dist.get_world_size(), "calibrated": calibrated.to_dict(),
                               "estimated": estimated.to_dict()}))
dist.destroy_process_group()
