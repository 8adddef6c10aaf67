"""Checking generated answers against held-out references: the generation metric of `compare`.

A held-out prompt whose reference is a short answer (a label, a number, a name) can be checked: the model's greedy
continuation is right when it gives that answer. `exact`: the first line of the generation equals the reference
(surrounding whitespace aside). `normalized` (the default): both are normalised (Unicode NFKC, case folded,
punctuation and articles dropped, whitespace collapsed) and the generation's normalised text equals the
reference's or starts with it followed by a word boundary, so "Paris." and "paris, the capital" both match
"Paris". A user's own rule is named as `module:function` (a function of (generation, reference) -> bool) in the
config: the user's code, imported by name, never anything read from data.
"""
from __future__ import annotations

import importlib
import re
import string
import unicodedata
from typing import Callable

from sftcurate.data_contracts import UserError

CHECKS = ("normalized", "exact")
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans({c: " " for c in string.punctuation})


def normalize(text: str) -> str:
    text = unicodedata.normalize("NFKC", text).casefold().translate(_PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(generation: str, reference: str) -> bool:
    lines = generation.strip().splitlines()
    return bool(lines) and lines[0].strip() == reference.strip()


def normalized_match(generation: str, reference: str) -> bool:
    gen, ref = normalize(generation), normalize(reference)
    if not ref:
        return False
    return gen == ref or gen.startswith(ref + " ")


def answer_check(spec: str) -> Callable[[str, str], bool]:
    """The check a config names: `normalized`, `exact` or `module:function`."""
    if spec == "normalized":
        return normalized_match
    if spec == "exact":
        return exact_match
    module, sep, name = spec.partition(":")
    if not sep or not module or not name:
        raise UserError(f"generation.check: '{spec}' is neither {' nor '.join(CHECKS)} nor 'module:function'")
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as exc:
        raise UserError(f"generation.check: cannot load '{spec}' ({exc}); check the module is importable") from None
    if not callable(fn):
        raise UserError(f"generation.check: '{spec}' is not a function")
    return fn
