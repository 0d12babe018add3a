"""Fuzzing harnesses for every parser that reads untrusted bytes.

``python -m fuzz [--seconds N] [TARGET...]`` replays the committed corpus and then fuzzes each
target for N seconds, coverage-guided with atheris (libFuzzer) where it is installed, else with
a built-in mutation loop. Anything but a ``MettaFormatError`` is a finding: the input is saved
under ``fuzz/crashes/`` and the run fails.
"""
