"""The evidence regimes of issue 23: pools built by rules registered in docs/EVIDENCE.md before their first run.

Every builder returns records in the Alpaca layout (`instruction`, `input`, `output`) with a `group`, a `split`
(train or heldout: the compare flow reads it through `source.split_field`, so the held-out set is exactly what the
rule says and never changes with a damaged record's id hash) and a `damage` kind (`clean` for an untouched
record). Held-out records are always clean originals and never appear in a training pool, in any form.

Corpora (real text that packages reachable here ship, of two kinds):
- `iso-qa`: short-answer questions over the ISO code tables that `pycountry` (PyPI) ships: country alpha-2 and
  alpha-3 codes, currency, script and language codes, and the country of every subdivision. Six groups of very
  different sizes (languages 57%, subdivisions 36%), answers a check can grade.
- `python-faq`: the Python FAQ's questions and prose answers (bench_evidence.py, Debian's python3.11-doc).

Regimes:
- `skewed`: a training pool of `pool_size` records drawn from iso-qa's natural mix (two groups >= 80% of it),
  `heldout_per_group` held-out records per group: the balanced-target loss is the headline.
- `noisy`: a corpus whose training records are damaged at `share` (30%), in equal parts, the ways real data is:
  `swapped` (another training record's answer), `cut` (the answer cut to its first 40%), `refusal` (a boilerplate
  refusal), `spam` (near-duplicate promotional text); the held-out split (by rule) clean.
- `targeted`: a target file of `n_target` records from `target_groups`; the held-out set is those groups
  (`heldout_per_group` each), the training pool everything else; the target records are in neither.
"""
from __future__ import annotations

import numpy as np

REFUSALS = ["I'm sorry, but I can't help with that request.", "As an AI language model, I cannot answer that.",
            "I am unable to provide that information.", "Sorry, I cannot assist with this.",
            "I'm not able to answer this question."]
SPAM = "Best deals of the year at shop-{n}.example! Click now for 90% off {item}. Limited offer, act fast!!!"
SPAM_ITEMS = ["watches", "sneakers", "phones", "vitamins", "loans", "crypto", "perfume", "tickets"]
DAMAGES = ("swapped", "cut", "refusal", "spam")


def record(prompt: str, answer: str, group: str, split: str = "train", damage: str = "clean") -> dict:
    return {"instruction": prompt, "input": "", "output": answer, "group": group, "split": split, "damage": damage}


def iso_qa_records() -> list[dict]:
    """One question per ISO table row, deduplicated by question (a few names repeat across subdivisions)."""
    import pycountry

    rows = []
    for c in pycountry.countries:
        rows.append(("country-alpha2", f"What is the ISO 3166-1 alpha-2 code of {c.name}?", c.alpha_2))
        rows.append(("country-alpha3", f"What is the ISO 3166-1 alpha-3 code of {c.name}?", c.alpha_3))
    rows += [("currency", f"What is the ISO 4217 code of the {c.name}?", c.alpha_3) for c in pycountry.currencies]
    rows += [("script", f"What is the ISO 15924 code of the {s.name} script?", s.alpha_4) for s in pycountry.scripts]
    rows += [("language", f"What is the ISO 639-3 code of the {lang.name} language?", lang.alpha_3)
             for lang in pycountry.languages]
    names = {c.alpha_2: c.name for c in pycountry.countries}
    rows += [("subdivision", f"In which country is {s.name} ({s.type})?", names[s.country_code])
             for s in pycountry.subdivisions if s.country_code in names]
    seen, out = set(), []
    for group, prompt, answer in rows:
        if prompt not in seen:
            seen.add(prompt)
            out.append(record(prompt, answer, group))
    return out


def _by_group(records: list[dict]) -> dict[str, list[int]]:
    groups: dict[str, list[int]] = {}
    for i, r in enumerate(records):
        groups.setdefault(r["group"], []).append(i)
    return groups


def hold_out_per_group(records: list[dict], per_group: int, rng: np.random.Generator) -> list[dict]:
    """Copies of `records` with `per_group` of each group (a seeded draw, at most half a group) marked heldout."""
    out = [dict(r, split="train", damage=r.get("damage", "clean")) for r in records]
    for members in _by_group(records).values():
        take = min(per_group, len(members) // 2)
        for i in rng.choice(members, size=take, replace=False):
            out[int(i)]["split"] = "heldout"
    return out


def skewed(records: list[dict], pool_size: int, heldout_per_group: int, seed: int = 0) -> list[dict]:
    """A balanced held-out set and a training pool of `pool_size` records drawn uniformly from the rest, so the
    pool keeps the corpus's own skew."""
    rng = np.random.default_rng(seed)
    marked = hold_out_per_group(records, heldout_per_group, rng)
    held = [r for r in marked if r["split"] == "heldout"]
    train = [r for r in marked if r["split"] == "train"]
    keep = np.sort(rng.choice(len(train), size=min(pool_size, len(train)), replace=False))
    return held + [train[i] for i in keep]


def damaged(rec: dict, kind: str, other: dict, n: int) -> dict:
    """`rec` damaged one way: `other` is another training record (for `swapped`), `n` varies the near-copies."""
    if kind == "swapped":
        return dict(rec, output=other["output"], damage=kind)
    if kind == "cut":
        answer = rec["output"]
        return dict(rec, output=answer[:max(1, int(len(answer) * 0.4))], damage=kind)
    if kind == "refusal":
        return dict(rec, output=REFUSALS[n % len(REFUSALS)], damage=kind)
    return dict(rec, output=SPAM.format(n=n % 97, item=SPAM_ITEMS[n % len(SPAM_ITEMS)]), damage=kind)


def noisy(records: list[dict], share: float = 0.3, heldout_per_group: int | None = None,
          heldout_fraction: float = 0.15, seed: int = 0) -> list[dict]:
    """The corpus with `share` of its training records damaged (equal parts of DAMAGES, seeded), held-out clean.
    The held-out split is drawn first (per group, or a fraction by a seeded draw) from the clean records."""
    rng = np.random.default_rng(seed)
    if heldout_per_group is not None:
        marked = hold_out_per_group(records, heldout_per_group, rng)
    else:
        marked = [dict(r, split="heldout" if u < heldout_fraction else "train", damage="clean")
                  for r, u in zip(records, rng.random(len(records)))]
    train = [i for i, r in enumerate(marked) if r["split"] == "train"]
    for n, pos in enumerate(rng.choice(len(train), size=int(round(share * len(train))), replace=False)):
        other = records[train[(pos + 1 + int(rng.integers(len(train) - 1))) % len(train)]]   # a clean original
        marked[train[pos]] = damaged(marked[train[pos]], DAMAGES[n % len(DAMAGES)], other, n)
    return marked


def targeted(records: list[dict], target_groups: list[str], n_target: int, heldout_per_group: int,
             seed: int = 0) -> tuple[list[dict], list[dict]]:
    """(pool records with the held-out set, target records). The target is `n_target` records of
    `target_groups` (as even as the groups allow); the held-out set `heldout_per_group` other records of each
    target group; every remaining record, of every group, is the training pool."""
    rng = np.random.default_rng(seed)
    groups = _by_group(records)
    missing = [g for g in target_groups if g not in groups]
    if missing:
        raise ValueError(f"target groups {missing} are not in the corpus ({sorted(groups)})")
    target_idx, held_idx = [], []
    for k, g in enumerate(target_groups):
        members = rng.permutation(groups[g])
        n = n_target // len(target_groups) + (1 if k < n_target % len(target_groups) else 0)
        target_idx += [int(i) for i in members[:n]]
        held_idx += [int(i) for i in members[n:n + heldout_per_group]]
    taken = set(target_idx) | set(held_idx)
    pool = [dict(records[i], split="heldout") for i in held_idx]
    pool += [dict(r, split="train") for i, r in enumerate(records) if i not in taken]
    # a target file is read with the pool's source settings, so its records carry a split the reader accepts
    target = [dict(records[i], split="train") for i in target_idx]
    return pool, target
