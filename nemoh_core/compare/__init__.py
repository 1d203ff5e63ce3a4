"""Comparing runs: what changed between two nemoh reports (conformance or nemoh-bench), and whether it is a
regression by the chosen rules; and the history of a folder of successive runs with asv-style step detection.

`load` reads and checks reports (kind from the schema; a truncated, incomplete or hand-edited report is a
NemohError), `conformance` and `bench` diff one pair, `stats` holds the bootstrap and the step finder,
`run` pairs files or folders and applies the rules, `markdown` the pull-request summary, `history` the
series over runs, `cli` the `nemoh compare` and `nemoh history` commands (registered as nemoh.commands).
The comparison is JSON (schema reports/compare.schema.json); its HTML page is a nemoh.renderers entry.
"""
