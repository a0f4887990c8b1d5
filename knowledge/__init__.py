"""The per-agent knowledge base: document parsing, the Chroma store and its use cases.

Must not import: fastapi, starlette, uvicorn, twilio, deepgram, ollama, api, voice_pipeline.
"""
