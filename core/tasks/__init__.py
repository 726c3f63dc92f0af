"""Tasks: each model's inference (preprocess -> _forward -> postprocess) and the inputs and outputs around it."""
