"""What the load generator sends: length distributions, Zipf task popularity, Poisson arrivals, prompts.

Pure Python, seeded: the same seed gives the same requests, so two server configurations can be driven
with identical traffic. The i-th request's content (task, prompt, output length) does not depend on the
rate, only its arrival time does.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

# Common English words: with SmolLM2's tokenizer each is about one token (with its leading space).
_WORD_TEXT = """
    the of and to in is it you that he was for on are with as his they be at one have this from or had
    by hot word but what some we can out other were all there when up use your how said an each she which
    do their time if will way about many then them write would like so these her long make thing see him
    two has look more day could go come did number sound no most people my over know water than call first
    who may down side been now find any new work part take get place made live where after back little
    only round man year came show every good me give our under name very through just form sentence great
    think say help low line differ turn cause much mean before move right boy old too same tell does set
    three want air well also play small end put home read hand port large spell add even land here must
    big high such follow act why ask men change went light kind off need house picture try us again animal
    point mother world near build self earth father head stand own page should country found answer school
    grow study still learn plant cover food sun four between state keep eye never last let thought city
    tree cross farm hard start might story saw far sea draw left late run while press close night real life
    few north open seem together next white children begin got walk example ease paper group always music
    those both mark often letter until mile river car feet care second book carry took science eat room
    friend began idea fish mountain stop once base hear horse cut sure watch color face wood main enough
    plain girl usual young ready above ever red list though feel talk bird soon body dog family direct
"""
WORDS = tuple(_WORD_TEXT.split())

# Prose for fixed-length token slices (benchmarks: prefixes of exactly 16 tokens, prompts of exactly 30).
TEXT = (
    "Prefix tuning keeps the base model frozen and learns a few virtual tokens of keys and values for every "
    "layer. A server that holds one base model can then serve many tasks at once, each request bringing its "
    "own prefix, and batch requests of different tasks together in one forward pass per decoding step."
)

STYLES = (
    "Answer in one short sentence.",
    "Answer like a pirate would.",
    "Answer formally and precisely.",
    "Answer with a list of short points.",
    "Answer as a patient teacher would.",
    "Answer cheerfully, with enthusiasm.",
    "Answer like a weather forecaster.",
    "Answer as briefly as possible.",
)

_KINDS = "const:N, uniform:LO:HI, lognormal:MEAN:SIGMA[:MIN:MAX] or choice:A,B,..."


@dataclass(frozen=True)
class LengthDist:
    """A distribution of positive integer lengths (words of prompt, or new tokens); see `parse_dist`."""

    spec: str
    kind: str
    values: tuple[float, ...]
    lo: int = 1
    hi: int | None = None

    def sample(self, rng: random.Random) -> int:
        if self.kind == "const":
            return int(self.values[0])
        if self.kind == "uniform":
            return rng.randint(int(self.values[0]), int(self.values[1]))
        if self.kind == "choice":
            return int(rng.choice(self.values))
        mean, sigma = self.values  # lognormal, parametrized by its mean: mu = ln(mean) - sigma^2 / 2
        n = round(rng.lognormvariate(math.log(mean) - sigma * sigma / 2, sigma))
        return max(self.lo, n if self.hi is None else min(self.hi, n))


def _number(spec: str, text: str, cast: type) -> float:
    try:
        return cast(text)
    except ValueError:
        kind = "an integer" if cast is int else "a number"
        raise ValueError(f"length distribution {spec!r}: expected {kind}, got {text!r}") from None


def parse_dist(spec: str) -> LengthDist:
    """`const:32`, `uniform:4:128` (inclusive), `lognormal:MEAN:SIGMA[:MIN:MAX]`, `choice:4,16,128`.

    Raises ValueError saying what was expected and what arrived.
    """
    kind, _, rest = spec.strip().partition(":")
    parts = rest.split(":") if rest else []
    if kind == "const":
        if len(parts) != 1:
            raise ValueError(f"length distribution {spec!r}: expected const:N, got {len(parts)} value(s)")
        n = int(_number(spec, parts[0], int))
        if n < 1:
            raise ValueError(f"length distribution {spec!r}: N must be >= 1, got {n}")
        return LengthDist(spec, kind, (n,))
    if kind == "uniform":
        if len(parts) != 2:
            raise ValueError(
                f"length distribution {spec!r}: expected uniform:LO:HI, got {len(parts)} value(s)"
            )
        lo, hi = (int(_number(spec, p, int)) for p in parts)
        if not 1 <= lo <= hi:
            raise ValueError(f"length distribution {spec!r}: expected 1 <= LO <= HI, got LO={lo} HI={hi}")
        return LengthDist(spec, kind, (lo, hi))
    if kind == "choice":
        items = [p for p in rest.split(",") if p.strip()]
        if not items:
            raise ValueError(f"length distribution {spec!r}: expected choice:A,B,..., got no values")
        values = tuple(int(_number(spec, p.strip(), int)) for p in items)
        if min(values) < 1:
            raise ValueError(f"length distribution {spec!r}: every value must be >= 1, got {min(values)}")
        return LengthDist(spec, kind, values)
    if kind == "lognormal":
        if len(parts) not in (2, 4):
            raise ValueError(
                f"length distribution {spec!r}: expected lognormal:MEAN:SIGMA or lognormal:MEAN:SIGMA:MIN:MAX, "
                f"got {len(parts)} value(s)"
            )
        mean, sigma = (_number(spec, p, float) for p in parts[:2])
        if not (mean > 0 and sigma >= 0 and math.isfinite(mean) and math.isfinite(sigma)):
            raise ValueError(
                f"length distribution {spec!r}: expected MEAN > 0 and SIGMA >= 0, got {mean} and {sigma}"
            )
        lo, hi = (int(_number(spec, p, int)) for p in parts[2:]) if len(parts) == 4 else (1, None)
        if lo < 1 or (hi is not None and hi < lo):
            raise ValueError(f"length distribution {spec!r}: expected 1 <= MIN <= MAX, got MIN={lo} MAX={hi}")
        return LengthDist(spec, kind, (mean, sigma), lo, hi)
    raise ValueError(f"unknown length distribution {spec!r}: expected {_KINDS}")


def zipf_weights(num_tasks: int, s: float) -> list[float]:
    """Popularity of tasks 1..n as in S-LoRA's workloads: weight of task k ~ 1 / k^s, normalized to sum 1."""
    if num_tasks < 1:
        raise ValueError(f"Zipf weights need at least 1 task, got {num_tasks}")
    if not s >= 0:
        raise ValueError(f"Zipf exponent must be >= 0, got {s}")
    raw = [1.0 / k**s for k in range(1, num_tasks + 1)]
    total = sum(raw)
    return [w / total for w in raw]


def poisson_offsets(
    rate: float, rng: random.Random, *, duration_s: float | None = None, count: int | None = None
) -> list[float]:
    """Arrival times (seconds from the start) of a Poisson process at `rate` per second.

    Either all arrivals before `duration_s`, or exactly `count` arrivals.
    """
    if not rate > 0:
        raise ValueError(f"rate must be > 0 requests/s, got {rate}")
    if (duration_s is None) == (count is None):
        raise ValueError("give exactly one of duration_s and count")
    offsets: list[float] = []
    t = rng.expovariate(rate)
    while (count is not None and len(offsets) < count) or (duration_s is not None and t < duration_s):
        offsets.append(t)
        t += rng.expovariate(rate)
    return offsets


def task_ids(num_tasks: int, task_prefix: str = "lt") -> list[str]:
    return [f"{task_prefix}-{i}" for i in range(num_tasks)]


def instruction_text(index: int) -> str:
    """A distinct, short instruction for task `index`: its prefix is this text's K/V."""
    return f"You are assistant number {index}. {STYLES[index % len(STYLES)]}"


def make_prompt(rng: random.Random, num_words: int) -> str:
    words = [rng.choice(WORDS) for _ in range(num_words)]
    return " ".join(words).capitalize() + "."


@dataclass(frozen=True)
class PlannedRequest:
    index: int
    offset_s: float  # when to send, seconds after the run starts
    task_id: str | None  # None: the base model
    prompt: str
    prompt_words: int
    max_new_tokens: int
    seed: int


def make_plan(
    *,
    rate: float,
    seed: int,
    tasks: list[str],
    zipf_s: float,
    prompt_len: LengthDist,
    output_len: LengthDist,
    duration_s: float | None = None,
    count: int | None = None,
) -> list[PlannedRequest]:
    """The requests of one run: Poisson arrival times at `rate`, content drawn independently of the rate."""
    offsets = poisson_offsets(
        rate, random.Random(f"arrivals/{seed}/{rate}"), duration_s=duration_s, count=count
    )
    content = random.Random(seed)
    weights = zipf_weights(len(tasks), zipf_s) if tasks else []
    plan = []
    for i, offset in enumerate(offsets):
        task = content.choices(tasks, weights)[0] if tasks else None
        num_words = prompt_len.sample(content)
        plan.append(
            PlannedRequest(
                index=i,
                offset_s=offset,
                task_id=task,
                prompt=make_prompt(content, num_words),
                prompt_words=num_words,
                max_new_tokens=output_len.sample(content),
                seed=content.randrange(2**31),
            )
        )
    return plan
