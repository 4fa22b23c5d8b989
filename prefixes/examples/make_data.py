"""Generate the example tasks' data (deterministic: templates x word lists, a fixed seed, no downloads).

Writes <task>/train.jsonl and <task>/eval.jsonl next to this file, one {"prompt", "completion"} per line.
The held-out examples use words the training examples never contain (other adjectives, other names),
so the held-out score measures what the prefix taught, not what it memorized.

    python prefixes/examples/make_data.py
"""

from __future__ import annotations

import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent
SEED = 1234
NUM_TRAIN, NUM_EVAL = 320, 50

# ---- sentiment: a short review -> exactly "positive" or "negative" ----
SUBJECTS = [
    "the food", "the service", "the room", "the staff", "the movie", "the plot", "this phone",
    "the battery", "the coffee", "the hotel", "the concert", "this book", "the delivery", "the app",
    "the pizza", "the seats", "the museum", "the soup", "the headphones", "the tour guide",
]  # fmt: skip
POSITIVE = {
    "train": ["great", "delicious", "friendly", "wonderful", "excellent", "lovely", "amazing",
              "comfortable", "fresh", "helpful", "beautiful", "perfect", "brilliant", "enjoyable"],
    "eval": ["superb", "fantastic", "charming", "outstanding", "pleasant", "delightful"],
}  # fmt: skip
NEGATIVE = {
    "train": ["terrible", "bland", "rude", "awful", "disappointing", "dirty", "noisy", "overpriced",
              "boring", "broken", "slow", "stale", "useless", "horrible"],
    "eval": ["dreadful", "mediocre", "unpleasant", "filthy", "sloppy", "lousy"],
}  # fmt: skip
REVIEW_TEMPLATES = [
    "{S} was {a}.",
    "{S} was {a} and {b}.",
    "I thought {s} was really {a}.",
    "Honestly, {s} was {a}.",
    "We went last week and {s} was {a}.",
    "{S} is {a}, and {s2} was {b} too.",
    "What a {a} experience: {s} was {b}.",
]


def sentiment_example(rng: random.Random, split: str) -> dict:
    label = rng.choice(["positive", "negative"])
    words = (POSITIVE if label == "positive" else NEGATIVE)[split]
    a, b = rng.sample(words, 2)
    s, s2 = rng.sample(SUBJECTS, 2)
    text = rng.choice(REVIEW_TEMPLATES).format(S=s[0].upper() + s[1:], s=s, s2=s2, a=a, b=b)
    return {"prompt": f"Review: {text}\nSentiment:", "completion": f" {label}"}


# ---- booking: a table request in free text -> one line of JSON with fixed keys and key order ----
NAMES = {
    "train": ["Alice", "Bob", "Carlos", "Dana", "Emma", "Farid", "Grace", "Hiro", "Ines", "Jonas",
              "Kofi", "Lena", "Marta", "Nadia", "Oscar", "Priya", "Quentin", "Rosa", "Sven", "Tara"],
    "eval": ["Uma", "Victor", "Wendy", "Yusuf", "Zoe", "Mateo", "Chloe", "Ravi"],
}  # fmt: skip
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
TIMES = ["12 pm", "1 pm", "6 pm", "6:30 pm", "7 pm", "7:30 pm", "8 pm", "8:15 pm", "9 pm"]
BOOKING_TEMPLATES = [
    "Table for {n} on {day} at {time}, name {name}.",
    "Hi, this is {name}. Can I book a table for {n} people on {day} at {time}?",
    "{name} here, we are {n} and would like to come on {day} at {time}.",
    "Please reserve {day} at {time} for {n} guests under the name {name}.",
    "Could you book us in for {time} on {day}? {n} people, the name is {name}.",
]


def booking_example(rng: random.Random, split: str) -> dict:
    name, n = rng.choice(NAMES[split]), rng.randint(1, 12)
    day, time = rng.choice(DAYS), rng.choice(TIMES)
    text = rng.choice(BOOKING_TEMPLATES).format(name=name, n=n, day=day, time=time)
    record = {"name": name, "guests": n, "day": day, "time": time}
    return {"prompt": f"Request: {text}\nJSON:", "completion": " " + json.dumps(record)}


TASKS = {"sentiment": sentiment_example, "booking": booking_example}


def write(task: str, make) -> None:
    """Draw distinct examples per split (train and held-out never share a prompt) and write them."""
    rng = random.Random(f"{SEED}-{task}")
    folder = HERE / task
    folder.mkdir(exist_ok=True)
    seen: set[str] = set()
    for split, count in (("train", NUM_TRAIN), ("eval", NUM_EVAL)):
        rows: list[dict] = []
        while len(rows) < count:
            row = make(rng, split)
            if row["prompt"] not in seen:
                seen.add(row["prompt"])
                rows.append(row)
        lines = "".join(json.dumps(row) + "\n" for row in rows)
        (folder / f"{split}.jsonl").write_text(lines, encoding="utf-8")
        print(f"wrote {folder.relative_to(HERE.parent.parent)}/{split}.jsonl ({count} examples)")


if __name__ == "__main__":
    for task, make in TASKS.items():
        write(task, make)
