"""The tools an agent's LLM can call during a call, and the calendar maths behind booking.

Must not import: fastapi, starlette, uvicorn, twilio, deepgram, ollama, api, voice_pipeline,
chromadb.
"""
