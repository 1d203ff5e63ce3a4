"""The model as data: `config` (any Nemotron-H config.json -> a frozen ModelConfig), `ir` (the graph
IR built from it), `weights` (safetensors checkpoints through one name table), `init` (the random
weight rules) and `presets` (tiny generated checkpoints), plus the offline `tokenizer`."""
