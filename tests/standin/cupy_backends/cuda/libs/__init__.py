"""cupy_backends.cuda.libs of the CuPy stand-in."""
