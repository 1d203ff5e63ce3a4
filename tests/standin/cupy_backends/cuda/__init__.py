"""cupy_backends.cuda of the CuPy stand-in."""
