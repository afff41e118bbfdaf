"""One GRPO step's gradient and metrics, in one process or (under torchrun, gloo) on each of 2 ranks: what
test_grpo_distributed compares. The sampler is replaced by a deterministic one (each completion a function of
its prompt and its place in the group), so one process and two draw the same completions for the same prompts
and the comparison is of everything after sampling: rewards gathered over ranks, advantages (--scale-rewards
batch: the std of the whole step's), the loss divisors, the gradient all-reduce.

    python -m torch.distributed.run --nproc-per-node 2 tests/grpo_ddp_step.py MODEL_FOLDER OUT.pt
"""

import sys

import torch

from lora_engine.data.formats import Record
from lora_engine.data.prepare import prompt_row
from lora_engine.models.generate import Completions
from lora_engine.train import grpo_step
from lora_engine.train import rewards as R
from lora_engine.train.grpo import LossSettings
from lora_engine.train.grpo_step import GRPOStep, PromptBatcher, Sampling
from lora_engine.train.step import make_scheduler
from tests.test_train_support import FakeTokenizer, tiny_lora_model

G, BATCH, MICRO = 3, 2, 4  # completions per prompt, prompts per micro-batch, micro-batches in the whole step
CASES = {"dapo": {}, "grpo": {"beta": 0.04}, "dr_grpo": {}, "bnpo": {}}


def fake_decode(model, prompts, max_new_tokens, **_):
    """Completion j of a group: 1 + (j + len(prompt)) % max_new_tokens tokens picked from its prompt."""
    out = []
    for i, p in enumerate(prompts):
        j = i % G
        out.append([p[(3 * j + t) % len(p)] for t in range(1 + (j + len(p)) % max_new_tokens)])
    return Completions(out, [None] * len(out))


class Recorded(torch.optim.SGD):
    """SGD that keeps the gradients it stepped on (apply_gradients zeroes them after the step)."""

    def step(self, closure=None):
        self.grads = [p.grad.detach().clone() for g in self.param_groups for p in g["params"]]
        return super().step(closure)


def one_step(folder, loss_type: str, sync=None, batch: int = BATCH, micro: int = MICRO) -> dict:
    """{"grads": [the step's gradient per trainable parameter], "metrics": StepResult.extra, "loss"}; the caller
    puts fake_decode in place of grpo_step.decode. The step is `micro` micro-batches of `batch` prompts: every
    prompt once (batch x micro of them), whatever the split."""
    tok = FakeTokenizer()
    rows = [prompt_row(Record({"prompt": f"What is {i} plus {i * 7}?", "answer": str(8 * i)}, f"f:{i}"), tok, 64)
            for i in range(BATCH * MICRO)]
    world, rank = (sync.world, sync.rank) if sync is not None else (1, 0)
    batcher = PromptBatcher(rows, batch, 0, per_step=micro, rank=rank, world=world)
    lengths = R.Reward("len", lambda prompts, completions, **_: [float(len(c)) for c in completions])
    loss = LossSettings(loss_type=loss_type, max_completion_length=5, **CASES[loss_type])
    step = GRPOStep(tok, [lengths, R.load_rewards("numeric_match")[0]], Sampling(G, 5, 1.0, scale_rewards="batch"),
                    loss, batcher)
    torch.manual_seed(0)
    model = tiny_lora_model(folder)
    opt = Recorded([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    micro_batches = [batcher.next() for _ in range(micro)]
    share = micro_batches if sync is None else sync.share(micro_batches)
    res = step(model, opt, make_scheduler(opt, 0, 10), share, max_grad_norm=None, sync=sync)
    return {"grads": opt.grads, "metrics": res.extra, "loss": res.loss, "targets": res.targets}


if __name__ == "__main__":
    from lora_engine.train import distributed
    from lora_engine.train.config import TrainConfig

    folder, out = sys.argv[1], sys.argv[2]
    grpo_step.decode = fake_decode
    dist = distributed.init(TrainConfig(device="cpu", reward="len", objective="grpo", data="x"))
    try:
        got = {name: one_step(folder, name, dist) for name in CASES}
        if dist.main:
            torch.save(got, out)
        if dist.active:  # both ranks leave together: a rank tearing gloo down while its peer still saves can abort
            torch.distributed.barrier()
    finally:
        dist.close()
