"""The HTTP and WebSocket surface: routers, their shared dependencies (`deps.py`), the error
shape, admission, and the Twilio Media Streams transport.

Must not import: twilio, deepgram, ollama, chromadb.
"""
