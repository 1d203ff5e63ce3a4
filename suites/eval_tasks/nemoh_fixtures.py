"""Local data for nemoh's fixture tasks, read by lm-eval through each task's `custom_dataset`.

The files are JSON lines in the schemas of lm-eval's `mmlu` (cais/mmlu: question, subject, choices,
answer index) and `gsm8k` (openai/gsm8k: question, answer ending in `#### N`), loaded with
`datasets.load_dataset("json", data_files=...)`: a packaged builder over local files, so no hub is
touched. The paths are resolved next to this file, so `--include_path` works from any directory
(lm-eval would resolve a YAML's `data_files` against the current directory).
"""

from __future__ import annotations

from pathlib import Path

DATA = Path(__file__).resolve().parent / "data"


def _load(**splits: str):
    import datasets

    return datasets.load_dataset("json", data_files={k: str(DATA / v) for k, v in splits.items()})


def mmlu(**_metadata):
    """dev (5 few-shot examples) and test (16 questions), four choices each."""
    return _load(dev="mmlu_fixture_dev.jsonl", test="mmlu_fixture_test.jsonl")


def gsm8k(**_metadata):
    """train (5 few-shot examples) and test (12 word problems)."""
    return _load(train="gsm8k_fixture_train.jsonl", test="gsm8k_fixture_test.jsonl")
