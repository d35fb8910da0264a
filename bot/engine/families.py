"""Model families: what differs between BlenderBot (seq2seq) and a decoder-only chat model.

`Engine` picks one family when the model has loaded (`family_for`) and asks it, instead of checking
the model's kind itself, for everything the two kinds of model do differently: how long a prompt
may be, how a conversation becomes prompt ids, which generation settings apply, what a finished
reply (and one still being written) shows, which tokens the decoder starts from, and which runner
steps the model. The scheduler and the runners know nothing of families: the scheduler gets the
family's `decoder_start`, the runner is built by it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

from bot.core.types import Turn
from bot.engine.errors import EngineSettingsError

if TYPE_CHECKING:
    import torch

    from bot.engine import EngineConfig
    from bot.engine.decoding import DecodingPlan
    from bot.engine.scheduler import Runner

log = logging.getLogger(__name__)

# A chat model's context window, unless CONTEXT_TOKENS says otherwise: the model's own limit (32K for
# Qwen2.5) capped here. On a CPU a 2,048-token prompt already takes seconds to read in, and every
# reply attends over the whole window, so a longer default would slow every answer for history
# that a chat in a Discord channel rarely needs.
DEFAULT_CONTEXT_TOKENS = 2048
# The longest chat-model reply when the model's generation_config sets no length (Discord shows
# 2000 characters per message; 256 tokens is about 1000 characters of English).
DEFAULT_REPLY_TOKENS = 256
# A chat model's SYSTEM_PROMPT must leave at least this many tokens of a prompt for the conversation
# (a few words of the newest message), or the engine does not start; under ROOMY_CONVERSATION_TOKENS
# (about 40 words) it starts with a warning, since only the end of a long message would be read.
MIN_CONVERSATION_TOKENS = 8
ROOMY_CONVERSATION_TOKENS = 64

# The bytes of fp32 attention caches -> the dtype the runner's caches get (the engine's precision rule).
CacheDtype = Callable[[int], "torch.dtype"]


class ModelFamily:
    """What one kind of model does its own way. One instance per loaded engine."""

    name: ClassVar[str]
    reads_system_prompt: ClassVar[bool]  # whether SYSTEM_PROMPT (or a server's persona) reaches the model
    beams: ClassVar[bool]  # whether NUM_BEAMS applies (otherwise one row per reply)
    default_reply_tokens: ClassVar[int | None]  # the reply length when the model's config counts none

    def __init__(self, tokenizer: Any, model_config: Any, config: EngineConfig) -> None:
        self.tokenizer = tokenizer
        self.model_config = model_config
        self.config = config
        self.positions = 0  # set by `limits`
        self.max_input_tokens = 0

    # ----- limits and settings -----------------------------------------------------------------

    def context_positions(self) -> int:
        """The positions a request's tokens may fill (what caps the reply's length too)."""
        raise NotImplementedError

    def input_budget(self, plan: DecodingPlan) -> int:
        """The longest prompt, in tokens, once the plan's reply length is known."""
        raise NotImplementedError

    def reply_limit(self, positions: int) -> tuple[int, str]:
        """The longest reply `positions` allows, and what caps it (for the warning)."""
        raise NotImplementedError

    def limits(self, plan: DecodingPlan) -> int:
        """Fix the prompt budget for `plan` and check the settings leave room; returns the budget."""
        self.max_input_tokens = self.input_budget(plan)
        self.check_settings(plan)
        return self.max_input_tokens

    def check_settings(self, plan: DecodingPlan) -> None:
        """Refuse settings this family cannot serve (raise `EngineSettingsError`); nothing by default."""

    def generation_config(self, model: Any, positions: int) -> Any:
        """The model's own generation_config with the settings' overrides, installed on the model.

        An override of the reply length replaces the model's min/max_length instead of sitting
        beside it (transformers warns on every call when both are set). `positions` caps the reply.
        """
        config = self.config
        gen = model.generation_config
        gen = gen.__class__.from_dict(gen.to_dict())
        if config.num_beams is not None:
            gen.num_beams = config.num_beams
        if not self.beams and (gen.num_beams or 1) > 1:
            log.warning("chat models decode one row per reply (greedy or sampling); NUM_BEAMS is ignored")
            gen.num_beams = 1
        if config.min_new_tokens is not None:
            gen.min_new_tokens, gen.min_length = config.min_new_tokens, None
        if config.max_new_tokens is not None:
            gen.max_new_tokens, gen.max_length = config.max_new_tokens, None
        elif self.default_reply_tokens is not None and gen.max_new_tokens is None:
            gen.max_new_tokens, gen.max_length = self.default_reply_tokens, None
        limit, why = self.reply_limit(positions)
        if (gen.max_new_tokens or 0) > limit or (gen.max_length or 0) > limit + 1:
            log.warning("reply length capped at %d tokens (%s)", limit, why)
            if gen.max_new_tokens is not None:
                gen.max_new_tokens = min(gen.max_new_tokens, limit)
            if gen.max_length is not None:
                gen.max_length = min(gen.max_length, limit + 1)
        longest = gen.max_new_tokens if gen.max_new_tokens is not None else gen.max_length
        if (gen.min_new_tokens or 0) > longest:
            gen.min_new_tokens = longest
        if gen.num_beams == 1:
            gen.length_penalty = 1.0
            gen.early_stopping = False
        if gen.do_sample and not self.keeps_sampling():
            gen.do_sample = False
        model.generation_config = gen
        return gen

    def keeps_sampling(self) -> bool:
        """Whether a generation_config's do_sample is kept (saying why when it is not)."""
        raise NotImplementedError

    # ----- prompts and replies -----------------------------------------------------------------

    def encode(self, history: Sequence[Turn], system_prompt: str | None) -> list[int]:
        """The prompt's token ids for `history`, cut to `max_input_tokens`."""
        raise NotImplementedError

    def system_prompt_problem(self, text: str) -> str | None:
        """Why `text` cannot be the system prompt (with the numbers); None when it fits or is unused."""
        return None

    def text(self, ids: list[int]) -> str:
        """A finished reply's text, as posted and stored."""
        raise NotImplementedError

    def visible(self, text: str) -> str:
        """What may be shown of a reply still being written."""
        return text

    def decoder_start(self, prompt: list[int], plan: DecodingPlan) -> tuple[list[int], list[int] | None]:
        """The tokens a request's search starts from, and the encoder's ids (for its n-gram rule)."""
        raise NotImplementedError

    # ----- the runner --------------------------------------------------------------------------

    def build_runner(self, model: Any, plan: DecodingPlan, cache_dtype: CacheDtype) -> Runner:
        """The runner that steps this model over `config.max_batch` blocks."""
        raise NotImplementedError


class Seq2SeqFamily(ModelFamily):
    """BlenderBot: an encoder reads the prompt, the decoder starts from its start token; beams."""

    name = "seq2seq"
    reads_system_prompt = False
    beams = True
    default_reply_tokens = None

    def context_positions(self) -> int:
        # The encoder and the decoder have the same positions.
        self.positions = int(self.model_config.max_position_embeddings)
        return self.positions

    def input_budget(self, plan: DecodingPlan) -> int:
        return self.positions

    def reply_limit(self, positions: int) -> tuple[int, str]:
        return positions - 1, "positions"

    def keeps_sampling(self) -> bool:
        log.warning("this engine decodes BlenderBot without sampling; do_sample in its config is ignored")
        return False

    def encode(self, history: Sequence[Turn], system_prompt: str | None) -> list[int]:
        from bot.engine.prompt import build_input_ids

        tok = self.tokenizer
        return build_input_ids(
            history,
            lambda text: tok(text, add_special_tokens=False)["input_ids"],
            tok.eos_token_id,
            self.max_input_tokens,
        )

    def text(self, ids: list[int]) -> str:
        return str(self.tokenizer.decode(ids, skip_special_tokens=True)).strip()

    def decoder_start(self, prompt: list[int], plan: DecodingPlan) -> tuple[list[int], list[int] | None]:
        return [plan.start_id], prompt  # the decoder starts from its start token, beside the prompt

    def build_runner(self, model: Any, plan: DecodingPlan, cache_dtype: CacheDtype) -> Runner:
        from bot.engine.seq2seq import Seq2SeqRunner

        blocks = self.config.max_batch
        dtype = cache_dtype(Seq2SeqRunner.cache_size(model.config, blocks, plan.num_beams, plan.max_length))
        return Seq2SeqRunner(
            model, max_blocks=blocks, beams=plan.num_beams, max_length=plan.max_length, cache_dtype=dtype
        )


class ChatFamily(ModelFamily):
    """A decoder-only chat model (Llama, Qwen2, Qwen3): its chat template, a system prompt, one row
    per reply, `<think>` blocks hidden, a prefix cache of finished conversations."""

    name = "chat"
    reads_system_prompt = True
    beams = False
    default_reply_tokens = DEFAULT_REPLY_TOKENS

    def keeps_sampling(self) -> bool:
        return self.config.sampling  # SAMPLING=false: always greedy

    def context_positions(self) -> int:
        # The window holds both the prompt and the reply.
        limit = int(self.model_config.max_position_embeddings)
        wanted = self.config.context_tokens or min(limit, DEFAULT_CONTEXT_TOKENS)
        if wanted > limit:
            log.warning("CONTEXT_TOKENS capped at %d, the model's own limit", limit)
        self.positions = min(wanted, limit)
        return self.positions

    def input_budget(self, plan: DecodingPlan) -> int:
        return self.positions - (plan.max_length - 1)

    def reply_limit(self, positions: int) -> tuple[int, str]:
        return positions // 2, "half the context"

    def _bare_prompt(self, system_prompt: str) -> int:
        from bot.engine.chat_prompt import render_chat_ids

        return len(render_chat_ids(self.tokenizer, [Turn("user", "")], system_prompt=system_prompt))

    def check_settings(self, plan: DecodingPlan) -> None:
        """Refuse to start when SYSTEM_PROMPT leaves no room for the conversation.

        Every message would otherwise fail; the one line says which settings to change.
        """
        bare = self._bare_prompt(self.config.system_prompt)
        room = self.max_input_tokens - bare
        if room >= ROOMY_CONVERSATION_TOKENS:
            return
        what = "SYSTEM_PROMPT and the chat template take" if self.config.system_prompt else "the chat template takes"
        said = (
            f"{what} {bare} of the {self.max_input_tokens} tokens a prompt may hold ({self.positions} in the "
            f"context, {plan.max_length - 1} kept for the reply), leaving {max(room, 0)} for the conversation"
        )
        fix = (
            f"Shorten SYSTEM_PROMPT, raise CONTEXT_TOKENS (the model allows up to "
            f"{self.model_config.max_position_embeddings}), or lower MAX_NEW_TOKENS."
        )
        if room < MIN_CONVERSATION_TOKENS:
            raise EngineSettingsError(f"{said}; at least {MIN_CONVERSATION_TOKENS} are needed. {fix}")
        log.warning("%s: only the end of a long message will be read. %s", said, fix)

    def encode(self, history: Sequence[Turn], system_prompt: str | None) -> list[int]:
        from bot.engine.chat_prompt import build_chat_ids

        system = self.config.system_prompt if system_prompt is None else system_prompt
        return build_chat_ids(self.tokenizer, history, system_prompt=system, budget=self.max_input_tokens)

    def system_prompt_problem(self, text: str) -> str | None:
        bare = self._bare_prompt(text)
        room = self.max_input_tokens - bare
        if room >= ROOMY_CONVERSATION_TOKENS:
            return None
        return (
            f"with the chat template it takes {bare} of the {self.max_input_tokens} tokens a prompt may hold, "
            f"leaving {max(room, 0)} for the conversation; at least {ROOMY_CONVERSATION_TOKENS} are needed"
        )

    def text(self, ids: list[int]) -> str:
        """A chat model's `<think>` blocks are never posted nor stored."""
        from bot.core.messages import strip_think

        return strip_think(self.tokenizer.decode(ids, skip_special_tokens=True))

    def visible(self, text: str) -> str:
        """Nothing of an unfinished `<think>` block."""
        from bot.core.messages import visible_so_far

        return visible_so_far(text)

    def decoder_start(self, prompt: list[int], plan: DecodingPlan) -> tuple[list[int], list[int] | None]:
        return prompt, None  # the decoder continues the prompt

    def build_runner(self, model: Any, plan: DecodingPlan, cache_dtype: CacheDtype) -> Runner:
        from bot.engine.causal import CausalRunner
        from bot.engine.prefix_cache import PrefixCache

        blocks, positions = self.config.max_batch, self.positions
        dtype = cache_dtype(CausalRunner.cache_size(model.config, blocks, positions))
        slab_bytes = CausalRunner.cache_size(model.config, blocks, positions, dtype.itemsize)
        cached_mb = self.config.prefix_cache_mb
        cached_bytes = slab_bytes if cached_mb is None else cached_mb << 20
        runner = CausalRunner(
            model,
            max_blocks=blocks,
            max_length=positions,
            cache_dtype=dtype,
            prefix_cache=PrefixCache(cached_bytes) if cached_bytes > 0 else None,
        )
        self._warm_system_prefix(runner)
        return runner

    def _warm_system_prefix(self, runner: Any) -> None:
        """Read the prefix every prompt shares (system message, template) once, before any request."""
        from bot.engine.chat_prompt import system_prefix_ids

        try:
            runner.warm(system_prefix_ids(self.tokenizer, self.config.system_prompt))
        except Exception:  # only a slower first reply
            log.warning("could not read the system prompt ahead of the first message", exc_info=True)


def family_for(tokenizer: Any, model_config: Any, config: EngineConfig) -> ModelFamily:
    """The family of a loaded model, from its config: the one place the engine asks its kind."""
    kind = Seq2SeqFamily if model_config.is_encoder_decoder else ChatFamily
    return kind(tokenizer, model_config, config)
