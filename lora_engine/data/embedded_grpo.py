"""The embedded GRPO task: `python -m lora_engine.train --objective grpo` with no --data trains on it.

Sums of two whole numbers from 2 to 19, asked as chat ("What is 7 + 12?", after a system turn asking
for the number only), each record's "answer" the sum. The embedded SmolLM2-135M-Instruct starts bad
at it: it mostly explains ("To add 7 and 12, we need to...") and is cut off by the short completion
limit before it says a number. The reward is verifiable and built in: exact_match (the completion is
the number, nothing else) plus numeric_match (its last number is the sum), so "The answer is 19." earns
1 and "19" earns 2. Answering short is a behaviour LoRA moves within tens of steps, and the short
completions keep each step cheap on a CPU.

The prompts are made here, from the seed alone (no file, no download): all 324 pairs, shuffled by
the seed, the first HELD_OUT held out for the reward before and after training.

SETTINGS are the run's defaults for this task (chosen so the run takes minutes on a 2-core CPU):
train/config.py puts each in place of a flag left at its default value, so any flag given a
different value still wins.
"""

from __future__ import annotations

import random

from lora_engine.data.formats import Record

SYSTEM = "Reply with the number only."
HELD_OUT = 16
REWARD = "exact_match,numeric_match"

# flag -> value for the embedded task: 2 prompts x 8 completions of at most 8 tokens a step, lr 3e-3 after 2 warmup
# steps. Not yet tuned: one run on a heavily loaded 2-core CPU (~1 min a step) saw the rollout reward at 0 on most
# of its first 17 steps and the completions shrink to ~2 tokens without reward, so these values still need a
# measured run that shows the held-out reward rising (bench/grpo_demo.py) before the README can claim one.
SETTINGS = {"reward": REWARD, "max_steps": 24, "batch_size": 2, "num_generations": 8, "max_completion_length": 8,
            "lr": 3e-3, "warmup_steps": 2}


def arithmetic_records(seed: int = 0) -> tuple[list[Record], list[Record]]:
    """(train, held-out) records {"prompt": [system, user], "answer": "19"}: every sum a + b for a, b in 2..19,
    in an order drawn from `seed`, the first HELD_OUT held out."""
    pairs = [(a, b) for a in range(2, 20) for b in range(2, 20)]
    random.Random(seed).shuffle(pairs)
    recs = [Record({"prompt": [{"role": "system", "content": SYSTEM},
                               {"role": "user", "content": f"What is {a} + {b}?"}],
                    "answer": str(a + b)}, f"embedded arithmetic {a}+{b}") for a, b in pairs]
    return recs[HELD_OUT:], recs[:HELD_OUT]
