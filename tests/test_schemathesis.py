"""Property-based API fuzzing from our own OpenAPI document: no input makes a server error."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from schemathesis.checks import not_a_server_error

from emulators.twilio_rest import TwilioRestEmulator
from tests.conftest import ACCOUNT_SID, API_KEY, AUTH_TOKEN, make_settings
from tests.harness import AppServer


@pytest.fixture(scope="module")
def api_schema(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    with TwilioRestEmulator(ACCOUNT_SID, AUTH_TOKEN) as twilio:
        settings = make_settings(
            tmp_path_factory.mktemp("schemathesis"), TWILIO_API_BASE_URL=twilio.url
        )
        server = AppServer(settings).start()
        try:
            yield schemathesis.openapi.from_url(server.url + "/openapi.json")
        finally:
            server.stop()


def test_no_input_causes_a_server_error(api_schema: Any) -> None:
    """Every operation of /openapi.json, fuzzed; any 5xx fails. (Schemathesis' own pytest
    plugin does not run under pytest 9, so its Hypothesis strategies are driven directly.)"""
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert len(operations) >= 8
    statuses: list[int] = []
    for operation in operations:

        @given(case=operation.as_strategy())
        @hypothesis_settings(
            max_examples=25,
            deadline=None,
            suppress_health_check=list(HealthCheck),
            derandomize=True,
            database=None,
        )
        def fuzz(case: Any) -> None:
            statuses.append(
                case.call_and_validate(
                    headers={"Authorization": f"Bearer {API_KEY}"}, checks=[not_a_server_error]
                ).status_code
            )

        fuzz()
    # the fuzzer really exercised the API: successes and client errors both
    assert len(statuses) >= 5 * len(operations)
    assert any(s < 300 for s in statuses) and any(400 <= s < 500 for s in statuses)
