"""schemathesis against the server's own OpenAPI document: requests generated from every
route's schema never get a 5xx. (Driven through hypothesis directly: schemathesis' pytest
plugin does not load on this pytest.)"""

from __future__ import annotations

import pytest

schemathesis = pytest.importorskip("schemathesis")
hypothesis = pytest.importorskip("hypothesis")

from schemathesis.checks import not_a_server_error  # noqa: E402

from hanlm.serve.protocol import REFUSED_CHAT, REFUSED_COMPLETION  # noqa: E402

LEFT_OUT = {*REFUSED_CHAT, *REFUSED_COMPLETION, "tools", "tool_choice", "model"}


def test_no_server_errors_on_generated_requests(live):
    schema = schemathesis.openapi.from_url(live.url + "/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    paths = {op.path for op in operations}
    assert {"/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/tokenize"} <= paths
    headers = {"Authorization": f"Bearer {live.key}"}
    seen: dict[str, set[int]] = {}
    for op in operations:

        @hypothesis.given(case=op.as_strategy())
        @hypothesis.settings(
            max_examples=10,
            deadline=None,
            derandomize=True,
            database=None,
            suppress_health_check=list(hypothesis.HealthCheck),
        )
        def check(case) -> None:
            response = case.call_and_validate(
                base_url=live.url, headers=headers, checks=[not_a_server_error], timeout=60
            )
            seen.setdefault(case.path, set()).add(response.status_code)
            if case.method == "POST" and isinstance(case.body, dict):
                # again without what is always a 4xx here (fields this server refuses, tool use
                # out of context, another model's name), so that generated bodies reach the
                # model too
                case.body = {k: v for k, v in case.body.items() if k not in LEFT_OUT}
                for m in case.body.get("messages") or []:
                    if isinstance(m, dict):
                        m.pop("tool_calls", None)
                        if m.get("role") == "tool":
                            m["role"] = "user"
                response = case.call_and_validate(
                    base_url=live.url, headers=headers, checks=[not_a_server_error], timeout=60
                )
                seen.setdefault(case.path + " (trimmed)", set()).add(response.status_code)

        check()
    # the generated bodies reached the model, not only the request checks
    assert 200 in seen["/v1/chat/completions (trimmed)"], seen
    assert 200 in seen["/v1/embeddings (trimmed)"], seen
