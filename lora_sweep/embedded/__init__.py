"""Embedded default: a tiny Llama checkpoint and the sanity samples, shipped as package data."""

from pathlib import Path

EMBEDDED_DIR: Path = Path(__file__).parent
TINY_LLAMA_DIR: Path = EMBEDDED_DIR / "tiny_llama"
SANITY_SAMPLES_PATH: Path = EMBEDDED_DIR / "sanity_samples.json"

__all__ = ["EMBEDDED_DIR", "SANITY_SAMPLES_PATH", "TINY_LLAMA_DIR"]
