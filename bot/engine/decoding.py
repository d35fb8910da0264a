"""Choosing tokens, one request at a time: greedy search and beam search, step by step.

The engine owns the decode loop, so it cannot call `generate()`; these classes make, for one
request, the same choices `generate()` makes (transformers 5.x `_sample` for greedy and
`_beam_search`), fed with one step's logits at a time. The logits processors are transformers' own.
`tests/test_engine_oracle.py` holds them to `generate()` token for token.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, cast

import torch
from torch.nn import functional as F
from transformers import (
    EncoderNoRepeatNGramLogitsProcessor,
    ForcedBOSTokenLogitsProcessor,
    ForcedEOSTokenLogitsProcessor,
    LogitsProcessorList,
    MinLengthLogitsProcessor,
    MinNewTokensLengthLogitsProcessor,
    MinPLogitsWarper,
    NoBadWordsLogitsProcessor,
    NoRepeatNGramLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
    SuppressTokensLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

_NEG = -1.0e9  # transformers' "impossible" score in beam search


@dataclass(frozen=True)
class DecodingPlan:
    """The generation settings every request shares, normalised from a `GenerationConfig`."""

    num_beams: int
    # Lengths count a request's tokens from its last prompt token on (BlenderBot: from the decoder's
    # start token, as generate() counts them): the reply's tokens plus one.
    max_length: int
    min_length: int  # likewise; 0 for none
    length_penalty: float
    early_stopping: bool | str
    eos_ids: tuple[int, ...]
    pad_id: int
    start_id: int  # the decoder's start token (encoder-decoder models only)
    sample: bool = False

    @classmethod
    def from_generation_config(cls, gen: Any, positions: int) -> DecodingPlan:
        """`positions`: the decoder's position limit, which caps the reply length."""
        max_length = gen.max_new_tokens + 1 if gen.max_new_tokens is not None else gen.max_length
        min_length = gen.min_new_tokens + 1 if gen.min_new_tokens is not None else (gen.min_length or 0)
        eos = gen.eos_token_id
        eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (int(eos),))
        pad = gen.pad_token_id if gen.pad_token_id is not None else (eos_ids[0] if eos_ids else 0)
        return cls(
            num_beams=int(gen.num_beams or 1),
            max_length=min(int(max_length), positions),
            min_length=int(min_length),
            length_penalty=float(gen.length_penalty if gen.length_penalty is not None else 1.0),
            early_stopping=gen.early_stopping if gen.early_stopping is not None else False,
            eos_ids=eos_ids,
            pad_id=int(pad),
            start_id=int(gen.decoder_start_token_id if gen.decoder_start_token_id is not None else pad),
            sample=bool(gen.do_sample),
        )


def logits_processors(
    gen: Any, plan: DecodingPlan, encoder_ids: list[int] | None, prefix_length: int = 1
) -> LogitsProcessorList:
    """transformers' processors (and warpers, when sampling) for one request, in `generate()`'s order.

    `prefix_length`: the tokens the search starts from (1, the start token, for BlenderBot; the whole
    prompt for a decoder-only model), as lengths count them.
    """
    shift = prefix_length - 1
    eos = list(plan.eos_ids)
    processors = LogitsProcessorList()
    if gen.repetition_penalty is not None and gen.repetition_penalty != 1.0:
        processors.append(RepetitionPenaltyLogitsProcessor(gen.repetition_penalty))
    if gen.no_repeat_ngram_size:
        processors.append(NoRepeatNGramLogitsProcessor(gen.no_repeat_ngram_size))
    if gen.encoder_no_repeat_ngram_size and encoder_ids is not None:
        processors.append(EncoderNoRepeatNGramLogitsProcessor(gen.encoder_no_repeat_ngram_size, _long([encoder_ids])))
    if gen.bad_words_ids is not None:
        processors.append(NoBadWordsLogitsProcessor(gen.bad_words_ids, eos))
    if eos and gen.min_new_tokens is None and gen.min_length:
        processors.append(MinLengthLogitsProcessor(gen.min_length, eos))
    if eos and gen.min_new_tokens:
        processors.append(MinLengthLogitsProcessor(plan.min_length + shift, eos))
        processors.append(MinNewTokensLengthLogitsProcessor(prefix_length, gen.min_new_tokens, eos))
    if gen.forced_bos_token_id is not None:
        processors.append(ForcedBOSTokenLogitsProcessor(gen.forced_bos_token_id))
    if gen.forced_eos_token_id is not None:
        processors.append(ForcedEOSTokenLogitsProcessor(plan.max_length + shift, gen.forced_eos_token_id))
    if gen.suppress_tokens is not None:
        processors.append(SuppressTokensLogitsProcessor(gen.suppress_tokens))
    if plan.sample:
        if gen.temperature is not None and gen.temperature != 1.0:
            processors.append(TemperatureLogitsWarper(gen.temperature))
        if gen.top_k is not None and gen.top_k != 0:
            processors.append(TopKLogitsWarper(top_k=gen.top_k, min_tokens_to_keep=1))
        if gen.top_p is not None and gen.top_p < 1.0:
            processors.append(TopPLogitsWarper(top_p=gen.top_p, min_tokens_to_keep=1))
        if gen.min_p is not None:
            processors.append(MinPLogitsWarper(min_p=gen.min_p, min_tokens_to_keep=1))
    return processors


class Search(Protocol):
    """One request's token choices; `advance` takes the logits of its rows for one step."""

    @property
    def rows(self) -> int:
        """How many rows (beams) the request decodes."""
        ...

    @property
    def length(self) -> int:
        """Decoder tokens so far, the start token included."""
        ...

    @property
    def streams(self) -> bool:
        """Whether `result()` mid-search is already part of the final answer (greedy: yes; beams: no)."""
        ...

    def next_tokens(self) -> list[int]: ...

    def advance(self, logits: torch.Tensor) -> tuple[list[int] | None, bool]:
        """Returns (the row order for the cache, or None if unchanged; whether the request is done)."""
        ...

    def result(self) -> list[int]:
        """The chosen tokens after the start token, up to and including the end token."""
        ...


class GreedySearch:
    """generate()'s greedy search (or, when the plan samples, its multinomial sampling) for one request.

    `prefix`: the tokens it starts from (BlenderBot's decoder start token, or a chat model's prompt).
    """

    rows = 1
    streams = True

    def __init__(
        self,
        plan: DecodingPlan,
        processors: LogitsProcessorList,
        prefix: list[int],
        generator: torch.Generator | None = None,
    ) -> None:
        self.plan = plan
        self.processors = processors
        self.tokens = list(prefix)
        self.start = len(prefix)
        self.max_length = plan.max_length + len(prefix) - 1
        self.generator = generator

    @property
    def length(self) -> int:
        return len(self.tokens)

    def next_tokens(self) -> list[int]:
        return self.tokens[-1:]

    def advance(self, logits: torch.Tensor) -> tuple[list[int] | None, bool]:
        scores = self.processors(_long([self.tokens]), logits)
        if self.plan.sample:
            probabilities = torch.softmax(scores, dim=-1)
            token = int(torch.multinomial(probabilities, num_samples=1, generator=self.generator)[0, 0])
        else:
            token = int(torch.argmax(scores, dim=-1)[0])
        self.tokens.append(token)
        return None, token in self.plan.eos_ids or len(self.tokens) >= self.max_length

    def result(self) -> list[int]:
        return self.tokens[self.start :]


class BeamSearch:
    """transformers' vectorised beam search (`_beam_search`) for a batch of one request."""

    streams = False  # the best beam can change until the end

    def __init__(self, plan: DecodingPlan, processors: LogitsProcessorList) -> None:
        self.plan = plan
        self.processors = processors
        self.rows = beams = plan.num_beams
        self.keep = max(2, 1 + len(plan.eos_ids)) * beams
        self.length = 1
        self.running = torch.full((beams, plan.max_length), plan.pad_id, dtype=torch.long)
        self.running[:, 0] = plan.start_id
        self.sequences = self.running.clone()
        self.running_scores = torch.zeros(beams)
        self.running_scores[1:] = _NEG  # only the first beam's tokens count on the first step
        self.scores = torch.full((beams,), _NEG)
        self.finished = torch.zeros(beams, dtype=torch.bool)
        self.improvable = True
        self._top = torch.arange(self.keep) < beams
        self._eos = torch.tensor(plan.eos_ids or (-1,))

    def next_tokens(self) -> list[int]:
        return self.running[:, self.length - 1].tolist()

    def advance(self, logits: torch.Tensor) -> tuple[list[int] | None, bool]:
        plan, cur = self.plan, self.length
        log_probs = self.processors(cast(torch.LongTensor, self.running[:, :cur]), F.log_softmax(logits, dim=-1))
        vocab = log_probs.shape[-1]
        totals = (log_probs + self.running_scores[:, None]).reshape(1, -1)
        top_scores, top_index = torch.topk(totals, k=self.keep)
        top_scores, top_index = top_scores[0], top_index[0]
        origin = top_index // vocab
        top_sequences = self.running[origin]
        top_sequences[:, cur] = top_index % vocab
        hits = torch.isin(top_sequences[:, cur], self._eos) | (cur + 1 >= plan.max_length)

        # The best candidates that have not just ended keep running.
        running_candidates = top_scores + hits.to(torch.float32) * _NEG
        chosen = torch.topk(running_candidates, k=self.rows)[1]
        self.running = top_sequences[chosen]
        self.running_scores = running_candidates[chosen]
        order = origin[chosen]

        # Candidates that ended among the top `beams` compete for the finished places.
        ended = hits & self._top
        finished_scores = top_scores / ((cur + 1 - 1) ** plan.length_penalty)
        full = bool(self.finished.all()) and plan.early_stopping is True
        finished_scores = finished_scores + float(full) * _NEG
        finished_scores = finished_scores + float(not self.improvable) * _NEG
        finished_scores = finished_scores + (~ended) * _NEG
        merged_scores = torch.cat((self.scores, finished_scores))
        best = torch.topk(merged_scores, k=self.rows)[1]
        self.sequences = torch.cat((self.sequences, top_sequences))[best]
        self.scores = merged_scores[best]
        self.finished = torch.cat((self.finished, ended))[best]

        self.length = cur = cur + 1
        # the best length a running beam could still reach, as transformers' early-stop heuristic guesses it
        never = plan.early_stopping == "never" and plan.length_penalty > 0.0
        hypothetical = plan.max_length - 1 if never else cur - 1
        best_running = self.running_scores[:1] / (hypothetical**plan.length_penalty)
        worst_finished = torch.where(self.finished, torch.min(self.scores), _NEG)
        self.improvable = self.improvable and bool(torch.any(best_running > worst_finished))
        open_beam = not (bool(self.finished.all()) and plan.early_stopping is True)
        done = not (self.improvable and open_beam and not bool(hits.all()))
        moved = order.tolist()
        return (None if moved == list(range(self.rows)) else moved), done

    def result(self) -> list[int]:
        tokens = self.sequences[0, 1:].tolist()
        for i, token in enumerate(tokens):
            if token in self.plan.eos_ids:
                return tokens[: i + 1]
        return [t for t in tokens if t != self.plan.pad_id]


def _long(ids: list[list[int]]) -> torch.LongTensor:
    return cast(torch.LongTensor, torch.tensor(ids, dtype=torch.long))


def new_search(
    plan: DecodingPlan, processors: LogitsProcessorList, prefix: list[int], generator: torch.Generator | None = None
) -> GreedySearch | BeamSearch:
    """Beam search when the plan has beams (BlenderBot, which starts from its one start token)."""
    if plan.num_beams > 1:
        return BeamSearch(plan, processors)
    return GreedySearch(plan, processors, prefix, generator)
