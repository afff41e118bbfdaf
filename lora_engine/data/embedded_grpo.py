"""The embedded GRPO task: `python -m lora_engine.train --objective grpo` with no --data trains on it.

Which of two different whole numbers from 2 to 19 is larger, asked as chat ("Which is larger, 7 or 12?",
after a system turn asking for the number only), each record's "answer" the larger one and "pattern"
the form an answer must take (one of the two numbers alone). The reward is verifiable and built in:
numeric_match (the completion's last number is the answer) plus regex_match (the completion is one of
the two numbers and nothing else), so "12 is larger than 7." earns 0, "The answer is 12." 1, "7" 1,
"12" 2 and "1212" 0. (With any run of digits accepted, `\\d+`, a measured run learned to answer with
eight digits: regex_match rewarded the form and numeric_match was lost, a reward hacked, not learned.)

The embedded SmolLM2-135M-Instruct starts bad at it: greedy, it explains ("18 is larger than 17",
whose last number is the smaller one) and never answers with the number alone, yet about a fifth of
its sampled completions end on the right number (measured on 48 samples at temperature 1, 8 tokens),
so most groups of 8 differ in reward and the policy gradient has something to follow from the first
step. (Sums, "What is 7 + 12?", were tried first: 1 of 128 sampled completions was right, and forced
to start with a digit the model repeats the first number, so almost no group differs in reward.)
Short completions keep each step cheap on a CPU.

The prompts are made here, from the seed alone (no file, no download): all 306 ordered pairs, shuffled
by the seed, the first HELD_OUT held out for the reward before and after training.

SETTINGS are the run's defaults for this task (chosen so the run takes minutes on a 2-core CPU):
train/config.py puts each in place of a flag the user did not set, on the command line or in a --config
file; a flag given, even with its default value, wins.
"""

from __future__ import annotations

import random

from lora_engine.data.formats import Record

SYSTEM = "Reply with the number only."
HELD_OUT = 16
REWARD = "numeric_match,regex_match"


# flag -> value for the embedded task: 2 prompts x 8 completions of at most 8 tokens a step, lr 2e-3 (twice
# the SFT default, as "LoRA Without Regret" finds RL with LoRA wants; 3e-3 raised general perplexity 12x in a
# measured run) after 2 warmup steps. Measured figures: bench/results/grpo_demo.md.
SETTINGS = {"reward": REWARD, "max_steps": 24, "batch_size": 2, "num_generations": 8, "max_completion_length": 8,
            "lr": 2e-3, "warmup_steps": 2}


def comparison_records(seed: int = 0) -> tuple[list[Record], list[Record]]:
    """(train, held-out) records {"prompt": [system, user], "answer": "12", "pattern": "(7|12)\\.?"}: "Which is larger,
    a or b?" for every a != b in 2..19, in an order drawn from `seed`, the first HELD_OUT held out."""
    pairs = [(a, b) for a in range(2, 20) for b in range(2, 20) if a != b]
    random.Random(seed).shuffle(pairs)
    recs = [Record({"prompt": [{"role": "system", "content": SYSTEM},
                               {"role": "user", "content": f"Which is larger, {a} or {b}?"}],
                    "answer": str(max(a, b)), "pattern": rf"({a}|{b})\.?"}, f"embedded comparison {a},{b}")
            for a, b in pairs]
    return recs[HELD_OUT:], recs[:HELD_OUT]
