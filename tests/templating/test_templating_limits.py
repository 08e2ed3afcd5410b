"""Bounded execution: ``Template.execute(limit=)`` and ``render_size`` stop at their limits."""

from __future__ import annotations

import pytest
from templating_support import make_data

from marblekeep.errors import RenderLimitError, TemplateError
from marblekeep.templating import FunctionSet, RenderBudget, parse_template, render_size

KEY = b"{{hex .MarbleRun.SealKey}}"  # 64 bytes of output


def test_execute_with_limit_stops_past_it() -> None:
    data = make_data()
    template = parse_template(KEY * 10, FunctionSet.FILES)
    assert template.execute(data, limit=640) == template.execute(data)
    with pytest.raises(RenderLimitError, match="more than 639 bytes"):
        template.execute(data, limit=639)
    constant = parse_template(b"x" * 100, FunctionSet.FILES)
    with pytest.raises(RenderLimitError):
        constant.execute(data, limit=99)


def test_render_size_counts_and_spends_the_budget() -> None:
    budget = RenderBudget(max_bytes=1000, max_actions=10)
    assert (
        render_size(b"ab" + KEY * 3, FunctionSet.FILES, make_data(), budget, max_bytes=1000, max_actions=10)
        == 194
    )
    assert (budget.bytes, budget.actions) == (1000 - 194, 7)


def test_render_size_stops_at_the_byte_limit_without_lexing_the_rest() -> None:
    budget = RenderBudget(max_bytes=1000, max_actions=10**9)
    # A syntax error far past the limit is never reached: the work stops at the limit.
    source = KEY * 100 + b"{{ broken"
    with pytest.raises(RenderLimitError, match="more than 5000 bytes"):
        render_size(source, FunctionSet.FILES, make_data(), budget, max_bytes=5000, max_actions=1)
    assert budget.actions == 10**9 - 16  # 16 actions of 64 bytes pass 1000


def test_render_size_stops_at_the_action_limit() -> None:
    budget = RenderBudget(max_bytes=10**9, max_actions=5)
    with pytest.raises(RenderLimitError, match="more than 7 template actions"):
        render_size(KEY * 6, FunctionSet.FILES, make_data(), budget, max_bytes=10**9, max_actions=7)
    assert budget.actions < 0


def test_render_size_reports_syntax_errors_before_execution_errors() -> None:
    budget = RenderBudget(max_bytes=10**6, max_actions=100)
    with pytest.raises(TemplateError) as err:
        render_size(
            b"{{hex .Secrets.missing}}{{ hex",
            FunctionSet.FILES,
            make_data(),
            budget,
            max_bytes=1,
            max_actions=1,
        )
    assert not isinstance(err.value, RenderLimitError)
    assert "unclosed action" in err.value.message
    with pytest.raises(TemplateError) as err:
        render_size(
            b"{{hex .Secrets.missing}}", FunctionSet.FILES, make_data(), budget, max_bytes=1, max_actions=1
        )
    assert not isinstance(err.value, RenderLimitError)
