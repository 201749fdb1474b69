"""Profile hygiene: personal data taken out of profile text before it is encoded, exported or
sent to an LLM, and exact / near-duplicate profiles counted.

PII kinds (each replaced by a placeholder such as `[EMAIL]`): e-mail addresses, URLs, card-like
numbers (13-19 digits passing the Luhn check, not a run of years) and phone numbers (an
international `+` prefix, the 3-3-4 digit groups of North American numbers, or the 11 digits
of a Chinese mobile number, 1[3-9]...). The patterns are deliberately narrow: a street
number, a year or a price is not personal data and stays.
Near duplicates are found with MinHash LSH (the `datasketch` library) over character 5-grams,
which works the same for languages written without spaces (e.g. Chinese)."""
from __future__ import annotations

import re
import unicodedata
import zlib
from collections import Counter

import numpy as np
from datasketch import MinHash, MinHashLSH

PII_PATTERNS = {
    "email": re.compile(r"(?<![A-Za-z0-9._%+-])[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*"
                        r"\.[A-Za-z]{2,}"),
    "url": re.compile(r"(?:https?://|www\.)[^\s<>\"'，。]+[^\s<>\"'.,;:!?)，。]",
                      re.IGNORECASE),
    "card": re.compile(r"(?<![\d+])\d(?:[ -]?\d){12,18}(?!\d)"),
    "phone": re.compile(r"(?<![\d+])(?:\+\d{1,3}[ .-]?(?:\(\d{1,4}\)[ .-]?)?\d{1,4}"
                        r"(?:[ .-]?\d{2,4}){2,4}"
                        r"|(?:\(\d{3}\)\s?|\d{3}[ .-])\d{3}[ .-]\d{4}|1[3-9]\d{9})(?!\d)"),
}
MAY_HOLD_PII = re.compile(r"@|://|www\.|\d{3}", re.IGNORECASE)  # cheap test before the patterns
PLACEHOLDERS = {kind: f"[{kind.upper()}]" for kind in PII_PATTERNS}
SHINGLE = 5
NEAR_DUPLICATE_THRESHOLD = 0.9
PERMUTATIONS = 64


def _luhn_valid(digits: str) -> bool:
    numbers = [int(d) for d in reversed(digits)]
    total = sum(numbers[0::2]) + sum(sum(divmod(2 * d, 10)) for d in numbers[1::2])
    return total % 10 == 0


def _looks_like_card(text: str) -> bool:
    """Passes the Luhn check and is not a run of years ("2015 2016 2017 2018")."""
    groups = re.findall(r"\d+", text)
    if all(len(g) == 4 and 1900 <= int(g) <= 2099 for g in groups):
        return False
    return _luhn_valid("".join(groups))


def scrub_pii(text: str) -> tuple[str, Counter]:
    """`text` with each PII match replaced by its placeholder, and the count per kind."""
    found: Counter = Counter()
    if not MAY_HOLD_PII.search(text):
        return text, found

    def replace(kind: str):
        def substitute(match: re.Match) -> str:
            if kind == "card" and not _looks_like_card(match.group()):
                return match.group()
            found[kind] += 1
            return PLACEHOLDERS[kind]
        return substitute

    for kind, pattern in PII_PATTERNS.items():  # e-mail before URL, card before phone
        text = pattern.sub(replace(kind), text)
    return text, found


def normalised(text: str) -> str:
    """Case, Unicode width and whitespace folded: what makes two profiles 'the same'."""
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


def _minhash(text: str, template: MinHash) -> MinHash:
    grams = {text[i:i + SHINGLE] for i in range(max(len(text) - SHINGLE + 1, 1))}
    signature = MinHash(num_perm=PERMUTATIONS, permutations=template.permutations,
                        scheme=template.scheme, hashfunc=zlib.crc32)  # drawn once, not per text
    signature.update_batch([g.encode("utf-8") for g in grams])
    return signature


def duplicate_counts(texts: list[str | None]) -> dict:
    """Exact duplicates (after `normalised`) and near duplicates (estimated Jaccard similarity
    of character 5-grams >= 0.9) among the non-empty texts. Counts are of texts that have an
    earlier duplicate, so removing them all would leave one text of each group."""
    present = [normalised(t) for t in texts if t]
    first_of_text: dict[str, int] = {}
    for index, text in enumerate(present):
        first_of_text.setdefault(text, index)
    unique = list(first_of_text)
    lsh = MinHashLSH(threshold=NEAR_DUPLICATE_THRESHOLD, num_perm=PERMUTATIONS)
    near, template = 0, MinHash(num_perm=PERMUTATIONS, seed=1)
    for index, text in enumerate(unique):
        signature = _minhash(text, template)
        if lsh.query(signature):
            near += 1
        lsh.insert(str(index), signature)
    exact = len(present) - len(unique)
    return {"texts": len(present), "exact_duplicates": exact, "near_duplicates": near,
            "exact_groups": int(sum(1 for c in Counter(present).values() if c > 1))}


def clean_profiles(profiles: list[str | None], sources: np.ndarray) -> tuple[list, dict]:
    """Scrubbed copies of `profiles` and a report: PII found per kind and per profile source,
    profiles changed, and the duplicate counts of the original (written) texts."""
    cleaned, per_source = [], {}
    for text, source in zip(profiles, sources):
        if text is None:
            cleaned.append(None)
            continue
        clean, found = scrub_pii(text)
        cleaned.append(clean)
        counts = per_source.setdefault(str(source), Counter(profiles_changed=0))
        counts.update(found)
        counts["profiles_changed"] += bool(found)
    written = [t for t, s in zip(profiles, sources) if s == "written"]
    return cleaned, {
        "pii": {source: {kind: int(counts.get(kind, 0))
                         for kind in (*PII_PATTERNS, "profiles_changed")}
                for source, counts in sorted(per_source.items())},
        "duplicates_written": duplicate_counts(written)}


def clean_dataset_profiles(dataset) -> dict:
    """Replace a loaded data set's profile text by its scrubbed copy (the files on disk are
    never touched) and return the hygiene report that goes into metrics.json and bundles."""
    dataset.user_profiles, users = clean_profiles(dataset.user_profiles,
                                                  dataset.user_profile_source)
    dataset.item_profiles, items = clean_profiles(dataset.item_profiles,
                                                  dataset.item_profile_source)
    return {"cleaned": True, "users": users, "items": items}
