"""Data quality, found in records before tokenization: duplicates, near-duplicates, overlap between
training and validation data, empty or very short responses, one prompt with conflicting responses,
length outliers, malformed chat role sequences; and `dedup`, which drops duplicates.

    report = analyse(train_records, val_records=val_records)   # QualityReport
    report.summary()          # {"records": 2410, "exact_duplicate": 3, "near_duplicate": 12, ...}
    kept, dropped = dedup(train_records, against=val_records)

Near-duplicates. A record's text is lower-cased and cut into word tokens (runs of \\w, so spacing and
punctuation do not count); its shingles are the runs of `shingle` consecutive tokens (a shorter text
is one shingle). Two records are near-duplicates when the Jaccard similarity of their shingle sets,
J = |A & B| / |A | B|, is at least the threshold (default 0.8). On the embedded chatterbot corpus
(1,967 conversations, 49 groups of exact copies) 0.8 adds 3 pairs that differ in punctuation
("Will you die" / "Will you die?"); the pairs between 0.5 and 0.8 there are one question with a
shorter or another answer, which conflicting_responses reports instead.

Comparing every pair is quadratic, so MinHash proposes the candidates. k hash functions
h_i(x) = (a_i x + b_i) mod p, p = 2^61 - 1, x a 32-bit hash of the shingle, a_i and b_i drawn from
all of [0, p) (drawn below 2^32 instead, the family is far from min-wise: the estimate of a J = 2/3
pair came out 0.11); a signature holds min over the shingles of each h_i. For one h_i,
P(min over A = min over B) ~= J, so the fraction of equal entries, J^, estimates J with standard
deviation sqrt(J (1 - J) / k) <= 1 / (2 sqrt(k)) (1/32 at k = 256), and by Hoeffding
P(|J^ - J| >= eps) <= 2 exp(-2 k eps^2). Banding (LSH): the signature is cut into b bands of r rows,
and records equal on a whole band become candidates, with probability 1 - (1 - J^r)^b; r is the
largest that keeps a pair at the threshold missed with probability under 1e-6. Each candidate pair
is then decided by its exact Jaccard, so a reported similarity is exact; only the finding of a pair
is probabilistic, and only with that 1e-6.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np

from lora_engine.data.formats import Record, detect_format

SHINGLE = 3
NUM_PERM = 256
NEAR_THRESHOLD = 0.8
MIN_RESPONSE_WORDS = 2
OUTLIER_K = 3.0  # Tukey's "far out" fences on log lengths
OUTLIER_MIN_RATIO = 8.0  # ... but never closer than 8x the quartiles
MISS = 1e-6  # the largest allowed probability that LSH misses a pair at the threshold
KINDS = ("exact_duplicate", "near_duplicate", "train_val_overlap", "short_response", "conflicting_responses",
         "length_outlier", "role_sequence")
ROLES = ("system", "user", "assistant", "tool")
_P = (1 << 61) - 1
_WORD = re.compile(r"\w+")


_P64 = np.uint64(_P)
_M29, _M32 = np.uint64((1 << 29) - 1), np.uint64((1 << 32) - 1)


def _mulmod(a: np.ndarray, x: np.ndarray) -> np.ndarray:
    """a * x mod p in uint64 without overflow, for a < p = 2^61 - 1 and x < 2^32 (broadcast).

    a = ah 2^32 + al: al x < 2^64 and ah x < 2^61 fit; (y 2^32) mod p for y < 2^61 is a rotation of y's
    61 bits by 32, since 2^61 = 1 mod p: (y >> 29) + ((y & (2^29 - 1)) << 32).
    """
    lo = (a & _M32) * x % _P64
    hi = (a >> np.uint64(32)) * x % _P64
    hi = ((hi >> np.uint64(29)) + ((hi & _M29) << np.uint64(32))) % _P64
    return (lo + hi) % _P64


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def shingles(text: str, size: int = SHINGLE) -> set[str]:
    """The set of `size`-token runs of the text's word tokens (the whole text when shorter; empty text: none)."""
    w = words(text)
    if len(w) <= size:
        return {" ".join(w)} if w else set()
    return {" ".join(w[i : i + size]) for i in range(len(w) - size + 1)}


def jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0


class MinHasher:
    """k seeded hash functions; `signature(set)` -> (k,) uint64, `estimate(s, t)` -> the fraction of equal entries."""

    def __init__(self, num_perm: int = NUM_PERM, seed: int = 0):
        if num_perm < 1:
            raise ValueError(f"MinHasher: num_perm must be >= 1, got {num_perm}")
        rng = np.random.default_rng(seed)
        self.a = rng.integers(1, _P, num_perm, dtype=np.uint64)
        self.b = rng.integers(0, _P, num_perm, dtype=np.uint64)

    @property
    def num_perm(self) -> int:
        return len(self.a)

    def signature(self, items: set[str]) -> np.ndarray:
        if not items:
            raise ValueError("MinHasher.signature: the set is empty (an empty text has no shingles)")
        x = np.array([int.from_bytes(hashlib.blake2b(s.encode(), digest_size=4).digest(), "little") for s in items],
                     dtype=np.uint64)
        return ((_mulmod(self.a[None, :], x[:, None]) + self.b[None, :]) % _P64).min(axis=0)  # (k,)

    @staticmethod
    def estimate(s: np.ndarray, t: np.ndarray) -> float:
        return float(np.mean(s == t))


def rows_per_band(threshold: float, num_perm: int = NUM_PERM) -> int:
    """The largest r dividing num_perm with (1 - t^r)^(num_perm / r) <= MISS (1 when none does)."""
    best = 1
    for r in range(1, num_perm + 1):
        if num_perm % r == 0 and (1 - threshold**r) ** (num_perm // r) <= MISS:
            best = r
    return best


def near_pairs(sets: list[set], threshold: float = NEAR_THRESHOLD, hasher: MinHasher | None = None
               ) -> list[tuple[int, int, float]]:
    """(i, j, exact Jaccard) for i < j with J >= threshold, found through MinHash LSH; empty sets are skipped."""
    if not 0 < threshold <= 1:
        raise ValueError(f"near-duplicate threshold must be in (0, 1], got {threshold}")
    hasher = hasher or MinHasher()
    idx = [i for i, s in enumerate(sets) if s]
    if len(idx) < 2:
        return []
    sig = np.stack([hasher.signature(sets[i]) for i in idx])  # (n, k)
    r = rows_per_band(threshold, hasher.num_perm)
    cands = set()
    for band in range(hasher.num_perm // r):
        buckets = defaultdict(list)
        for row, key in enumerate(sig[:, band * r : (band + 1) * r]):
            buckets[key.tobytes()].append(row)
        for members in buckets.values():
            cands.update((members[x], members[y]) for x in range(len(members)) for y in range(x + 1, len(members)))
    out = []
    for x, y in sorted(cands):
        j = jaccard(sets[idx[x]], sets[idx[y]])
        if j >= threshold - 1e-12:  # 1e-12: J = 72/90 is "at" a 0.8 threshold despite rounding
            out.append((idx[x], idx[y], j))
    return out


@dataclass
class Finding:
    kind: str  # one of KINDS
    where: list[str]  # the records concerned, "file:line"
    detail: str


@dataclass
class QualityReport:
    records: int
    findings: list[Finding] = field(default_factory=list)

    def summary(self) -> dict:
        """{"records": n, kind: number of findings, ...} for every kind (run.json stores this)."""
        counts = {k: 0 for k in KINDS}
        for f in self.findings:
            counts[f.kind] += 1
        return {"records": self.records, **counts}

    def lines(self, limit: int = 5) -> list[str]:
        """The report: a count per kind, then up to `limit` findings of each."""
        out = []
        for kind, n in self.summary().items():
            if kind == "records":
                continue
            out.append(f"{kind.replace('_', ' ')}: {n}")
            shown = [f for f in self.findings if f.kind == kind][:limit]
            out += [f"  {', '.join(f.where[:4])}{' ...' if len(f.where) > 4 else ''}: {f.detail}" for f in shown]
            if n > len(shown):
                out.append(f"  ... and {n - len(shown)} more")
        return out


@dataclass
class _Item:
    where: str
    key: str  # the record's JSON, for exact duplicates
    prompt: str | None  # None: a format without a prompt (text)
    response: str
    text: str  # prompt and response: what near-duplicates compare
    roles: list[str] | None  # the chat problems, None for other formats


def _str(v) -> str:
    return v if isinstance(v, str) else "" if v is None else json.dumps(v, ensure_ascii=False)


def _item(r: Record, fmt: str) -> _Item:
    d = r.data
    f = fmt if fmt != "auto" else detect_format(r)
    key = json.dumps(d, sort_keys=True, ensure_ascii=False)
    roles = None
    if f == "text":
        prompt, response = None, _str(d.get("text"))
    elif f == "alpaca":
        prompt, response = _str(d.get("instruction")) + "\n" + _str(d.get("input")), _str(d.get("output"))
    elif f == "prompt_completion":
        prompt, response = _str(d.get("prompt")), _str(d.get("completion"))
    else:
        msgs = d.get("messages")
        roles = role_problems(msgs)
        ok = [m for m in msgs if isinstance(m, dict)] if isinstance(msgs, list) else []
        last = max((i for i, m in enumerate(ok) if m.get("role") == "assistant"), default=None)
        turn = lambda m: f"{_str(m.get('role'))}: {_str(m.get('content'))}"
        prompt = "\n".join(turn(m) for m in (ok[:last] if last is not None else ok))
        response = _str(ok[last].get("content")) if last is not None else ""
    return _Item(r.where, key, prompt, response, ((prompt or "") + "\n" + response).strip(), roles)


def role_problems(msgs) -> list[str]:
    """What is wrong with a chat record's role sequence: system only first, user and assistant alternate,
    a tool message follows an assistant or tool message, and the last message is the assistant's."""
    if not isinstance(msgs, list) or not msgs:
        return ["'messages' is not a non-empty list"]
    roles = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            return [f"messages[{i}] has no role"]
        roles.append(m["role"])
    out = []
    for i, role in enumerate(roles):
        prev = roles[i - 1] if i else None
        if role not in ROLES:
            out.append(f"messages[{i}]: unknown role {role!r} (known: {', '.join(ROLES)})")
        elif role == "system" and i:
            out.append(f"messages[{i}]: a system message after the first message")
        elif role == prev and role in ("user", "assistant"):
            out.append(f"messages[{i}]: two {role} messages in a row")
        elif role == "tool" and prev not in ("assistant", "tool"):
            out.append(f"messages[{i}]: a tool message that does not follow an assistant message")
        elif role == "assistant" and prev in (None, "system"):
            out.append(f"messages[{i}]: the assistant speaks first")
    if roles[-1] != "assistant":
        out.append(f"ends with a {roles[-1]} message, which nothing answers")
    return out


def _groups(items: list[_Item]) -> list[list[int]]:
    """Indices of records with identical JSON, one list per distinct record, in file order."""
    by = defaultdict(list)
    for i, it in enumerate(items):
        by[it.key].append(i)
    return list(by.values())


def analyse(records: list[Record], fmt: str = "auto", val_records: list[Record] | None = None,
            threshold: float = NEAR_THRESHOLD, min_response_words: int = MIN_RESPONSE_WORDS,
            shingle: int = SHINGLE, hasher: MinHasher | None = None) -> QualityReport:
    """Every finding of KINDS in `records` (and `val_records`, whose overlap with `records` is reported).

    Raises DataError on a record whose format cannot be told (as training would).
    """
    val_records = val_records or []
    items = [_item(r, fmt) for r in [*records, *val_records]]
    n_train = len(records)
    rep = QualityReport(len(items))
    add = lambda kind, where, detail: rep.findings.append(Finding(kind, where, detail))
    groups = _groups(items)
    for g in groups:
        tr, va = [i for i in g if i < n_train], [i for i in g if i >= n_train]
        for part in (tr, va):
            if len(part) > 1:
                add("exact_duplicate", [items[i].where for i in part], f"{len(part)} identical records")
        if tr and va:
            add("train_val_overlap", [items[tr[0]].where, items[va[0]].where], "identical records")
    reps = [g[0] for g in groups]  # exact copies are not near-duplicates again
    sets = [shingles(items[i].text, shingle) for i in reps]
    for x, y, j in near_pairs(sets, threshold, hasher):
        a, b = sorted((reps[x], reps[y]))
        kind = "train_val_overlap" if (a < n_train) != (b < n_train) else "near_duplicate"
        add(kind, [items[a].where, items[b].where], f"Jaccard {j:.2f} of {shingle}-word shingles")
    for it in items:
        n = len(words(it.response))
        if n < min_response_words:
            add("short_response", [it.where], "empty response" if n == 0 else f"{n} word(s): {it.response[:40]!r}")
    _conflicts(items, add)
    _outliers(items, add)
    for it in items:
        for p in it.roles or []:
            add("role_sequence", [it.where], p)
    return rep


def _conflicts(items: list[_Item], add) -> None:
    """One finding per prompt (compared by its word tokens) that has more than one distinct response."""
    by = defaultdict(dict)
    for it in items:
        if it.prompt is not None and words(it.prompt):
            by[" ".join(words(it.prompt))].setdefault(" ".join(words(it.response)), it.where)
    for prompt, responses in by.items():
        if len(responses) > 1:
            add("conflicting_responses", list(responses.values()),
                f"{len(responses)} different responses to {prompt[:50]!r}")


def _outliers(items: list[_Item], add) -> None:
    """Records whose word count lies outside Tukey's far-out fences (OUTLIER_K IQRs) on log(1 + words), and
    at least a factor OUTLIER_MIN_RATIO beyond the quartiles (so that uniform data flags nothing)."""
    if len(items) < 8:  # quartiles of a handful of records say nothing
        return
    logs = np.log1p([len(words(it.text)) for it in items])
    q1, q3 = np.percentile(logs, [25, 75])
    reach = max(OUTLIER_K * (q3 - q1), math.log(OUTLIER_MIN_RATIO))
    lo, hi = q1 - reach, q3 + reach
    for it, v in zip(items, logs):
        if v < lo or v > hi:
            add("length_outlier", [it.where], f"{round(math.expm1(v))} words (typical {round(math.expm1(q1))}-"
                                              f"{round(math.expm1(q3))})")


def dedup(records: list[Record], fmt: str = "auto", against: list[Record] | None = None,
          threshold: float = NEAR_THRESHOLD, shingle: int = SHINGLE, hasher: MinHasher | None = None
          ) -> tuple[list[Record], dict]:
    """(kept records, {"exact", "near", "val_overlap"}: how many were dropped for each reason).

    A record is dropped when it is an exact copy of an earlier one, a near-duplicate of an earlier one
    (even an earlier one dropped itself: A ~ B ~ C drops B and C), or a copy or near-duplicate of a
    record of `against` (the validation data, which is never changed). The order is kept.
    """
    against = against or []
    items = [_item(r, fmt) for r in [*against, *records]]
    off = len(against)
    drop: dict[int, str] = {}
    groups = _groups(items)
    for g in groups:
        for i in g[1:]:
            if i >= off:
                drop[i] = "val_overlap" if g[0] < off else "exact"
    reps = [g[0] for g in groups]
    sets = [shingles(items[i].text, shingle) for i in reps]
    for x, y, _ in near_pairs(sets, threshold, hasher):
        a, b = sorted((reps[x], reps[y]))
        if b >= off and b not in drop:
            drop[b] = "val_overlap" if a < off else "near"
    counts = {k: sum(1 for v in drop.values() if v == k) for k in ("exact", "near", "val_overlap")}
    return [r for i, r in enumerate(records) if i + off not in drop], counts
