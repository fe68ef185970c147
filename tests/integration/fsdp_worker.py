"""Run under ``torchrun --nproc_per_node 2`` by ``test_distributed.py``: FSDP2 full shard of a
:class:`LogProbModel` (layers picked by accelerate's own transformer auto-wrap policy) gives the
same log-probs and gradients as the unsharded model. Each rank gets a different packed batch;
FSDP averages gradients across ranks, so the reference is the mean of the two unsharded grads.
With ``lora`` as a second argument the model has LoRA adapters and the loss a reference: the
policy with adapters off, run (as in training) through the FSDP-wrapped module and before the
policy's forward. Writes ``{"rank", "wrapped", "logps_diff", "grad_rel_diff"}`` as JSON to
``argv[1]-RANK.json``."""

import json
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from accelerate.utils import FullyShardedDataParallelPlugin
from accelerate.utils.fsdp_utils import fsdp2_prepare_auto_wrap_policy
from model.test_logprobs import make_examples, model_for
from torch.distributed.fsdp import fully_shard

from preftune.data.collate import collate_packed
from preftune.model.logprobs import LogProbModel
from preftune.training.reference import AdapterOffReference


def dpo_like(logps: torch.Tensor, ref_logps: torch.Tensor | None = None) -> torch.Tensor:
    ratios = logps - ref_logps if ref_logps is not None else logps
    chosen, rejected = ratios.view(2, -1)  # sequences are laid out completion-major: s = k * G + g
    return -F.logsigmoid(0.5 * (chosen - rejected)).mean()


def make_model(lora: bool):
    """The tiny Llama (seed 0), or it with LoRA on q/v whose B matrices are non-zero (seeded), so the
    adapters-off reference differs from the policy."""
    model = model_for("llama")
    if not lora:
        return model
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"]))
    torch.manual_seed(1)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.05)
    return model


def main(prefix: str, lora: bool) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    examples = make_examples()
    batches = [collate_packed(examples[r::world], pad_id=0) for r in range(world)]
    plain_model = make_model(lora)
    plain = LogProbModel(plain_model)
    plain_ref = AdapterOffReference(plain_model) if lora else None
    for batch in batches:
        ref_logps = plain_ref.logps(batch) if lora else None
        (dpo_like(plain(batch).logps, ref_logps) / world).backward()
    expected_grads = {n: p.grad.clone() for n, p in plain.named_parameters() if p.requires_grad}
    expected_logps = plain(batches[rank]).logps.detach()

    sharded_model = make_model(lora)  # same seeds: the same weights
    sharded = LogProbModel(sharded_model)
    plugin = FullyShardedDataParallelPlugin(fsdp_version=2, auto_wrap_policy="transformer_based_wrap")
    policy = fsdp2_prepare_auto_wrap_policy(plugin, sharded)
    wrapped = [m for m in sharded.modules() if policy(m)]
    for module in wrapped:
        fully_shard(module)
    fully_shard(sharded)
    # As the training loop does: the reference (adapters off, through the wrapper) before the policy.
    ref_logps = AdapterOffReference(sharded_model, forward=sharded).logps(batches[rank]) if lora else None
    logps = sharded(batches[rank]).logps
    dpo_like(logps, ref_logps).backward()
    worst = 0.0
    for name, p in sharded.named_parameters():
        if not p.requires_grad:
            continue
        grad = p.grad.full_tensor()
        scale = expected_grads[name].abs().max().clamp_min(1e-12)
        worst = max(worst, ((grad - expected_grads[name]).abs().max() / scale).item())
    result = {"rank": rank, "wrapped": len(wrapped), "sharded_params": all(hasattr(p, "full_tensor") for p in sharded.parameters()),
              "logps_diff": (logps.detach() - expected_logps).abs().max().item(), "grad_rel_diff": worst}
    with open(f"{prefix}-{rank}.json", "w") as f:
        json.dump(result, f)
    dist.barrier()  # both ranks done with every collective before gloo is torn down
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], lora=len(sys.argv) > 2 and sys.argv[2] == "lora")
