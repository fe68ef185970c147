"""Run under ``torchrun --nproc_per_node 2`` by ``test_distributed.py``: FSDP2 full shard of a
:class:`LogProbModel` (layers picked by accelerate's own transformer auto-wrap policy) gives the
same log-probs and gradients as the unsharded model. Each rank gets a different packed batch;
FSDP averages gradients across ranks, so the reference is the mean of the two unsharded grads.
Writes ``{"rank", "wrapped", "logps_diff", "grad_rel_diff"}`` as JSON to ``argv[1]-RANK.json``."""

import json
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from accelerate.utils import FullyShardedDataParallelPlugin
from accelerate.utils.fsdp_utils import fsdp2_prepare_auto_wrap_policy
from torch.distributed.fsdp import fully_shard
from test_logprobs import make_examples, model_for

from preftune.data.collate import collate_packed
from preftune.logprobs import LogProbModel


def dpo_like(logps: torch.Tensor) -> torch.Tensor:
    chosen, rejected = logps.view(2, -1)  # sequences are laid out completion-major: s = k * G + g
    return -F.logsigmoid(0.5 * (chosen - rejected)).mean()


def main(prefix: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    examples = make_examples()
    batches = [collate_packed(examples[r::world], pad_id=0) for r in range(world)]
    plain = LogProbModel(model_for("llama"))
    for batch in batches:
        (dpo_like(plain(batch).logps) / world).backward()
    expected_grads = {n: p.grad.clone() for n, p in plain.named_parameters()}
    expected_logps = plain(batches[rank]).logps.detach()

    sharded = LogProbModel(model_for("llama"))  # same seed: the same weights
    plugin = FullyShardedDataParallelPlugin(fsdp_version=2, auto_wrap_policy="transformer_based_wrap")
    policy = fsdp2_prepare_auto_wrap_policy(plugin, sharded)
    wrapped = [m for m in sharded.modules() if policy(m)]
    for module in wrapped:
        fully_shard(module)
    fully_shard(sharded)
    logps = sharded(batches[rank]).logps
    dpo_like(logps).backward()
    worst = 0.0
    for name, p in sharded.named_parameters():
        grad = p.grad.full_tensor()
        scale = expected_grads[name].abs().max().clamp_min(1e-12)
        worst = max(worst, ((grad - expected_grads[name]).abs().max() / scale).item())
    result = {"rank": rank, "wrapped": len(wrapped), "sharded_params": all(hasattr(p, "full_tensor") for p in sharded.parameters()),
              "logps_diff": (logps.detach() - expected_logps).abs().max().item(), "grad_rel_diff": worst}
    with open(f"{prefix}-{rank}.json", "w") as f:
        json.dump(result, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
