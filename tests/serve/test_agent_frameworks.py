"""Tool calls through the agent frameworks users put in front of an OpenAI-compatible server,
against a live `hanlm serve` around a random tiny model (a forced call is constrained to the
tool's schema, so whatever the model samples the framework gets a well-formed call):

- LangChain: `ChatOpenAI(...).bind_tools(...)`, whole and streamed, parses the call into
  `AIMessage.tool_calls`;
- the OpenAI Agents SDK: an `Agent` on `OpenAIChatCompletionsModel` calls a Python function
  tool, and the tool's result is the run's final output, whole and streamed.
"""

from __future__ import annotations

import asyncio

import pytest

pytest.importorskip("xgrammar")
langchain_openai = pytest.importorskip("langchain_openai")
agents = pytest.importorskip("agents")

ASK = "李白是哪个朝代的？"


@pytest.fixture(scope="module")
def served(tmp_path_factory, serve_random):
    path = tmp_path_factory.mktemp("agents") / "model"
    with serve_random(path, seed=11, max_positions=2048) as (client, _engine):
        yield str(client.base_url).rstrip("/")


def poet_dynasty(poet: str) -> str:
    """查询诗人所属的朝代"""
    return "唐"


def test_langchain_bind_tools_gets_the_forced_call(served):
    from langchain_core.messages import AIMessage

    llm = langchain_openai.ChatOpenAI(
        base_url=served, api_key="x", model="tiny", max_retries=0, max_tokens=96, temperature=1
    )
    bound = llm.bind_tools([poet_dynasty], tool_choice="poet_dynasty")
    msg = bound.invoke(ASK)
    assert isinstance(msg, AIMessage) and len(msg.tool_calls) == 1, msg
    call = msg.tool_calls[0]
    assert call["name"] == "poet_dynasty" and isinstance(call["args"]["poet"], str)
    assert call["id"].startswith("call_")
    assert msg.response_metadata["finish_reason"] == "tool_calls"

    chunks = list(bound.stream(ASK))
    whole = chunks[0]
    for c in chunks[1:]:
        whole = whole + c
    assert [c["name"] for c in whole.tool_calls] == ["poet_dynasty"], whole
    assert isinstance(whole.tool_calls[0]["args"]["poet"], str)


def _agent(base_url: str, calls: list[str]):
    from openai import AsyncOpenAI

    agents.set_tracing_disabled(True)

    @agents.function_tool
    def poet_dynasty(poet: str) -> str:
        """查询诗人所属的朝代"""
        calls.append(poet)
        return "唐"

    client = AsyncOpenAI(base_url=base_url, api_key="x", max_retries=0)
    return agents.Agent(
        name="poet-helper",
        instructions="回答关于诗人的问题，需要时调用工具。",
        tools=[poet_dynasty],
        model=agents.OpenAIChatCompletionsModel(model="tiny", openai_client=client),
        model_settings=agents.ModelSettings(tool_choice="required", max_tokens=96),
        tool_use_behavior="stop_on_first_tool",
    )


def test_openai_agents_sdk_runs_a_function_tool(served):
    calls: list[str] = []
    result = agents.Runner.run_sync(_agent(served, calls), ASK, max_turns=2)
    assert len(calls) == 1 and isinstance(calls[0], str)
    assert result.final_output == "唐"


def test_openai_agents_sdk_streamed_run_calls_the_tool(served):
    calls: list[str] = []

    async def go():
        run = agents.Runner.run_streamed(_agent(served, calls), ASK, max_turns=2)
        kinds = [event.type async for event in run.stream_events()]
        return run, kinds

    run, kinds = asyncio.run(go())
    assert len(calls) == 1
    assert run.final_output == "唐"
    assert "raw_response_event" in kinds and "run_item_stream_event" in kinds
