"""Persistence: the database per app and the call records the pipeline writes.

Must not import: fastapi, starlette, uvicorn, twilio, deepgram, ollama, api, voice_pipeline,
chromadb.
"""
