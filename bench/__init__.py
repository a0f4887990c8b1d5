"""Benchmarks. Each prints figures and asserts nothing; `python -m bench` is the concurrent
call benchmark (the service and the emulators as subprocesses, simulated Twilio callers in
this process). Besides the emulators it imports two pure helpers of the pipeline
(`SentenceChunker`, `LEAD_S`) so the figures follow the pipeline's own definitions.

Must not import: fastapi, sqlalchemy, store, tools, postcall.
"""
