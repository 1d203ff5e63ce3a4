"""nemoh."""
