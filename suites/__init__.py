"""The conformance suites. Each module defines `SUITE`, a `nemoh.conformance.case.Suite`.

Adding a suite: a module here (or in any package) and one line under
`[project.entry-points."nemoh.suites"]` in pyproject.toml. The core finds suites only through that
group (nemoh.plugins); nothing is imported until asked for.
"""
