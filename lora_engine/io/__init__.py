"""Files, below everything else: atomic writes (atomic.py) and strict safetensors reading (safetensors.py).

Imports torch and the standard library only, so every layer above may use it.
"""
