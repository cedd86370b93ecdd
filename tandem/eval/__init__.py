"""Evaluation of drafters by the real verification loop: τ per benchmark, acceptance per draft
position, tokens/s against plain decoding of the same target in the same run."""
