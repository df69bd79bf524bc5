"""The trainer: runs as its own process (`python -m trainer`), never imports Qt."""
