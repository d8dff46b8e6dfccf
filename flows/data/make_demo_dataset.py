"""Generate the bundled demo dataset: support tickets routed into 8 categories (answer = the category word).

The base SmolLM2-135M-Instruct does this badly (it chats instead of answering with one word, and mixes up
categories); a LoRA learns it in minutes on CPU. Tickets are composed from per-category issue templates with
slots (products, order numbers, amounts, dates, devices) plus shared openers and closers, so the category
follows from the content rather than from one fixed keyword. Deterministic: the same seed gives byte-identical
files.

    python flows/data/make_demo_dataset.py            # writes flows/data/tickets/{train,validation,test}.jsonl
    python flows/data/make_demo_dataset.py --check    # exit 1 if the committed files differ from a regeneration
"""

from __future__ import annotations

import argparse
import filecmp
import json
import random
import sys
import tempfile
from pathlib import Path

CATEGORIES = ("billing", "technical", "account", "shipping", "returns", "sales", "security", "feedback")
SYSTEM = "You route customer support tickets. Categories: " + ", ".join(CATEGORIES) + ". Answer with the category only."
PRODUCTS = ("Aero X2 headphones", "Nimbus router", "PixelPad tablet", "Orbit smartwatch", "Vega laptop",
            "Lumen desk lamp", "Echo mini speaker", "Terra backpack", "Flux charger", "Nova camera")  # fmt: skip
DEVICES = ("iPhone", "Android phone", "Windows PC", "MacBook", "Chromebook", "iPad")
MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September", "October")
OPENERS = ("Hi,", "Hello team,", "Hey there.", "Good morning,", "Hi support,", "", "", "Dear customer service,")
CLOSERS = ("Thanks.", "Please help.", "Thank you in advance!", "Can you look into it?", "", "", "Regards, Sam",
           "Any update would be great.")  # fmt: skip

ISSUES: dict[str, tuple[str, ...]] = {
    "billing": (
        "I was charged {amount} twice for order {order}.",
        "My invoice for {month} shows {amount} but my plan costs less.",
        "the card ending in {digits} was billed after I cancelled my subscription",
        "Why did my monthly payment go up to {amount} without notice?",
        "I need a corrected invoice with our company VAT number for {month}.",
        "there is a pending charge of {amount} I do not recognise on my statement",
        "The promo code was accepted but the total still shows {amount}.",
        "can you refund the late fee added to my {month} bill?",
    ),
    "technical": (
        "The {product} keeps disconnecting from my {device} every few minutes.",
        "the app crashes as soon as I open settings on my {device}",
        "My {product} will not turn on after the latest firmware update.",
        "Bluetooth pairing with the {product} fails with error code {code}.",
        "The sync between my {device} and the {product} stopped working yesterday.",
        "screen flickers on the {product} when brightness is below half",
        "I get a blank page when I try to install the driver on my {device}.",
        "the {product} overheats and shuts down after about {minutes} minutes",
    ),
    "account": (
        "I cannot log in, the reset email never arrives at my address.",
        "please change the email on my profile to my work address",
        "How do I merge my two profiles? I signed up twice by mistake.",
        "I want to delete my account and all my data.",
        "My username shows the wrong name after I got married, how can I update it?",
        "i can't find where to change my password in the new app on my {device}",
        "Please add my colleague as a second user on our team plan.",
        "The verification code for my profile expired before I could enter it.",
    ),
    "shipping": (
        "Order {order} still shows in transit after {days} days.",
        "the tracking number for my {product} does not work on the courier site",
        "Can I change the delivery address for order {order}? I moved last week.",
        "My parcel was marked delivered but nothing arrived at my door.",
        "When will the {product} be dispatched? The page said 2 days.",
        "the courier left my package with a neighbour i do not know",
        "Do you deliver to Norway? I need the {product} by {month}.",
        "Order {order} arrived with only one of the two boxes.",
    ),
    "returns": (
        "I would like to return the {product}, it does not fit my needs.",
        "how do I get a return label for order {order}?",
        "The {product} arrived damaged, I want to send it back for a replacement.",
        "I sent back the {product} {days} days ago, when will the return be processed?",
        "Can I exchange the {product} for a different colour?",
        "the return window says closed but I received order {order} only last week",
        "I returned two items but only one shows as received.",
        "Is the {product} eligible for return if I opened the box?",
    ),
    "sales": (
        "Do you offer volume discounts if we buy {quantity} units of the {product}?",
        "i'd like a quote for {quantity} {product}s for our office",
        "Is there an education price for the {product}?",
        "What is the difference between the {product} and the newer model?",
        "Can I pre-order the next version of the {product}?",
        "We are a reseller and want to discuss a partnership for the {product}.",
        "does the business plan include priority support, and what does it cost for {quantity} seats?",
        "Will the {product} go on sale in {month}?",
    ),
    "security": (
        "I got an email asking for my password that looks like it came from you, is it phishing?",
        "someone logged into my profile from another country at {time}",
        "There are orders on my account that I did not place, I think I was hacked.",
        "How do I turn on two-factor authentication on my {device}?",
        "I found a vulnerability in your login page and want to report it responsibly.",
        "my saved card was used for a purchase of {amount} i never made",
        "Please lock my account, my {device} was stolen this morning.",
        "I received a login alert at {time} but it wasn't me.",
    ),
    "feedback": (
        "Just wanted to say the {product} is great, the battery lasts forever.",
        "the new app design is confusing, the old menu was much easier",
        "Your agent Maria was really helpful yesterday, please pass on my thanks.",
        "It would be nice if the {product} came in more colours.",
        "I love the {product} but the manual could be clearer.",
        "suggestion: let us schedule deliveries for evenings",
        "The checkout is too slow on my {device}, please improve it.",
        "Great service overall, I will recommend you to friends.",
    ),
}


def _fill(template: str, rng: random.Random) -> str:
    values = {
        "amount": f"${rng.randint(5, 480)}.{rng.randint(0, 99):02d}",
        "order": f"#{rng.randint(100000, 999999)}",
        "month": rng.choice(MONTHS),
        "digits": f"{rng.randint(0, 9999):04d}",
        "product": rng.choice(PRODUCTS),
        "device": rng.choice(DEVICES),
        "code": f"E{rng.randint(100, 999)}",
        "minutes": str(rng.randint(5, 40)),
        "days": str(rng.randint(4, 21)),
        "quantity": str(rng.choice((20, 50, 120, 300, 1000))),
        "time": f"{rng.randint(0, 23):02d}:{rng.randint(0, 59):02d}",
    }
    return template.format(**values)


def _ticket(category: str, rng: random.Random) -> str:
    issue = _fill(rng.choice(ISSUES[category]), rng)
    issue = issue[0].upper() + issue[1:] if rng.random() < 0.8 else issue
    if not issue.endswith((".", "?", "!")):
        issue += rng.choice((".", "", "!"))
    parts = [rng.choice(OPENERS), issue, rng.choice(CLOSERS)]
    text = " ".join(p for p in parts if p)
    return text.lower() if rng.random() < 0.1 else text


def generate(seed: int, sizes: dict[str, int]) -> dict[str, list[dict]]:
    """Balanced splits of unique tickets; the same seed and sizes always give the same rows."""
    rng = random.Random(seed)
    seen: set[str] = set()
    splits: dict[str, list[dict]] = {}
    for split, size in sizes.items():
        rows = []
        for index in range(size):
            category = CATEGORIES[index % len(CATEGORIES)]
            for _ in range(1000):
                text = _ticket(category, rng)
                if text not in seen:
                    break
            else:
                raise RuntimeError(f"could not make a new unique {category} ticket; lower the sizes")
            seen.add(text)
            rows.append({"messages": [
                {"role": "system", "content": SYSTEM},
                {"role": "user", "content": text},
                {"role": "assistant", "content": category},
            ]})  # fmt: skip
        rng.shuffle(rows)
        splits[split] = rows
    return splits


def write(splits: dict[str, list[dict]], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for split, rows in splits.items():
        with (out / f"{split}.jsonl").open("w", encoding="utf-8") as handle:
            for row in rows:
                handle.write(json.dumps(row, ensure_ascii=False) + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "tickets")
    parser.add_argument("--train", type=int, default=480)
    parser.add_argument("--validation", type=int, default=64)
    parser.add_argument("--test", type=int, default=80)
    parser.add_argument("--check", action="store_true", help="verify the files in --out match a regeneration")
    args = parser.parse_args()
    splits = generate(args.seed, {"train": args.train, "validation": args.validation, "test": args.test})
    if not args.check:
        write(splits, args.out)
        print(f"wrote {', '.join(f'{k}: {len(v)}' for k, v in splits.items())} rows to {args.out}")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        write(splits, Path(tmp))
        differ = [
            s for s in splits if not filecmp.cmp(Path(tmp) / f"{s}.jsonl", args.out / f"{s}.jsonl", shallow=False)
        ]
    if differ:
        print(f"{', '.join(differ)} differ from a regeneration with seed {args.seed}; run without --check")
        return 1
    print("dataset matches its generator")
    return 0


if __name__ == "__main__":
    sys.exit(main())
