import sys
import time

import torch

torch.set_num_threads(2)
import importlib; E = importlib.import_module("preftune.evaluation.evaluate")
from preftune.config.train_config import TrainConfig
from preftune.model.loading import load_model, load_tokenizer

R = "/work/exp/full240/real"
orig = {}
def timed(mod, name):
    f = getattr(mod, name)
    def w(*a, **k):
        t = time.perf_counter(); r = f(*a, **k)
        print(f"{name}: {time.perf_counter()-t:.1f}s", flush=True); return r
    setattr(mod, name, w)
for n in ("pair_logps", "total_nll", "sample_token_ids", "completion_logps", "sample"):
    timed(E, n)
import preftune.evaluation.judges.base as J

t = time.perf_counter()
res = E.evaluate_model(f"{R}/b_sweep/dpo", f"{R}/data/hh_held_out.jsonl", ref_model="/work/cache/SmolLM2-135M-Instruct",
    generate=int(sys.argv[1]) if len(sys.argv) > 1 else 240, judge=f"reward-model:{R}/b_rm", max_new_tokens=48, batch_size=32,
    max_length=256, max_prompt_length=192, mixed_precision="auto", seed=0)
print("total", time.perf_counter()-t)
print(res["preference"]["accuracy"], res["generation"]["win_rate"], res["generation"]["kl"])
