"""Is a port right, and where does it diverge: `case` (cases, metrics, results, suites as data),
`metrics`, `tolerances` (the one table), `deviations` (known reference quirks with their probes),
`localise` (first diverging layer and op), `runner` (backends x dtypes x suites -> a JSON report)
and `junit`. The suites themselves live in nemoh.suites and are found through entry points."""
