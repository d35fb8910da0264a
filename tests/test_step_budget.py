"""`StepBudget`: prompt tokens per step that keep a step within twice a plain one, from measured rounds."""

from __future__ import annotations

from bot.engine.step_budget import StepBudget


def test_before_anything_is_measured_it_reads_a_few_tokens() -> None:
    budget = StepBudget(first=4)
    assert budget.tokens() == 4
    budget.record(0.5, 8)  # a round with prompt tokens but no plain step to compare with
    assert budget.tokens() == 4


def test_the_budget_fills_the_allowed_extra_time() -> None:
    budget = StepBudget(limit=2.0, headroom=0.8)
    budget.record(0.020, 0)  # plain steps of 20 ms
    budget.record(0.070, 10)  # 10 tokens added 50 ms: 5 ms a token
    assert budget.token_seconds is not None and abs(budget.token_seconds - 0.005) < 1e-12
    assert budget.tokens() == 3  # 0.8 x 20 ms of extra time / 5 ms
    for _ in range(40):  # the machine got faster at prompts: 1 ms a token
        budget.record(0.030, 10)
    assert budget.tokens() == 15


def test_a_plain_step_is_the_median_of_the_recent_ones() -> None:
    budget = StepBudget()
    for seconds in (0.050, 0.048, 0.020, 0.021, 0.019, 0.020, 0.022, 0.020, 0.021, 0.020):
        budget.record(seconds, 0)  # a slow warm-up, then 20 ms steps
    assert budget.plain_seconds == 0.020


def test_one_chunk_that_cost_nothing_does_not_open_the_budget_wide() -> None:
    """A chunk measured as free (its step quick for other reasons) lets the next one at most double."""
    budget = StepBudget(first=4, most=512)
    for _ in range(4):
        budget.record(0.025, 0)
    budget.record(0.024, 4)  # 4 tokens, and quicker than a plain step
    assert budget.tokens() == 8
    budget.record(0.026, 8)
    assert budget.tokens() == 16


def test_the_budget_stays_between_one_token_and_its_most() -> None:
    slow = StepBudget(most=64)
    slow.record(0.010, 0)
    slow.record(5.0, 1)
    assert slow.tokens() == 1
    fast = StepBudget(most=64)
    fast.record(0.050, 0)
    fast.record(0.050, 100)  # no measurable cost
    assert fast.tokens() == 64


def test_a_prompt_that_ends_short_of_its_chunk_does_not_shrink_the_next_ones() -> None:
    budget = StepBudget(first=4, most=512)
    for _ in range(4):
        budget.record(0.020, 0)
    for expected in (8, 16, 32):
        budget.record(0.020, budget.tokens())  # chunks that cost nothing: the budget doubles each round
        assert budget.tokens() == expected
    budget.record(0.020, 3)  # offered 32, the prompt had 3 tokens left
    assert budget.tokens() == 32  # offered again, where a cap taken from the 3 tokens would give 6
