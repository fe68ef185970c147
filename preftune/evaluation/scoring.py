"""Log-probs of finished replies: one path from (prompt, completion) to a score under a model.

* :func:`sequence_logps` — summed log-prob of each completion text given its prompt.
* :func:`completion_logps` — the same for token ids (e.g. sampled ones).
* :func:`scoring_example` — one (prompt, completion) as the training path tokenizes it; the
  reward-model judge scores its responses through it too.

Prompts are plain text, or chat message lists (``[{"role": ..., "content": ...}]``) rendered with
the tokenizer's chat template and ``add_generation_prompt=True``.

One data path (STYLE.md): prompts and completions are tokenized by the training data path
(:mod:`preftune.data.tokenize`: boundary-exact, one BOS, the chat template), and every score comes
from the training loop's batches (:mod:`preftune.data.collate`, packed when the model can run packed
batches) and :func:`preftune.model.logprobs.batch_logps` (output head applied only where a completion
token is predicted, in chunks; never the (B, L, V) logits). The model is put in eval mode for each
call and given back in the mode it came in (:func:`eval_mode`, which sampling uses as well).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch

from preftune.data.records import Example, TokenizedExample
from preftune.data.tokenize import prompt_token_ids, render_prompt, special_prefix_ids, tokenize_example
from preftune.evaluation.judges.base import Prompt, check_lengths
from preftune.model.logprobs import batch_logps
from preftune.model.packing import scoring_collate


def pad_token_id(tokenizer) -> int:
    """The id batches are padded with: the tokenizer's pad token, else its EOS."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ValueError("the tokenizer has neither a pad nor an EOS token")
    return pad


def model_device(model) -> torch.device:
    """The device of the model's first parameter (where its inputs go)."""
    return next(model.parameters()).device


@contextlib.contextmanager
def eval_mode(model):
    """``model`` in eval mode inside the block, back in the mode it came in afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def sequence_logps(model, tokenizer, prompts: Sequence[Prompt], completions: Sequence[str],
                   batch_size: int = 8, append_eos: bool = False,
                   compute_dtype: torch.dtype | None = None) -> torch.Tensor:
    """(S,) summed log-prob of each completion given its prompt under ``model`` (float32, CPU).

    Tokenized as the training data path tokenizes an SFT example
    (:func:`preftune.data.tokenize.tokenize_example`): boundary-exact (a BPE token merged across
    the prompt/completion boundary belongs to the completion), one BOS, chat prompts through the
    template; scored as :func:`completion_logps` scores.

    ``append_eos=True`` scores the completion as a *finished* response ("says this, then
    stops"), exactly the ids training scores: a plain-text completion with the tokenizer's EOS
    appended, a reply to a chat prompt as the assistant turn with the template's end of turn
    (e.g. ``<|im_end|>\n``; no EOS, as in training). ``append_eos=False`` (the default) scores
    the completion text's own tokens only: no EOS, and a chat reply as the text right after the
    rendered prompt, without the end of turn. An empty completion then scores 0.
    """
    check_lengths(prompts=prompts, completions=completions)
    if append_eos and tokenizer.eos_token_id is None:
        raise ValueError("append_eos=True but the tokenizer has no EOS token")
    prefix = special_prefix_ids(tokenizer)
    examples = [scoring_example(tokenizer, prompt, completion, append_eos, index, prefix)
                for index, (prompt, completion) in enumerate(zip(prompts, completions))]
    return _score(model, examples, pad_token_id(tokenizer), batch_size, compute_dtype)


def scoring_example(tokenizer, prompt: Prompt, completion: str, finished: bool, index: int,
                    prefix: list[int], max_length: int | None = None) -> TokenizedExample | None:
    """One (prompt, completion) through the training path's tokenizer; see :func:`sequence_logps`
    (``finished`` is its ``append_eos``). ``max_length`` cuts as training does; None when the cut
    leaves no completion token."""
    if finished and not isinstance(prompt, str):  # a finished chat reply: the template ends the turn
        reply = [{"role": "assistant", "content": completion}]
        return tokenize_example(tokenizer, Example(kind="sft", prompt=list(prompt), completion=reply), index,
                                max_length, prefix_ids=prefix)
    text = render_prompt(tokenizer, prompt)
    if not completion:  # the training path refuses an empty completion; scored alone it is just the end
        ending = [tokenizer.eos_token_id] if finished else []
        return TokenizedExample(index=index, prompt_ids=prompt_token_ids(tokenizer, text, prefix),
                                completions=[ending])
    example = tokenize_example(tokenizer, Example(kind="sft", prompt=text, completion=completion), index,
                               max_length, prefix_ids=prefix)
    if example is None:
        return None
    ids = example.completions[0]
    if not finished and ids[-1] == tokenizer.eos_token_id and not completion.endswith(tokenizer.eos_token):
        example.completions = [ids[:-1]]  # the EOS the plain-text path appended (not one the text ends with)
    return example


def completion_logps(model, prompt_ids: Sequence[list[int]], completion_ids: Sequence[list[int]],
                     pad_id: int, batch_size: int = 8, compute_dtype: torch.dtype | None = None) -> torch.Tensor:
    """(S,) float32 CPU summed log-probs of token-id completions after token-id prompts, in input order.

    Sequence s is an SFT-kind :class:`~preftune.data.records.TokenizedExample` (one prompt, K = 1
    completion), batched ``batch_size`` sequences at a time by the training loop's collate
    function and scored by :func:`preftune.model.logprobs.batch_logps`; no grad, eval mode. An empty
    completion scores 0. ``compute_dtype`` (e.g. ``torch.bfloat16``): ``batch_logps``'s mixed
    precision (autocast body, head matmuls in it, log-softmax fp32); None: the weights' dtype.
    """
    check_lengths(prompt_ids=prompt_ids, completion_ids=completion_ids)
    examples = [TokenizedExample(index=s, prompt_ids=list(prompt), completions=[list(completion)])
                for s, (prompt, completion) in enumerate(zip(prompt_ids, completion_ids))]
    return _score(model, examples, pad_id, batch_size, compute_dtype)


def _score(model, examples: list[TokenizedExample], pad_id: int, batch_size: int,
           compute_dtype: torch.dtype | None) -> torch.Tensor:
    """(S,) float32 CPU ``batch_logps`` of one-completion examples; ``examples[s].index == s``.

    Longest first (as the loop orders a length-grouped epoch), so an out-of-memory error shows at
    the first batch; empty completions are not collated (they would have no target token) and
    score 0.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if any(not example.prompt_ids for example in examples):
        raise ValueError("every prompt needs at least one token")
    logps = torch.zeros(len(examples), dtype=torch.float32)  # (S,)
    scored = sorted((ex for ex in examples if ex.completions[0]), key=lambda ex: -ex.num_tokens)
    if not scored:
        return logps
    collate, device = scoring_collate(model, pad_id), model_device(model)
    with eval_mode(model), torch.no_grad():
        for start in range(0, len(scored), batch_size):
            batch = collate(scored[start:start + batch_size])
            out = batch_logps(model, batch.to(device), compute_dtype=compute_dtype)  # (G,) with K = 1
            logps[batch.example_index] = out.logps.float().cpu()
    return logps
