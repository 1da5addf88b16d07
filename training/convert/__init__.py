"""Conversion between Hugging Face checkpoints and ours (see ``hf.py`` and ``families.py``)."""
