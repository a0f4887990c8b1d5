"""Outbound campaigns: the domain logic behind `/v1/campaigns` and the dialer. Calling
windows (`window`), retry policy and outcomes (`policy`), contact import (`contacts`),
counters, lifecycle and the call hook (`service`), and the durable dialer (`dialer`).

Must not import: fastapi, starlette, uvicorn, twilio, deepgram, ollama, api, voice_pipeline,
chromadb.
"""
