"""Benchmarks. Each prints figures and asserts nothing; `python -m bench` is the concurrent
call benchmark (the service and the emulators as subprocesses, simulated Twilio callers in
this process)."""
