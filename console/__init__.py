"""The web console: server-rendered pages at `/console`, their assets, signing in and out,
and the browser test call.

Must not import: twilio, deepgram, ollama, chromadb, adapters, voice_pipeline, runtime.
Of ours, imports only: api, config, console, models, schemas, utils, postcall,
pipeline.contracts.
"""
