"""Vendors behind the pipeline's contracts: Deepgram, Ollama, Twilio REST, and the HTTP
plumbing under them (provider transport, outbound URL guard, request signing).

Must not import: fastapi, starlette, uvicorn, sqlalchemy, chromadb, api, store, knowledge,
tools, postcall, voice_pipeline, models.
"""
