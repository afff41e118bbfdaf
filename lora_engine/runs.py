"""`python -m lora_engine.runs list DIR`: the command; lineage itself is lora_engine/train/lineage.py."""

from lora_engine.train.lineage import main

if __name__ == "__main__":
    main()
