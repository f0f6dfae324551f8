"""The words `deepencoder encode` and `plan` take (plain data, importing nothing), shared by the command lines that
offer them and the modules that act on them."""

from __future__ import annotations

FEATURES = ("projected", "pre-projector")  # what an encode run stores per page: the projector's tokens, or the join
DEFAULT_WEIGHTS = "deepseek-ai/DeepSeek-OCR"
RANDOM = "random"  # --weights random: a randomly initialised tower of --config's size, for trying the pipeline
