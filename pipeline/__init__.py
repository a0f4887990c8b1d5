"""The live-call engine's parts and the contracts it needs from the app (providers, store,
tools, transport). `voice_pipeline.CallSession` drives them.

Must not import: fastapi, starlette, uvicorn, sqlalchemy, twilio, deepgram, ollama,
chromadb, httpx, aiohttp, websockets, api, store, adapters, knowledge, tools, postcall,
models, schemas, voice_pipeline.
"""
