"""cupy_backends of the CuPy stand-in (tests/standin/cupy/_core.py)."""
