"""Generate the bundled extraction dataset: synthetic support tickets whose answer lists their entities as JSON,
the format the `entity_f1` metric reads (tasks/metrics/entity_f1): `[{"type": "ORDER_ID", "text": "A-1042"}, ...]`
in order of appearance, `[]` for a ticket without any.

Types: ORDER_ID, PRODUCT, AMOUNT, DATE, EMAIL. Tickets are composed from templates with slots, some naming an
entity twice (the answer then lists it twice: entity_f1 counts per row as multisets) and some naming none.
Every prompt is unique across the splits (the data stage refuses test prompts seen in training). Deterministic:
the same seed gives byte-identical files.

    python tests/data/make_extraction_dataset.py            # writes tests/data/extraction/{train,validation,test}.jsonl
    python tests/data/make_extraction_dataset.py --check    # exit 1 if the committed files differ from a regeneration
"""

from __future__ import annotations

import argparse
import filecmp
import json
import random
import sys
import tempfile
from pathlib import Path
from typing import Any

OUT = Path(__file__).resolve().parent / "extraction"
SPLITS = {"train": 64, "validation": 16, "test": 16}
SYSTEM = ('Extract the entities of the ticket as a JSON list of {"type", "text"} objects in order of appearance; '
          "types: ORDER_ID, PRODUCT, AMOUNT, DATE, EMAIL. Answer [] when there are none.")  # fmt: skip
PRODUCTS = ("Nimbus router", "Vega laptop", "Orbit smartwatch", "Flux charger", "Nova camera", "Terra backpack")
MONTHS = ("March", "April", "May", "June", "July", "August")
NAMES = ("ana", "li.wei", "sam.k", "jo", "m.rossi", "priya")
DOMAINS = ("example.com", "mail.test", "shop.example")
OPENERS = ("Hi,", "Hello team,", "Good morning.", "Hi support,", "Hey,", "")
CLOSERS = ("Thanks.", "Please help.", "Regards, Sam", "Any update?", "Cheers, Jo", "")
# {slot:TYPE}; a slot named twice in one template is the same value (listed twice in the answer).
TEMPLATES = (
    "Order {o:ORDER_ID} with the {p:PRODUCT} has not arrived yet.",
    "I was charged {a:AMOUNT} twice for order {o:ORDER_ID}.",
    "The {p:PRODUCT} I bought on {d:DATE} stopped charging.",
    "Please send the invoice for {o:ORDER_ID} to {e:EMAIL}.",
    "My {p:PRODUCT} was delivered on {d:DATE} but the box was empty.",
    "Refund {a:AMOUNT} for order {o:ORDER_ID}, the {p:PRODUCT} was broken.",
    "Order {o:ORDER_ID} again: order {o:ORDER_ID} still shows as pending.",
    "How do I reset my password? I tried twice.",
    "Can you change my contact address to {e:EMAIL}?",
    "I paid {a:AMOUNT} on {d:DATE} and nothing happened.",
    "Thanks, everything works now.",
    "The {p:PRODUCT} and the {q:PRODUCT} from order {o:ORDER_ID} are both faulty.",
)


def _value(kind: str, rng: random.Random) -> str:
    if kind == "ORDER_ID":
        return f"{rng.choice('ABCK')}-{rng.randint(1000, 9999)}"
    if kind == "PRODUCT":
        return rng.choice(PRODUCTS)
    if kind == "AMOUNT":
        return f"${rng.randint(5, 480)}.{rng.randint(0, 99):02d}"
    if kind == "DATE":
        return f"{rng.randint(1, 28)} {rng.choice(MONTHS)}"
    return f"{rng.choice(NAMES)}@{rng.choice(DOMAINS)}"


def _row(template: str, rng: random.Random) -> dict[str, Any]:
    values: dict[str, str] = {}
    text, entities, rest = "", [], template
    while "{" in rest:
        before, _, after = rest.partition("{")
        slot, _, rest = after.partition("}")
        name, _, kind = slot.partition(":")
        if name not in values:
            values[name] = _value(kind, rng)
        text += before + values[name]
        entities.append({"type": kind, "text": values[name]})
    text = " ".join(filter(None, (rng.choice(OPENERS), text + rest, rng.choice(CLOSERS))))
    return {"messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": text},
                         {"role": "assistant", "content": json.dumps(entities)}]}  # fmt: skip


def write(folder: Path, seed: int = 7) -> None:
    """Write the three splits into `folder`; every template appears in every split (each split cycles them)."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    seen: set[str] = set()
    for split, count in SPLITS.items():
        rows = []
        for i in range(count):
            row = _row(TEMPLATES[i % len(TEMPLATES)], rng)
            while row["messages"][1]["content"] in seen:
                row = _row(TEMPLATES[i % len(TEMPLATES)], rng)
            seen.add(row["messages"][1]["content"])
            rows.append(row)
        rng.shuffle(rows)
        with (folder / f"{split}.jsonl").open("w") as out:
            out.writelines(json.dumps(r) + "\n" for r in rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare a regeneration with the committed files")
    if not parser.parse_args().check:
        write(OUT)
        print(f"wrote {', '.join(SPLITS)} to {OUT}")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        write(Path(tmp))
        differ = [s for s in SPLITS if not filecmp.cmp(Path(tmp) / f"{s}.jsonl", OUT / f"{s}.jsonl", shallow=False)]
    if differ:
        print(f"{OUT}: {', '.join(differ)} differ from a regeneration; run {Path(__file__).name} and commit them")
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
