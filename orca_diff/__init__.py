"""orca-diff: publish fine-tuned LLaMA-family models as exact weight diffs, and rebuild them bit-exactly."""

__version__ = "0.2.0"
