"""The ``reward-model:PATH`` judge: a one-logit sequence-classification model scores each response.

The score is the reward model's scalar on prompt + response, computed on the training data path
(:func:`preftune.evaluation.scoring.scoring_example`, the collate functions,
:func:`preftune.model.logprobs.batch_logps`), so a response is scored exactly as the reward model saw
its training pairs. A Llama-family reward model runs each prompt once and scores the responses on its
states (:mod:`preftune.evaluation.prompt_states`): the same arithmetic within 1e-4 in float32.
"""

from __future__ import annotations

from pathlib import Path

import torch

from preftune.data.collate import collate_padded
from preftune.data.tokenize import special_prefix_ids
from preftune.evaluation.judges.base import ScoringJudge, check_lengths
from preftune.evaluation.prompt_states import scores_with_states, states_for
from preftune.evaluation.scoring import scoring_example
from preftune.model.loading import is_reward_model_folder, load_model, load_tokenizer
from preftune.model.logprobs import batch_logps
from preftune.model.precision import resolve_compute_dtype
from preftune.training.reference import tokenizer_fingerprint, weights_fingerprint


class RewardModelJudge(ScoringJudge):
    """Scores with a reward model (``preftune train --loss reward``, or any one-logit
    ``AutoModelForSequenceClassification`` folder): its scalar on prompt + response.

    The text goes through the training data path (:func:`preftune.data.tokenize.tokenize_example`,
    the collate functions, :func:`preftune.model.logprobs.batch_logps`), so a response is scored exactly
    as the reward model saw its training pairs: a message-list prompt with the response as the
    assistant turn under the chat template, a plain prompt with the response and EOS. Batched, no
    grad, eval mode, loaded with ``trust_remote_code=False``; ``max_length`` keeps the end of long
    prompts as training does (None: no limit); ``mixed_precision`` as ``preftune train``'s.
    """

    spec_form = "reward-model:PATH"

    def __init__(self, path: str, batch_size: int = 8, max_length: int | None = None, device: str | None = None,
                 spec: str = "", dtype: str = "float32", mixed_precision: str = "no"):
        self.spec = spec or f"reward-model:{path}"
        if not is_reward_model_folder(path):
            raise ValueError(f"could not load the reward model from {path!r}: not a reward model folder (a "
                             "config.json with a one-label ...ForSequenceClassification architecture); train one "
                             "with preftune train --loss reward")
        self.tokenizer = load_tokenizer(path)
        self.model = load_model(path, dtype, head="reward")
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model.to(self.device).eval()
        self.batch_size = batch_size
        self.max_length = max_length
        self.compute_dtype = resolve_compute_dtype(mixed_precision, self.device)  # autocast, as in training
        self._weights: str | None = None  # weights_fingerprint, computed on the first cache_parts()
        # where the prompts' states are kept between calls (an evaluation's base-cache folder), or None
        self.states_dir: Path | None = None

    @classmethod
    def from_spec(cls, spec: str, **options) -> "RewardModelJudge":
        """``reward-model:PATH``; ``options`` (batch_size, max_length, device, dtype, mixed_precision) as
        the constructor's."""
        return cls(spec.removeprefix("reward-model:"), spec=spec, **options)

    def examples(self, prompts, responses) -> list:
        """The responses as finished replies on the training path, one completion each
        (:func:`preftune.evaluation.scoring.scoring_example`, as ``sequence_logps(..., append_eos=True)``)."""
        prefix = special_prefix_ids(self.tokenizer)
        out = []
        for index, (prompt, response) in enumerate(zip(prompts, responses)):
            tokenized = scoring_example(self.tokenizer, prompt, response, True, index, prefix, self.max_length)
            if tokenized is None:
                raise ValueError(f"response {index} is empty after truncation to max_length {self.max_length}")
            out.append(tokenized)
        return out

    def score(self, prompts, responses) -> list[float]:
        check_lengths(prompts=prompts, responses=responses)
        examples = self.examples(prompts, responses)
        prompt_ids = [example.prompt_ids for example in examples]
        found = states_for(self.model, prompt_ids, self.batch_size, self.tokenizer.pad_token_id, self.compute_dtype,
                           self.states_dir, "judge", self._weights)
        if found is not None:  # each prompt runs once (kept in states_dir for the next call when set)
            completions = [example.completions[0] for example in examples]
            return scores_with_states(*found, prompt_ids, completions, self.batch_size).tolist()
        # Longest first (as the training loop's length-grouped batches): a padded batch then holds texts
        # of similar length, not one long prompt's worth of padding per row; an out-of-memory error
        # shows at the first batch. Scores come back in the responses' order.
        order = sorted(range(len(examples)), key=lambda i: -examples[i].num_tokens)
        scores: list[float] = [0.0] * len(examples)
        with torch.no_grad():
            for start in range(0, len(order), self.batch_size):
                rows = order[start:start + self.batch_size]
                # Padded, one row per response: a response's score never depends on what shares its row, so
                # identical responses tie exactly (packed rows differ from padded in the last float bits).
                batch = collate_padded([examples[i] for i in rows],
                                       pad_id=self.tokenizer.pad_token_id).to(self.device)
                rewards = batch_logps(self.model, batch, compute_dtype=self.compute_dtype).rewards
                for i, value in zip(rows, rewards.float().cpu().tolist()):
                    scores[i] = value
        return scores

    def cache_parts(self) -> dict:
        if self._weights is None:
            self._weights = weights_fingerprint(self.model)
        return {"judge": "reward-model", "judge_weights": self._weights,
                "judge_tokenizer": tokenizer_fingerprint(self.tokenizer), "judge_batch_size": self.batch_size,
                "judge_max_length": self.max_length, "judge_compute_dtype": str(self.compute_dtype),
                "judge_device": self.device.type}
