"""The running app's wiring: every part built from settings at start-up, closed at exit.

Must not import: main.
"""
