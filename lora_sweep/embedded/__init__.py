"""Embedded default: a tiny Llama checkpoint (with a chat template) and the sanity samples (also as
conversations), shipped as package data."""

from pathlib import Path

EMBEDDED_DIR: Path = Path(__file__).parent
TINY_LLAMA_DIR: Path = EMBEDDED_DIR / "tiny_llama"
SANITY_SAMPLES_PATH: Path = EMBEDDED_DIR / "sanity_samples.json"
SANITY_CHAT_PATH: Path = EMBEDDED_DIR / "sanity_chat.jsonl"  # the same records as conversations

__all__ = ["EMBEDDED_DIR", "SANITY_CHAT_PATH", "SANITY_SAMPLES_PATH", "TINY_LLAMA_DIR"]
