"""Training data: reading and rendering records (formats.py), rows, packing and batches (pipeline.py),
the embedded default data (embedded.py), and `python -m lora_engine.data check FILE` (check.py).

    from lora_engine.data import load_examples, prepare, Batcher
"""

from lora_engine.data.pipeline import *  # noqa: F403  (the names in pipeline.__all__)
from lora_engine.data.pipeline import __all__  # noqa: F401
