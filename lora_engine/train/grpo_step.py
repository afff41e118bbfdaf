"""One GRPO optimizer step: sample G completions per prompt, score them, and step on the policy-gradient loss.

    batcher = PromptBatcher(rows, batch_size, seed, per_step=grad_accum, num_iterations=mu, device=device)
    step_fn = GRPOStep(tokenizer, rewards, sampling, loss_settings, batcher)
    res = step_fn(model, opt, sched, [batcher.next() for _ in range(grad_accum)], max_grad_norm=1.0)

A rollout is drawn at the first of every `num_iterations` (mu) steps, for all the step's prompts at once
(the batched decoder, G copies of a prompt sharing one prefill, the sampler's own generator), and
scored: rewards (train/rewards.py), advantages per group (grpo.advantages), the log-probs of the
policy as it was (mu > 1: the ratios' denominator) and of the reference (beta > 0: the model with its
adapter switched off). The mu steps of a rollout see the same prompts (PromptBatcher repeats a step's
micro-batches mu times) and the same completions; a checkpoint taken between them carries the rollout
(PromptBatcher.state_dict), so a resumed run trains on it, loss for loss as if never stopped. Each
micro-batch then contributes its share of the loss (grpo.policy_loss), backward, and the update is
step.apply_gradients, as for SFT and DPO.

StepResult.extra carries TRL's metric names: reward, reward_std, rewards/<f>/mean and /std,
frac_reward_zero_std, completions/mean_length, completions/clipped_ratio (no stop token before
--max-completion-length), kl (beta > 0), clip_ratio/low_mean, high_mean and region_mean.

held_out_reward is the evaluation a GRPO run has in place of a target loss: the mean reward of greedy
completions of the held-out prompts (--val-data, else --val-split of --data; at most HELD_OUT_LIMIT of them),
before and after training.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from lora_engine.data.pipeline import Batcher
from lora_engine.lora.layers import adapters_disabled
from lora_engine.models.generate import Completions, decode
from lora_engine.train import rewards as reward_fns
from lora_engine.train.grpo import LossSettings, advantages, nanstd, policy_loss
from lora_engine.train.grpo_logps import completion_logps
from lora_engine.train.step import StepResult, _autocast, apply_gradients

# The most held-out prompts the reward before and after is measured on: a greedy completion each, twice a run, so a
# large prompt file's 10% --val-split would otherwise cost minutes to hours; 128 prompts give the mean of a 0/1
# reward to about +-0.04 (one standard error at p = 0.5). They are taken evenly spaced through the held-out prompts
# (which keep the file's order), so a file sorted by topic or difficulty is sampled across, not at its start.
HELD_OUT_LIMIT = 128


class PromptBatcher(Batcher):
    """Batcher over data.prepare.PromptRow: each step's `per_step` micro-batches of prompts come back
    `num_iterations` times in a row (round 0 draws the rollout, the later rounds reuse it). It also owns the
    sampling generator, seeded from the run's seed, and the current rollout (GRPOStep's), so its state_dict
    (saved in every checkpoint) holds all that decides what a step trains on: a checkpoint taken between the
    rounds of a rollout carries the rollout's tensors (completions, advantages, old and reference log-probs)
    and metrics, and the resumed run reuses them instead of drawing new ones (exact resume).

    Under DDP every rank holds the same batcher (the same prompts in the same order; each trains on its share
    of a step's micro-batches) but its own sampler, seeded by sampler_seed(seed, rank), and its own rollout.
    Rank 0 alone writes checkpoints, so GRPOStep hands it every rank's sampler and rollout after each step
    (`peers`); the checkpoint keeps them by rank, and each rank of a resumed run of the same world size takes
    its own back."""

    def __init__(self, rows, batch_size: int, seed: int, per_step: int = 1, num_iterations: int = 1,
                 device: torch.device | str = "cpu", rank: int = 0, world: int = 1):
        super().__init__(rows, batch_size, seed, pad_id=0, group_by_length=False)
        self.per_step, self.num_iterations = per_step, num_iterations
        self.device = torch.device(device)
        self.sampler_seed, self.rank, self.world = sampler_seed(seed, rank), rank, world
        self.generator = torch.Generator(device=device).manual_seed(self.sampler_seed)
        self._buffer: list[list[int]] = []
        self._served = 0  # micro-batches served from the buffer
        self.rollout: tuple[list[Rollout], dict] | None = None  # GRPOStep's current (rollouts, metrics)
        self.peers: list[dict] | None = None  # DDP, rank 0: every rank's rank_state() after the last step

    def next(self) -> dict:
        span = self.per_step * self.num_iterations
        if not self._buffer or self._served >= span:
            self._buffer = [self.next_indices() for _ in range(self.per_step)]
            self._served = 0
        idx = self._buffer[self._served % self.per_step]
        rnd = self._served // self.per_step
        self._served += 1
        rows = [self.rows[i] for i in idx]
        return {"rows": rows, "where": [w for r in rows for w in r.where], "round": rnd}

    def rank_state(self) -> dict:
        """This rank's sampler state and, mid-rollout (the next step reuses it), its rollout: tensors and plain
        data only (torch.load(weights_only=True))."""
        out = {"sampler": self.generator.get_state()}
        if self.rollout is not None and self._served % (self.per_step * self.num_iterations):
            rollouts, metrics = self.rollout
            out["rollout"] = {"micro": [{f.name: None if getattr(ro, f.name) is None else getattr(ro, f.name).cpu()
                                         for f in dataclasses.fields(ro)} for ro in rollouts],
                              "metrics": dict(metrics)}
        return out

    def state_dict(self) -> dict:
        out = {**super().state_dict(), "buffer": [list(b) for b in self._buffer], "served": self._served,
               **self.rank_state()}
        if self.peers is not None:
            out["ranks"] = self.peers
        return out

    def load_state_dict(self, s: dict) -> None:
        super().load_state_dict(s)
        self._buffer, self._served = [list(b) for b in s["buffer"]], s["served"]
        if "ranks" not in s and self.world == 1 or len(s.get("ranks", ())) == self.world:
            mine = s["ranks"][self.rank] if "ranks" in s else s
        else:  # saved at another world size: rank 0 keeps rank 0's sampler, a rollout split otherwise is drawn anew
            mine = {"sampler": s["sampler"]} if self.rank == 0 else {}
        if "sampler" in mine:
            self.generator.set_state(mine["sampler"])
        self.rollout = None
        if "rollout" in mine:
            micro = [Rollout(**{k: None if v is None else v.to(self.device) for k, v in m.items()})
                     for m in mine["rollout"]["micro"]]
            self.rollout = (micro, dict(mine["rollout"]["metrics"]))


def sampler_seed(seed: int, rank: int) -> int:
    """The seed of rank `rank`'s sampler: the run's seed on rank 0 (a one-process run's), distinct on the others."""
    return (seed + rank * 0x9E3779B97F4A7C15) % 2**64


@dataclass(frozen=True)
class Sampling:
    """How completions are drawn (--num-generations, --max-completion-length, --temperature, --top-p, --top-k,
    --stop)."""

    num_generations: int = 8
    max_completion_length: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    scale_rewards: str = "group"
    stop: tuple[str, ...] = ()  # a completion ends once its text holds one; its tokens (trained on) keep it


@dataclass
class Rollout:
    """One micro-batch of completions, G per prompt, rows of a group consecutive; tensors on the model's device."""

    input_ids: torch.Tensor        # (B, T) prompt + completion, right-padded
    attention_mask: torch.Tensor   # (B, T)
    prompt_lengths: torch.Tensor   # (B,)
    completion_mask: torch.Tensor  # (B, C)
    advantages: torch.Tensor       # (B,)
    old_logps: torch.Tensor | None = None  # (B, C), mu > 1
    ref_logps: torch.Tensor | None = None  # (B, C), beta > 0


class GRPOStep:
    """step.train_step's counterpart for --objective grpo (see the module docstring); holds the current rollout."""

    def __init__(self, tokenizer, rewards: list[reward_fns.Reward], sampling: Sampling, loss: LossSettings,
                 batcher: PromptBatcher, num_iterations: int = 1):
        self.tokenizer, self.rewards, self.sampling, self.loss = tokenizer, rewards, sampling, loss
        self.batcher = batcher
        self.num_iterations = num_iterations
        self.stop_ids = list(getattr(tokenizer, "eos_token_ids", None) or [tokenizer.eos_token_id])
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)

    def __call__(self, model, optimizer, scheduler, micro_batches: list[dict], max_grad_norm: float | None = 1.0,
                 amp: torch.dtype | None = None, scaler=None, on_nonfinite: str = "stop",
                 where: str = "", sync=None) -> StepResult:
        """One step on `micro_batches` (PromptBatcher.next()'s). sync: a train.distributed.Dist when the step
        spans several ranks, each passing its own share of the step's micro-batches (whole prompt groups): each
        samples its own, the reward statistics and advantages are the step's over all ranks, and each rank's
        loss is its share of the one-process loss over all micro-batches (the divisors count every rank's), so
        the summed gradients are that loss's gradient."""
        device = next(model.parameters()).device
        if micro_batches[0]["round"] == 0 or self.batcher.rollout is None:
            # (a resumed run finds the rollout its checkpoint was taken in, in the batcher's state)
            self.batcher.rollout = self.draw(model, micro_batches, amp, sync)
        model.train()
        lr = optimizer.param_groups[0]["lr"]
        optimizer.zero_grad(set_to_none=True)
        world = sync.world if sync is not None else 1
        tokens = sum(int(r.attention_mask.sum()) for r in self._rollouts)
        step_tokens = sum(float(r.completion_mask.sum()) for r in self._rollouts)
        if sync is not None:
            step_tokens, tokens = sync.sum([step_tokens, tokens])
        sums, problem = [0.0] * 6, None  # loss, kl, count, clipped low, high, region
        for i, ro in enumerate(self._rollouts):
            with _autocast(device, amp):
                lp = completion_logps(model, ro.input_ids, ro.attention_mask, ro.prompt_lengths, ro.completion_mask,
                                      self.sampling.temperature)
            parts = policy_loss(lp, ro.old_logps, ro.ref_logps, ro.advantages, ro.completion_mask, self.loss,
                                len(self._rollouts) * world, step_tokens)
            finite = bool(torch.isfinite(parts.loss))
            if not finite if sync is None else sync.any(not finite):  # every rank runs the same backward passes
                problem = None if finite else f"non-finite GRPO loss ({float(parts.loss.detach())}) in micro-batch {i}"
                if sync is not None:
                    problem = sync.first(problem and f"{problem} on rank {sync.rank}")
                break
            (scaler.scale(parts.loss) if scaler is not None else parts.loss).backward()
            for j, v in enumerate((float(parts.loss.detach()), parts.kl_sum, parts.count, *parts.clipped.values())):
                sums[j] += v
        if sync is not None and problem is None:
            sums = sync.sum(sums)
            sync.reduce_gradients([p for g in optimizer.param_groups for p in g["params"]])
        grad_norm, skipped = apply_gradients(model, optimizer, scheduler, max_grad_norm, scaler, on_nonfinite, where,
                                             problem)
        if sync is not None:  # rank 0 writes the checkpoints: it keeps every rank's sampler and rollout
            self.batcher.peers = sync.gather(self.batcher.rank_state())
        loss_sum, kl, count = sums[:3]
        extra = dict(self.batcher.rollout[1])
        extra.update({f"clip_ratio/{k}_mean": v / max(count, 1.0) for k, v in zip(("low", "high", "region"), sums[3:])})
        if self.loss.beta != 0.0:
            extra["kl"] = kl / max(step_tokens, 1.0)
        return StepResult(math.nan if skipped else loss_sum, grad_norm, lr, int(tokens), int(step_tokens), skipped,
                          extra)

    @property
    def _rollouts(self) -> list[Rollout] | None:
        """The current rollout's micro-batches (held by the batcher, whose state a checkpoint saves)."""
        return None if self.batcher.rollout is None else self.batcher.rollout[0]

    @torch.no_grad()
    def draw(self, model, micro_batches: list[dict], amp, sync=None) -> tuple[list[Rollout], dict]:
        """The step's rollouts (one per micro-batch) and their metrics: sample, score, advantages, log-probs.
        sync (DDP): the ranks' rewards are gathered, as TRL gathers its processes', so the advantages (with
        --scale-rewards batch, the std of the whole step's) and the metrics are the step's, not this rank's."""
        device = next(model.parameters()).device
        G, s = self.sampling.num_generations, self.sampling
        rows = [r for b in micro_batches for r in b["rows"] for _ in range(G)]  # each prompt G times, together
        with _autocast(device, amp):
            out = decode(model, [r.input_ids for r in rows], s.max_completion_length, temperature=s.temperature,
                         top_p=s.top_p, top_k=s.top_k, stop_ids=self.stop_ids, generator=self.batcher.generator,
                         stop_strings=s.stop, tokenizer=self.tokenizer,
                         pad_id=self.pad)
        try:
            per_func, total = self._score(rows, out)
            failed = None
        except reward_fns.RewardError as e:
            if sync is None:
                raise
            failed = e
        if sync is not None:  # a reward that failed on one rank stops every rank with its message, not a hang
            message = sync.first(failed and str(failed))
            if message is not None:
                raise reward_fns.RewardError(message) from failed
        lengths, clipped = [len(t) for t in out.tokens], [e is None for e in out.ended_by]
        mine = slice(0, len(rows))
        if sync is not None:  # the step's completions in rank order (groups stay whole: a rank's rows are whole groups)
            ranks = sync.gather((per_func.tolist(), total.tolist(), lengths, clipped))
            start = sum(len(r[1]) for r in ranks[:sync.rank])
            mine = slice(start, start + len(rows))
            per_func = torch.tensor([x for r in ranks for x in r[0]], dtype=torch.float32).view(-1, len(self.rewards))
            total = torch.tensor([x for r in ranks for x in r[1]], dtype=torch.float32)
            lengths, clipped = [x for r in ranks for x in r[2]], [x for r in ranks for x in r[3]]
        adv, zero_std = advantages(total, G, s.scale_rewards)
        adv = adv[mine]
        metrics = {"reward": float(torch.nanmean(total)), "reward_std": float(nanstd(total)),
                   "frac_reward_zero_std": float(zero_std.float().mean()),
                   "completions/mean_length": sum(lengths) / len(lengths),
                   "completions/clipped_ratio": sum(clipped) / len(clipped)}
        for j, r in enumerate(self.rewards):
            metrics[f"rewards/{r.name}/mean"] = float(torch.nanmean(per_func[:, j]))
            metrics[f"rewards/{r.name}/std"] = float(nanstd(per_func[:, j]))
        rollouts, start = [], 0
        for b in micro_batches:
            n = len(b["rows"]) * G
            ro = self._tensors(rows[start:start + n], out.tokens[start:start + n], adv[start:start + n], device)
            with _autocast(device, amp):
                if self.num_iterations > 1:
                    ro.old_logps = self._logps(model, ro)
                if self.loss.beta != 0.0:
                    with adapters_disabled(model):
                        ro.ref_logps = self._logps(model, ro)
            rollouts.append(ro)
            start += n
        return rollouts, metrics

    def _score(self, rows, out: Completions) -> tuple[torch.Tensor, torch.Tensor]:
        """(rewards per function (N, F), their weighted sum (N,)) of the completions `out` of `rows`."""
        texts = [self.tokenizer.decode(out.text_tokens(i), skip_special_tokens=True) for i in range(len(rows))]
        if self.sampling.stop:  # the text a reward reads ends before the stop string (as generate prints it)
            texts = [t[:min((j for j in (t.find(x) for x in self.sampling.stop) if j >= 0), default=len(t))]
                     for t in texts]
        prompts = [r.prompt for r in rows]
        completions = [[{"role": "assistant", "content": t}] if isinstance(p, list) else t
                       for p, t in zip(prompts, texts)]
        keys = sorted({k for r in rows for k in r.fields})
        fields = {k: [r.fields.get(k) for r in rows] for k in keys}
        per_func = reward_fns.score(self.rewards, prompts, completions, {**fields, "completion_ids": out.tokens})
        return per_func, reward_fns.weighted_sum(per_func, self.rewards)

    @torch.no_grad()
    def held_out_reward(self, model, rows, batch_size: int = 8, amp: torch.dtype | None = None,
                        limit: int = HELD_OUT_LIMIT) -> dict:
        """The mean reward of greedy (temperature 0) completions of the held-out prompts `rows`, one each, up to
        --max-completion-length: deterministic, so the evaluations before and after training compare the
        policies and not two draws. At most `limit` prompts are scored, evenly spaced (HELD_OUT_LIMIT). {"mean",
        "prompts" (scored), "held_out" (all), "per_function": {name: mean}}; a mean is None where no function
        scored any prompt (every reward None)."""
        held_out = len(rows)
        if held_out > limit:
            rows = [rows[i * held_out // limit] for i in range(limit)]
        device = next(model.parameters()).device
        was = model.training
        model.eval()
        try:
            tokens, ended = [], []
            for i in range(0, len(rows), batch_size):
                chunk = rows[i:i + batch_size]
                with _autocast(device, amp):
                    out = decode(model, [r.input_ids for r in chunk], self.sampling.max_completion_length,
                                 temperature=0.0, stop_ids=self.stop_ids, pad_id=self.pad,
                                 stop_strings=self.sampling.stop, tokenizer=self.tokenizer)
                tokens += out.tokens
                ended += out.ended_by
        finally:
            model.train(was)
        per_func, total = self._score(rows, Completions(tokens, ended))

        def mean(x: torch.Tensor) -> float | None:
            m = float(torch.nanmean(x))
            return None if math.isnan(m) else m

        return {"mean": mean(total), "prompts": len(rows), "held_out": held_out,
                "per_function": {r.name: mean(per_func[:, j]) for j, r in enumerate(self.rewards)}}

    def _logps(self, model, ro: Rollout) -> torch.Tensor:
        was = model.training
        model.eval()  # dropout off: the log-probs of the policy that sampled
        try:
            return completion_logps(model, ro.input_ids, ro.attention_mask, ro.prompt_lengths, ro.completion_mask,
                                    self.sampling.temperature)
        finally:
            model.train(was)

    def _tensors(self, rows, completions: list[list[int]], adv: torch.Tensor, device) -> Rollout:
        seqs = [r.input_ids + c for r, c in zip(rows, completions)]
        T, C = max(map(len, seqs)), max(map(len, completions))
        ids = torch.full((len(seqs), T), self.pad, dtype=torch.long)
        attn = torch.zeros(len(seqs), T, dtype=torch.long)
        cmask = torch.zeros(len(seqs), C, dtype=torch.long)
        for i, (sq, c) in enumerate(zip(seqs, completions)):
            ids[i, :len(sq)], attn[i, :len(sq)], cmask[i, :len(c)] = torch.tensor(sq), 1, 1
        lengths = torch.tensor([len(r.input_ids) for r in rows])
        return Rollout(ids.to(device), attn.to(device), lengths.to(device), cmask.to(device), adv.to(device))
