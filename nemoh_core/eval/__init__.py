"""MMLU and GSM8K through lm-eval on any backend: `lm_eval_model` (the `nemoh` model registered in
lm-eval), `tasks` (offline task checks, running, reporting) and `fixtures` (small offline tasks in
lm-eval's own formats)."""
