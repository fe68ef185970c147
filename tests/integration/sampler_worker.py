"""Run under ``torchrun --nproc_per_node 2`` by ``test_distributed.py``: each rank samples its share of
7 prompts x 2 samples with :func:`preftune.evaluation.sampling.sample_scored` (``state`` given) and
writes the gathered completions and their log-probs to ``argv[1]-RANK.json``; the test compares them with
one process's."""

import json
import sys

import torch
from accelerate import PartialState

from preftune.evaluation.sampling import sample_scored
from preftune.model.tiny import tiny_model, train_tokenizer

PROMPTS = ["Hi", "Tell me about the river.", "Name a colour.", "Yo", "The garden and the ocean.", "A", "Why?"]


def completions(state=None) -> tuple[list[list[int]], list[float]]:
    """The completions' token ids and their summed log-probs from the sampler."""
    torch.set_num_threads(1)
    tokenizer = train_tokenizer(vocab_size=256)
    model = tiny_model("llama", vocab_size=len(tokenizer), seed=0).eval()
    _, ids, logps = sample_scored(model, tokenizer, PROMPTS, n=2, max_new_tokens=6, seed=3, batch_size=3,
                                  state=state)
    return ids, logps.tolist()


if __name__ == "__main__":
    import preftune.evaluation.decoding as decoding

    decoded = []  # the samples this process decoded itself
    original = decoding.decode_batch
    decoding.decode_batch = lambda model, chunk, *args, **kw: decoded.extend(chunk) or original(model, chunk, *args,
                                                                                                 **kw)
    original_lean = decoding.decode_batch_lean  # the tiny Llama decodes on the lean forward
    decoding.decode_batch_lean = lambda lean, chunk, *args, **kw: decoded.extend(chunk) or original_lean(lean, chunk,
                                                                                                         *args, **kw)
    state = PartialState(cpu=True)
    result, logps = completions(state)
    with open(f"{sys.argv[1]}-{state.process_index}.json", "w") as fh:
        json.dump({"world": state.num_processes, "completions": result, "logps": logps, "decoded": len(decoded)},
                  fh)
