"""Running a model on any backend: the `backend` protocol and its base class, the `registry` that
finds backends, and `session` (input validation, sessions, chunked prefill, greedy generation)."""
