"""What follows a call's state changes: webhooks (outbox and dispatcher), analysis, the
end-of-call report and the hooks that run them.

Must not import: fastapi, starlette, uvicorn, twilio, deepgram, ollama, api, voice_pipeline,
chromadb.
"""
