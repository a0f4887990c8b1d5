from tests.conftest import api_client, create_agent, make_settings, running_app


async def test_create_read_update_delete_agent(client):
    agent = await create_agent(
        client,
        phone_number="+14155550100",
        tools=[{"type": "book_meeting"}, {"type": "end_call"}],
        end_call_phrases=["goodbye"],
    )
    assert agent["first_message_mode"] == "assistant_speaks_first"
    assert "uh-huh" in agent["backchannel_phrases"]
    assert agent["min_interrupt_speech_ms"] == 60

    read = (await client.get(f"/v1/agents/{agent['id']}")).json()
    assert read["phone_number"] == "+14155550100"
    assert [t["type"] for t in read["tools"]] == ["book_meeting", "end_call"]

    patched = await client.patch(
        f"/v1/agents/{agent['id']}", json={"temperature": 0.9, "phone_number": None}
    )
    assert patched.status_code == 200
    assert patched.json()["temperature"] == 0.9
    assert patched.json()["phone_number"] is None
    assert patched.json()["name"] == "Test agent"

    assert (await client.delete(f"/v1/agents/{agent['id']}")).status_code == 204
    missing = await client.get(f"/v1/agents/{agent['id']}")
    assert missing.status_code == 404
    assert missing.json()["error"]["code"] == "not_found"


async def test_list_agents_is_paginated(client):
    for i in range(5):
        await create_agent(client, name=f"agent {i}")
    page = (await client.get("/v1/agents", params={"limit": 2, "offset": 2})).json()
    assert page["total"] == 5
    assert [a["name"] for a in page["items"]] == ["agent 2", "agent 3"]


async def test_phone_number_is_unique(client):
    await create_agent(client, phone_number="+14155550100")
    clash = await client.post("/v1/agents", json={"name": "B", "phone_number": "+14155550100"})
    assert clash.status_code == 409
    assert clash.json()["error"]["field"] == "phone_number"


async def test_bad_input_names_the_field(client):
    cases = [
        ({"name": "x", "phone_number": "4155550100"}, "phone_number"),
        ({"name": "x", "temperature": "hot"}, "temperature"),
        ({"name": "x" * 201}, "name"),
        ({"name": "x", "first_message_mode": "whenever"}, "first_message_mode"),
        ({"name": "x", "tools": [{"type": "http", "name": "bad name"}]}, "tools"),
        ({"name": "x", "calendar": {"timezone": "Mars/Base"}}, "calendar.timezone"),
        ({"name": "x", "unknown_field": 1}, "unknown_field"),
        ({}, "name"),
    ]
    for body, field in cases:
        response = await client.post("/v1/agents", json=body)
        assert response.status_code == 422, body
        assert response.json()["error"]["field"].startswith(field), response.json()


async def test_malformed_json_is_a_clear_422(client):
    response = await client.post(
        "/v1/agents", content=b'{"name": ', headers={"content-type": "application/json"}
    )
    assert response.status_code == 422
    assert "malformed JSON" in response.json()["error"]["message"]


async def test_patch_rejects_null_for_required_settings(client):
    agent = await create_agent(client)
    response = await client.patch(f"/v1/agents/{agent['id']}", json={"voice": None})
    assert response.status_code == 422
    assert response.json()["error"]["field"] == "voice"


async def test_api_key_is_required(app):
    async with api_client(app, authorized=False) as anonymous:
        assert (await anonymous.get("/v1/agents")).status_code == 401
        wrong = await anonymous.get("/v1/agents", headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401
        assert wrong.headers["www-authenticate"] == "Bearer"


async def test_health_reports_dependencies(client):
    response = await client.get("/health")
    body = response.json()
    assert response.status_code == 200 and body["status"] == "ok"
    assert body["checks"]["database"] == "ok"
    assert body["checks"]["chroma"] == "ok"
    assert body["checks"]["twilio"] == "configured"
    assert body["checks"]["deepgram"] == "configured"
    # the test settings point Ollama at a closed port: reported, not fatal
    assert body["checks"]["ollama"] == "unreachable"


async def test_health_sees_a_reachable_ollama(tmp_path):
    from emulators.ollama import OllamaEmulator

    with OllamaEmulator() as ollama:
        settings = make_settings(tmp_path, OLLAMA_HOST=ollama.url, DEEPGRAM_API_KEY="")
        async with running_app(settings) as (_, http):
            checks = (await http.get("/health")).json()["checks"]
    assert checks["ollama"] == "ok"
    assert checks["deepgram"] == "not_configured"


async def test_oversize_body_is_refused_before_reading(tmp_path):
    async with running_app(make_settings(tmp_path, MAX_REQUEST_BYTES=1000)) as (_, http):
        response = await http.post("/v1/agents", json={"name": "x", "system_prompt": "y" * 2000})
        assert response.status_code == 413
        assert "1000 bytes" in response.json()["error"]["message"]
        assert (await http.get("/v1/agents")).json()["total"] == 0
