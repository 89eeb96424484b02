"""Quick end-to-end: a Codex account, a key, the openai SDK streaming through Kleis."""

import openai


async def test_openai_sdk_streams_through_kleis(start_kleis, codex_fake):
    kleis = await start_kleis()
    await kleis.import_account("codex", codex_fake.grant())
    key, _ = await kleis.create_key(label="laptop")
    client = openai.AsyncOpenAI(base_url=kleis.url + "/openai/v1", api_key=key, max_retries=0)
    text = []
    async with client.responses.stream(model="gpt-5.5", input="hello") as stream:
        async for event in stream:
            if event.type == "response.output_text.delta":
                text.append(event.delta)
        final = await stream.get_final_response()
    assert "".join(text) == "Hello from Codex."
    assert final.usage.input_tokens == 120
    rows = await kleis.buckets()
    assert len(rows) == 1
    assert rows[0]["request_count"] == 1 and rows[0]["success_count"] == 1
    assert (rows[0]["input_tokens"], rows[0]["cache_read_tokens"], rows[0]["output_tokens"]) == (100, 20, 20)
