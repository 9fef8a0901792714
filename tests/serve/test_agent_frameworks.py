"""Tool calls through the agent frameworks users put in front of an OpenAI-compatible server,
against a live `hanlm serve` around a random tiny model (a forced call is constrained to the
tool's schema, so whatever the model samples the framework gets a well-formed call):

- LangChain: `ChatOpenAI(...).bind_tools(...)`, whole and streamed, parses the call into
  `AIMessage.tool_calls`;
- the OpenAI Agents SDK: an `Agent` on `OpenAIChatCompletionsModel` calls a Python function
  tool, and the tool's result is the run's final output, whole and streamed;
- litellm: `completion(model="openai/...", api_base=...)` gets the forced call whole and
  streamed (rebuilt by `stream_chunk_builder`), sends the tool's result back for a final answer,
  and `embedding(...)` gets one vector per text.
"""

from __future__ import annotations

import asyncio
import json
import os

import pytest

pytest.importorskip("xgrammar")
langchain_openai = pytest.importorskip("langchain_openai")
agents = pytest.importorskip("agents")
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # litellm: no fetch at import
litellm = pytest.importorskip("litellm")

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


TOOL = {
    "type": "function",
    "function": {
        "name": "poet_dynasty",
        "description": "查询诗人所属的朝代",
        "parameters": {
            "type": "object",
            "properties": {"poet": {"type": "string"}},
            "required": ["poet"],
        },
    },
}


def _litellm(served: str, messages: list, **kw):
    return litellm.completion(
        model="openai/tiny",
        api_base=served,
        api_key="x",
        messages=messages,
        tools=[TOOL],
        max_tokens=96,
        num_retries=0,
        **kw,
    )


def test_litellm_completion_runs_a_tool_loop_whole_and_streamed(served):
    forced = {"type": "function", "function": {"name": "poet_dynasty"}}
    ask = [{"role": "user", "content": ASK}]
    whole = _litellm(served, ask, tool_choice=forced)
    streamed = litellm.stream_chunk_builder(
        list(_litellm(served, ask, tool_choice=forced, stream=True))
    )
    for r in (whole, streamed):
        choice = r.choices[0]
        assert choice.finish_reason == "tool_calls", r
        (call,) = choice.message.tool_calls
        assert call.function.name == "poet_dynasty" and call.id.startswith("call_")
        assert isinstance(json.loads(call.function.arguments)["poet"], str)

    call = whole.choices[0].message.tool_calls[0]
    turn = {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": call.id,
                "type": "function",
                "function": {"name": call.function.name, "arguments": call.function.arguments},
            }
        ],
    }
    result = {"role": "tool", "tool_call_id": call.id, "content": "唐"}
    final = _litellm(served, [*ask, turn, result], tool_choice="none", max_completion_tokens=8)
    assert final.choices[0].finish_reason in ("stop", "length")
    assert isinstance(final.choices[0].message.content, str)
    assert not final.choices[0].message.tool_calls
    alone = _litellm(served, ask, tool_choice="none", max_completion_tokens=1)
    assert final.usage.prompt_tokens > alone.usage.prompt_tokens + 5  # the call and result sent


def test_litellm_embedding(served):
    r = litellm.embedding(
        model="openai/tiny", api_base=served, api_key="x", input=["李白", "杜甫"], num_retries=0
    )
    vectors = [d["embedding"] for d in r.data]
    assert len(vectors) == 2 and len(vectors[0]) == len(vectors[1]) > 0
    assert vectors[0] != vectors[1]
