"""How fast is a port against the hardware: `plan` (settings, target, fit), `measure` (timing a
runner, the correctness gate), `derive` (rates, ceilings, ratios), `run` (the three in order),
`cost` (FLOPs and bytes from the IR), `device` (clocks, memory meters, ceiling probes), `stats`,
`models` (random-weight bench models, runners) and `cli` (the nemoh-bench command)."""
