"""prepare-corpus: the unlabelled web segments that the backward model writes instructions for.

The paper (Li et al. 2023, section 2.1) takes ClueWeb segments ("portions of text following an
HTML header"), and runs "deduplication, length filtering" and heuristics against low-quality
segments "such as the proportion of capitalized letters in the header"; it gives no numbers. The
600-3,000-character window (spec.corpus.minChars/maxChars) and the filters below are ours
(docs/method.md). This module does it for any web corpus (c4, RefinedWeb, Dolma, ...):

    counts = CorpusCounts()
    for segment in filter_corpus(records, spec.corpus, counts):   # records: (where, record)
        ...                                                       # {"id": ..., "text": ...}
    manifest["counts"] = counts.as_dict()

Pure: no I/O; the stage wires it to sources and storage. Deterministic across processes: every
hash is xxhash or a fixed numpy computation, never Python's salted hash().

Filters run cheapest first, and a document leaves at the first filter that removes it, so each
count in `CorpusCounts` is "removed here", and read == kept + the sum of the removals:

1. missing text   a dict lookup.
2. too short      raw length < minChars: cleaning only ever removes characters, so such a
                  document can never reach the window; most short pages leave here for free.
3. boilerplate    line cleaning (a few string tests per line), then page-level rejection.
4. length window  on the cleaned text, so a page padded by menus and footers is judged by its
                  content.
5. exact dup      one 128-bit hash of the normalised text and a set lookup.
6. near dup       MinHash signature and an LSH query banded for recall, then the exact shingle
                  Jaccard of each candidate, so that a document leaves only when it really is a
                  near-duplicate; only documents that passed everything else pay it, and only kept
                  documents enter the index, so the first occurrence is the one kept.

Steps 5 and 6 run on batches of documents (`filter_corpus` takes 256 at a time): normalisation,
shingle hashes, signatures and band keys in a few numpy passes over the whole batch, then the
lookups and decisions one document at a time, so the result is that of one document at a time.
"""

from __future__ import annotations

import re
import string
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from itertools import islice
from typing import Any

import numpy as np
import xxhash

from humpback_runtime.spec import CorpusSpec, DedupSpec

__all__ = [
    "CorpusCounts",
    "CorpusFilter",
    "boilerplate_page_reason",
    "clean_boilerplate",
    "filter_corpus",
    "lsh_bands",
    "normalise",
]


@dataclass
class CorpusCounts:
    """How many documents each filter removed (each document is counted once, where it left)."""

    read: int = 0
    kept: int = 0
    missing_text: int = 0  # text field missing, null or not a string
    too_short: int = 0  # shorter than minChars (raw, or after boilerplate cleaning)
    too_long: int = 0  # longer than maxChars after boilerplate cleaning
    boilerplate: int = 0  # page rejected as navigation, code or boilerplate
    exact_duplicate: int = 0
    near_duplicate: int = 0
    boilerplate_lines_removed: int = 0  # lines stripped from pages (kept or not), not documents
    duplicate_ids_renamed: int = 0  # kept segments whose id was taken: given id#2, id#3, ... (not removed)
    # Near-duplicate verification, in pairs, not documents: LSH candidates whose exact Jaccard was
    # computed, and those of them under the threshold (kept apart: what a plain LSH would remove).
    lsh_candidates: int = 0
    lsh_rejected: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)

    @property
    def removed(self) -> int:
        return (self.missing_text + self.too_short + self.too_long + self.boilerplate
                + self.exact_duplicate + self.near_duplicate)


# --- boilerplate ----------------------------------------------------------------------------
#
# After C4 (Raffel et al. 2020: lorem ipsum, curly braces, "javascript" lines, fewer than three
# sentences), RefinedWeb (Penedo et al. 2023: line-wise removal of navigation, counters, "sign
# in" / "read more" lines) and Gopher (Rae et al. 2021: ellipsis ratio, symbol-heavy text).
# Kept narrow on purpose, so that a normal article, a recipe or a list-style answer survives
# whole: phrase rules touch only short lines (a paragraph that mentions "click here" stays),
# menu rules only short capitalised lines in headers and footers, and page rules look at
# proportions, not at single lines.

# Phrase rules, tested on the lowercased line: (a literal the line must contain, the pattern).
# The literal is a fast `in` test that spares the regex on almost every line ("" = always test;
# that pattern is anchored at the line start, so it is cheap anyway).
_PHRASE_RULES = [(trigger, re.compile(pattern)) for trigger, pattern in [
    ("click", r"\bclick (here|below)\b"),  # link call-to-action
    ("reserved", r"\ball rights reserved\b"),  # footer
    ("copyright", r"\bcopyright\s*(©|\(c\)|\d{4})"),  # footer
    ("©", r"^©"),  # footer
    ("cookie", r"\b(use|uses|using|accept|allow) (of )?cookies\b"
               r"|\bcookie (policy|settings|preferences|consent)\b"),  # cookie banner
    ("sign up", r"\bsign up (for|to) (our|the|my|free)\b|\bsign up (now|today|here)\b"),  # sign-up box
    ("subscribe", r"\bsubscribe (to|for) (our|the|my)\b"),  # sign-up box
    ("newsletter", r"\bnewsletters?\b"),  # sign-up box
    ("share", r"\bshare (this (post|article|page|story)|on (facebook|twitter|pinterest|linkedin))\b"
              r"|^share( this| via| on)?\W*$"),  # social buttons
    ("follow us", r"\bfollow us\b"),  # social buttons
    ("", r"^(read more|continue reading|back to top|skip to( main)? content|posted (by|on|in)\b"
         r"|comments? (off|\(\d+\))|leave a (reply|comment)|(previous|next) (post|article))"),  # blog chrome
    ("privacy", r"\bprivacy (policy|notice|settings)\b"),  # footer links
    ("terms", r"\bterms (of (use|service)|and conditions)\b"),  # footer links
    ("in to", r"\b(log|sign) ?in to (view|see|comment|continue|post|reply|access)\b"),  # login wall
    ("logged in", r"\bmust be logged in\b"),  # login wall
    ("javascript", r"\b(enable|turn on) javascript\b"
                   r"|\bjavascript (is|must be|has been) (disabled|enabled|required|turned off)\b"),  # no-JS notice
    ("browser", r"\byour browser (does not|doesn't|is not) support|\b(update|upgrade) your browser\b"),  # old browser
]]
_PHRASE_LINE_MAX_WORDS = 30  # phrase rules apply to lines up to this long (banners, footers)
_MENU_LINE_MAX_WORDS = 3  # "Home", "About Us", "LOG IN", "3 Comments"
_NAV_LINE_MAX_WORDS = 10  # link titles: "How to Smoke a Brisket Like a Pro"
_MIN_LETTER_FRACTION = 0.25  # fewer letters per non-space character: dates, prices, separators
_MIN_SENTENCES = 3  # C4
_LONG_LINE_WORDS = 8  # an unpunctuated line this long (a list item) counts as one sentence
_MAX_NAV_FRACTION = 0.5  # of the characters, in navigation-like lines
_MAX_ELLIPSIS_FRACTION = 0.3  # of the lines (Gopher)
_MAX_BRACE_FRACTION = 0.005  # block-opening braces per character: code, JSON, templates

_CLOSERS = "\"'”’»)]"  # may follow the end punctuation of a sentence
_END_PUNCT = tuple(".!?:")
_ELLIPSES = ("...", "…")
_ASCII_LETTERS = (string.ascii_letters).encode()
_NON_LETTERS = re.compile(r"[\W\d_]")
# A brace that opens a block or object ("f() {", "= {", "[{"); LaTeX's \frac{1}{2} is prose.
_CODE_BRACE = re.compile(r"(?:^|[\s(),=:\[])\{", re.MULTILINE)
_SENTENCE_END = re.compile(r"[.!?][\"'”’»)\]]*(?=\s|$)")


def _n_words(line: str) -> int:
    # Words of a stripped line, by its spaces: exact for normal text, cheaper than split().
    return line.count(" ") + 1


def _ends_like_sentence(line: str) -> bool:
    tail = line.rstrip(_CLOSERS)
    # An ellipsis ends a truncated teaser ("Top 10 grills for..."), not a sentence (Gopher).
    return tail.endswith(_END_PUNCT) and not tail.endswith(_ELLIPSES)


def _is_capitalised(word: str) -> bool:
    return word[0].isupper() or word[0].isdigit()


def _few_letters(line: str) -> bool:
    needed = _MIN_LETTER_FRACTION * (len(line) - line.count(" "))
    data = line.encode("utf-8", "surrogatepass")
    if len(data) - len(data.translate(None, _ASCII_LETTERS)) >= needed:
        return False  # enough ASCII letters alone: the common case, decided without a regex
    return len(line) - len(_NON_LETTERS.findall(line)) < needed


def _is_boilerplate_line(line: str) -> bool:
    if _n_words(line) <= _PHRASE_LINE_MAX_WORDS:
        lower = line.lower()
        if any(trigger in lower and rx.search(lower) for trigger, rx in _PHRASE_RULES):
            return True  # cookie, footer, sign-up, social, login or "read more" line
    return _few_letters(line)  # mostly digits and symbols: dates, prices, separators


def _is_menu_line(line: str) -> bool:
    # "Home", "About Us", "LOG IN", "12 Comments": a few capitalised words, no end punctuation.
    return (_n_words(line) <= _MENU_LINE_MAX_WORDS and not _ends_like_sentence(line)
            and all(map(_is_capitalised, line.split())))


def _is_nav_like(line: str) -> bool:
    """A short unpunctuated line whose words are mostly capitalised: a menu item or link title."""
    if _n_words(line) > _NAV_LINE_MAX_WORDS or _ends_like_sentence(line):
        return False
    words = [w for w in line.split() if w[0].isalnum()]  # not bullets, pipes or arrows
    return bool(words) and 2 * sum(map(_is_capitalised, words)) >= len(words)


def clean_boilerplate(text: str) -> tuple[str, int]:
    """Strip boilerplate lines; return the re-joined text and how many lines were removed.

    Boilerplate lines go wherever they are. Menu lines go only in the page's header and footer
    (before the first and after the last other line): inside the content the same shape is a
    heading or a list item ("Salt", "Step 2"), and a page that is mostly menus is rejected as a
    whole by `boilerplate_page_reason`. Trailing whitespace is stripped (indentation kept) and
    runs of blank lines become one paragraph break.
    """
    lines: list[str] = []
    menu: list[bool] = []
    removed = 0
    for raw in text.splitlines():
        line = raw.rstrip()
        stripped = line.lstrip()
        if not stripped:
            if lines and lines[-1]:
                lines.append("")
                menu.append(False)
        elif _is_boilerplate_line(stripped):
            removed += 1
        else:
            lines.append(line)
            menu.append(_is_menu_line(stripped))
    content = [i for i, line in enumerate(lines) if line and not menu[i]]
    if not content:
        return "", removed + sum(menu)
    first, last = content[0], content[-1]
    removed += sum(menu[:first]) + sum(menu[last + 1:])
    return "\n".join(lines[first:last + 1]), removed


def boilerplate_page_reason(text: str) -> str | None:
    """Why a (cleaned) page is boilerplate rather than content, or None for a content page."""
    if not text:
        return "nothing left after line cleaning"
    if "lorem ipsum" in text.lower():
        return "placeholder text (lorem ipsum)"  # C4
    if "{" in text and len(_CODE_BRACE.findall(text)) > _MAX_BRACE_FRACTION * len(text):
        return "code-like (curly braces)"  # C4 drops any brace; JS, CSS and JSON pages have many
    lines = [line.strip() for line in text.split("\n") if line]
    nav_chars = long_lines = ellipses = 0
    for line in lines:
        if _is_nav_like(line):
            nav_chars += len(line)
        elif _n_words(line) >= _LONG_LINE_WORDS and not _ends_like_sentence(line):
            long_lines += 1
        ellipses += line.endswith(_ELLIPSES)
    if nav_chars > _MAX_NAV_FRACTION * sum(map(len, lines)):
        return "navigation (mostly short capitalised lines)"  # menus and link lists
    missing = _MIN_SENTENCES - long_lines  # a long unpunctuated line (a list item) counts as one
    if missing > 0 and sum(1 for _ in islice(_SENTENCE_END.finditer(text), missing)) < missing:
        return "fewer than three sentences"  # C4: keyword lists, tables, tag clouds
    if ellipses > _MAX_ELLIPSIS_FRACTION * len(lines):
        return "teaser list (lines ending in an ellipsis)"  # Gopher
    return None


# --- deduplication --------------------------------------------------------------------------

_NON_WORD = re.compile(r"[\W_]+")
# ASCII bytes that are not letters or digits become spaces; UTF-8 sequences (>= 0x80) stay.
_ASCII_NON_WORD_TO_SPACE = bytes(c if c >= 0x80 or chr(c).isalnum() else 0x20 for c in range(256))


def _non_word_table(first: int, lead_bytes: range) -> np.ndarray:
    # [lead byte - lead_bytes.start, continuation byte - 0x80]: True where the UTF-8 sequence
    # (a 2-byte one, or the last two bytes of a 3-byte one with lead byte `first`) is a character
    # that is not a letter or digit.
    table = np.zeros((len(lead_bytes), 64), dtype=bool)
    for i, lead in enumerate(lead_bytes):
        for j in range(64):
            seq = bytes([first, lead, 0x80 + j] if first else [lead, 0x80 + j])
            ch = seq.decode("utf-8", "surrogatepass")
            table[i, j] = not ch.isalnum()
    return table


# U+0080-U+07FF (2 bytes: Latin-1 punctuation, no-break space, Latin, Greek, Cyrillic, ...) and
# U+2000-U+2FFF (0xE2 and 2 more bytes: curly quotes, dashes, ellipses, bullets, arrows, ...):
# web text's usual non-ASCII characters, classified once here.
_NON_WORD_2 = _non_word_table(0, range(0xC2, 0xE0))
_NON_WORD_E2 = _non_word_table(0xE2, range(0x80, 0xC0))


def normalised_utf8(text: str) -> bytes:
    """`normalise(text)` in UTF-8 (surrogates passed through)."""
    return normalised_utf8_many([text])[0]


def normalised_utf8_many(texts: list[str]) -> list[bytes]:
    """`normalise` of each text in UTF-8 (surrogates passed through), without a regex pass over
    every character and with numpy's per-call overhead once per batch: one byte translation turns
    ASCII punctuation into spaces, table lookups the usual non-ASCII punctuation (curly quotes,
    dashes, no-break spaces), and only the remaining non-ASCII characters (CJK, emoji) meet the
    regex; runs of spaces collapse in one vectorised step. The same words as `normalise`."""
    encoded = [t.lower().encode("utf-8", "surrogatepass") for t in texts]
    joined = b"".join(encoded).translate(_ASCII_NON_WORD_TO_SPACE)
    bounds = np.zeros(len(texts) + 1, dtype=np.intp)
    np.cumsum([len(e) for e in encoded], out=bounds[1:])
    data = np.frombuffer(joined, dtype=np.uint8)
    if not joined.isascii():
        data = data.copy()
        lead = np.flatnonzero((data[:-1] >= 0xC2) & (data[:-1] < 0xE0))  # 2-byte sequences
        lead = lead[_NON_WORD_2[data[lead] - 0xC2, data[lead + 1] - 0x80]]
        data[lead] = data[lead + 1] = 0x20
        lead = np.flatnonzero(data[:-2] == 0xE2)  # U+2000-U+2FFF
        lead = lead[_NON_WORD_E2[data[lead + 1] - 0x80, data[lead + 2] - 0x80]]
        data[lead] = data[lead + 1] = data[lead + 2] = 0x20
    # Keep a space only after a non-space in the same text: no leading or repeated spaces.
    space = data == 0x20
    after_space = np.empty_like(space)
    after_space[:1] = True
    after_space[1:] = space[:-1]
    after_space[bounds[:-1][bounds[:-1] < len(data)]] = True
    keep = ~(space & after_space)
    squeezed = data[keep].tobytes()
    ends = np.zeros(len(data) + 1, dtype=np.intp)
    np.cumsum(keep, out=ends[1:])
    cuts = ends[bounds].tolist()
    out = []
    for start, end in zip(cuts, cuts[1:]):
        norm = squeezed[start:end].rstrip(b" ")  # at most one trailing space
        if not norm.isascii():  # characters the tables do not cover
            norm = b" ".join(_unicode_non_word_to_space(norm).split())
        out.append(norm)
    return out


def _unicode_non_word_to_space(data: bytes) -> bytes:
    # A maximal run of bytes >= 0x80 is whole UTF-8 sequences, so each run decodes on its own.
    high = np.frombuffer(data, dtype=np.uint8) >= 0x80
    edges = (np.flatnonzero(high[1:] != high[:-1]) + 1).tolist()  # where runs start and end
    if high[0]:
        edges.insert(0, 0)
    if high[-1]:
        edges.append(len(data))
    pieces, last = [], 0
    for start, end in zip(edges[::2], edges[1::2]):
        run = data[start:end].decode("utf-8", "surrogatepass")
        pieces += [data[last:start], _NON_WORD.sub(" ", run).encode("utf-8", "surrogatepass")]
        last = end
    pieces.append(data[last:])
    return b"".join(pieces)


def normalise(text: str) -> str:
    """Lowercase words joined by single spaces: case, whitespace and punctuation do not count."""
    return _NON_WORD.sub(" ", text.lower()).strip()


def exact_key(normalised: str | bytes) -> int:
    if isinstance(normalised, str):
        normalised = normalised.encode("utf-8", "surrogatepass")
    return xxhash.xxh3_128_intdigest(normalised)


# MinHash signatures, vectorised over the shingles of a whole batch of documents: no Python call
# per shingle (datasketch's MinHash.update_batch hashes each shingle in Python; see
# bench/prepare_corpus.py for the comparison), and numpy's per-call overhead once per batch.
# A shingle is `ngram` consecutive normalised words, i.e. a substring of the normalised text, so
# every shingle hash comes from one prefix array of a polynomial (Rabin-Karp) hash over the UTF-8 bytes, mod 2^64:
#     H(s, e) = (S[e] - S[s]) * P^-s,   S[i] = sum_{j<i} byte_j * P^j
# (P is odd, so P^-1 exists mod 2^64 and the same substring hashes the same at any offset).
# The 64-bit value is folded to 32 bits, then each permutation is datasketch's "affine32"
# scheme: fmix32 pre-mix, a_k * h + b_k mod 2^32, with datasketch's own parameters (seed 1),
# so the signature equals MinHash(scheme="affine32", hashfunc=shingle_hash32).update_batch.

_P = np.uint64(0x9E3779B97F4A7C15)  # odd 64-bit multiplier (golden ratio)
_P_INV = np.uint64(pow(int(_P), -1, 1 << 64))
_U64_32 = np.uint64(32)


def _powers(base: np.uint64, n: int) -> np.ndarray:
    out = np.empty(n, dtype=np.uint64)
    out[0] = 1
    out[1:] = base
    with np.errstate(over="ignore"):
        return np.cumprod(out, out=out)  # wraps mod 2^64, as intended


def _fmix32(h: np.ndarray) -> np.ndarray:
    # MurmurHash3's finalizer, as datasketch's affine32 scheme applies it.
    h ^= h >> np.uint32(16)
    h *= np.uint32(0x85EBCA6B)
    h ^= h >> np.uint32(13)
    h *= np.uint32(0xC2B2AE35)
    h ^= h >> np.uint32(16)
    return h


def shingle_hash32(shingle: bytes) -> int:
    """The 32-bit hash of one shingle (normalised words joined by spaces, UTF-8); for tests."""
    mask = (1 << 64) - 1
    h, power = 0, 1
    for byte in shingle:
        h = (h + byte * power) & mask
        power = (power * int(_P)) & mask
    return (h ^ (h >> 32)) & 0xFFFFFFFF


def _datasketch_affine32_permutations(num_perm: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    # datasketch's MinHash(scheme="affine32", seed=seed) parameters, drawn as it draws them (its
    # _init_permutations), without importing datasketch (which imports scipy: ~1 s per stage start).
    gen = np.random.RandomState(seed)
    a = gen.randint(0, 1 << 31, num_perm, dtype=np.uint32) * np.uint32(2) + np.uint32(1)
    b = gen.randint(0, 1 << 32, num_perm, dtype=np.uint32)
    return a, b


# Signatures are computed for many documents at once: per-call numpy overhead (a few microseconds
# per operation, a dozen operations per document) is paid once per batch, not once per document.
# The (permutations x shingles) products are made this many shingles at a time (~1 MB of uint32
# at 64 permutations), so they stay in the CPU cache.
_SIGNATURE_CHUNK = 4096


class MinHasher:
    """MinHash signatures of word n-gram shingles, datasketch-compatible (scheme affine32)."""

    def __init__(self, num_perm: int, ngram: int, seed: int = 1):
        self.num_perm = num_perm
        self.ngram = ngram
        self.seed = seed
        a, b = _datasketch_affine32_permutations(num_perm, seed)
        self._a = a[:, None]
        self._b = b[:, None]
        self._pow = _powers(_P, 1 << 16)
        self._pow_inv = _powers(_P_INV, 1 << 16)

    def _grow(self, n: int) -> None:
        size = max(n, 2 * len(self._pow))
        self._pow = _powers(_P, size)
        self._pow_inv = _powers(_P_INV, size)

    def shingle_hashes_many(self, texts: list[bytes]) -> tuple[np.ndarray, np.ndarray]:
        """32-bit hashes of the word n-grams of each normalised UTF-8 text (the whole text when it
        has fewer words), all in one array: text i's are hashes[offsets[i]:offsets[i + 1]]."""
        # The texts joined by spaces: one prefix hash over all of them, and shingles are chosen by
        # word numbers so that none spans two texts.
        data = np.frombuffer(b" ".join(texts), dtype=np.uint8)
        n = len(data)
        if n + 1 > len(self._pow):
            self._grow(n + 1)
        spaces = np.flatnonzero(data == 32)
        starts = np.empty(len(spaces) + 1, dtype=np.intp)  # byte offset of each word's start
        starts[0] = 0
        starts[1:] = spaces + 1
        ends = np.empty(len(spaces) + 1, dtype=np.intp)  # and of its end
        ends[:-1] = spaces
        ends[-1] = n
        words = np.fromiter((t.count(b" ") + 1 for t in texts), dtype=np.intp, count=len(texts))
        first = np.zeros(len(texts), dtype=np.intp)  # each text's first word number
        np.cumsum(words[:-1], out=first[1:])
        count = np.maximum(words - self.ngram + 1, 1)  # shingles per text
        offsets = np.zeros(len(texts) + 1, dtype=np.intp)
        np.cumsum(count, out=offsets[1:])
        word = np.arange(offsets[-1]) + np.repeat(first - offsets[:-1], count)  # each shingle's first word
        last = np.minimum(word + (self.ngram - 1), np.repeat(first + words - 1, count))  # and its last
        s, e = starts[word], ends[last]
        prefix = np.zeros(n + 1, dtype=np.uint64)
        with np.errstate(over="ignore"):
            np.cumsum(data * self._pow[:n], out=prefix[1:])
            h = (prefix[e] - prefix[s]) * self._pow_inv[s]
        return (h ^ (h >> _U64_32)).astype(np.uint32), offsets

    def shingle_hashes(self, normalised: str | bytes) -> np.ndarray:
        """32-bit hashes of the word n-grams of one normalised text."""
        if isinstance(normalised, str):
            # surrogatepass throughout: JSON may carry lone surrogates ("\ud83d"), which must not raise.
            normalised = normalised.encode("utf-8", "surrogatepass")
        return self.shingle_hashes_many([normalised])[0]

    def use_permutations(self, n: int) -> None:
        """Compute only the first n values of each signature (an LSH that uses no more)."""
        self._a, self._b = self._a[:n], self._b[:n]

    def mixed_many(self, texts: list[bytes]) -> tuple[np.ndarray, np.ndarray]:
        """`shingle_hashes_many` after fmix32: the permutations' input, and (fmix32 being a
        bijection) sets with the same sizes and intersections as the shingles' for exact Jaccard."""
        hashes, offsets = self.shingle_hashes_many(texts)
        return _fmix32(hashes), offsets  # a fresh array: mixing in place is safe

    def signatures_of(self, mixed: np.ndarray, offsets: np.ndarray) -> np.ndarray:
        """The (texts, num_perm) uint32 MinHash signatures of the texts whose mixed shingle hashes
        are mixed[offsets[i]:offsets[i + 1]]."""
        out = np.empty((len(offsets) - 1, len(self._a)), dtype=np.uint32)
        doc = 0
        while doc < len(out):
            # Whole texts, about _SIGNATURE_CHUNK shingles (at least one text).
            stop = max(int(np.searchsorted(offsets, offsets[doc] + _SIGNATURE_CHUNK, side="right")) - 1, doc + 1)
            stop = min(stop, len(out))
            lo = offsets[doc]
            # (num_perm, shingles) in uint32: the wraparound is the affine32 scheme's mod 2^32.
            values = self._a * mixed[lo:offsets[stop]] + self._b
            out[doc:stop] = np.minimum.reduceat(values, offsets[doc:stop] - lo, axis=1).T
            doc = stop
        return out

    def signature(self, normalised: str | bytes) -> np.ndarray:
        """The (num_perm,) uint32 MinHash signature of a normalised text."""
        if isinstance(normalised, str):
            normalised = normalised.encode("utf-8", "surrogatepass")
        return self.signatures_of(*self.mixed_many([normalised]))[0]


# Banding. A pair at Jaccard s shares one band of r rows with probability s^r, so b bands find
# it with probability 1 - (1 - s^r)^b. Candidates are verified exactly, so a chance candidate
# costs one comparison while a missed pair keeps a duplicate: take the most rows per band (the
# fewest chance candidates) that still miss at most this fraction of the pairs at the threshold.
# At 0.8: 16 bands of 4 rows for 64 permutations (the default), missing 2e-4 of the pairs at
# 0.8, and 25 bands of 5 rows for 128, missing 5e-5 (a plain LSH decision with datasketch's
# 9x13 misses 60% there and 30% at 0.85). Since the decision is exact, 64 permutations suffice:
# a signature costs half of 128's, for slightly more chance candidates.
_MAX_MISS_AT_THRESHOLD = 1e-3


def lsh_bands(threshold: float, num_perm: int) -> tuple[int, int]:
    """(bands, rows per band) for an LSH over `num_perm` MinHash values, tuned for recall."""
    for rows in range(num_perm, 0, -1):
        bands = num_perm // rows
        if (1 - threshold ** rows) ** bands <= _MAX_MISS_AT_THRESHOLD:
            return bands, rows
    return num_perm, 1


def _distinct(values: np.ndarray) -> np.ndarray:
    # np.unique, several times faster for a few hundred values (numpy 2's hash-based unique is not).
    values = np.sort(values)
    keep = np.empty(len(values), dtype=bool)
    keep[:1] = True
    np.not_equal(values[1:], values[:-1], out=keep[1:])
    return values[keep]


class NearDuplicateIndex:
    """MinHash LSH over the kept documents; every candidate is verified by exact Jaccard.

    A document is a near-duplicate when the Jaccard similarity of its shingle set with that of
    a kept document reaches the threshold. The LSH only proposes candidates: its bands are tuned
    to find nearly every pair at the threshold (`lsh_bands`), and the exact Jaccard of the two
    shingle sets (32-bit shingle hashes, kept per indexed document) decides, so neither a chance
    band collision nor a signature estimate's error removes a document.

    The band tables are dicts from a band's hash (one vectorised step for all bands) to the
    documents with that band (an int, or a list when several): at 25x5 bands datasketch's
    MinHashLSH (bytes per band, a set per entry) takes ~4x longer per document to query and
    insert. Per indexed document: its shingle hashes (4 bytes per word) and one dict entry per
    band, ~5.5 KB in all for 1,600 characters (docs/corpus.md).
    """

    def __init__(self, dedup: DedupSpec, counts: CorpusCounts | None = None):
        self.threshold = dedup.threshold
        self.counts = counts if counts is not None else CorpusCounts()
        self.hasher = MinHasher(dedup.num_perm, dedup.ngram)
        self.bands, self.rows = lsh_bands(dedup.threshold, dedup.num_perm)
        used = self.bands * self.rows
        self.hasher.use_permutations(used)  # the rest would only be computed to be ignored
        # A band's key: sum_j sig[j] * m_j mod 2^64 over its rows, with fixed random odd
        # multipliers: equal bands give equal keys, and distinct bands rarely collide (which
        # would only cost a verification). One table per band.
        rng = np.random.default_rng(0x5EED)
        self._mult = (rng.integers(0, 1 << 63, size=(self.bands, self.rows), dtype=np.uint64) * np.uint64(2)
                      + np.uint64(1))
        self._tables: list[dict[int, int | list[int]]] = [{} for _ in range(self.bands)]
        self._shingles: list[np.ndarray] = []  # mixed shingle hashes, by document number

    def __len__(self) -> int:
        return len(self._shingles)

    def _jaccard(self, shingles: np.ndarray, doc: int) -> float:
        other = _distinct(self._shingles[doc])
        common = len(np.intersect1d(shingles, other, assume_unique=True))
        return common / (len(shingles) + len(other) - common)

    def seen(self, normalised: str | bytes) -> bool:
        """True if a near-duplicate was added before; otherwise add this document and say False."""
        if isinstance(normalised, str):
            normalised = normalised.encode("utf-8", "surrogatepass")
        return self.seen_many([normalised])[0]

    def seen_many(self, texts: list[bytes]) -> list[bool]:
        """`seen` of each normalised UTF-8 text in turn (a text is checked against the earlier ones
        of the batch too); the signatures and band keys of the whole batch are computed at once."""
        mixed, offsets = self.hasher.mixed_many(texts)
        sigs = self.hasher.signatures_of(mixed, offsets).reshape(len(texts), self.bands, self.rows)
        with np.errstate(over="ignore"):
            keys = (sigs.astype(np.uint64) * self._mult).sum(axis=2).tolist()
        bounds = offsets.tolist()
        return [self._seen(mixed[bounds[i]:bounds[i + 1]], keys[i]) for i in range(len(texts))]

    def _seen(self, hashes: np.ndarray, keys: list[int]) -> bool:
        shingles = None  # the distinct hashes, computed only if there is a candidate
        checked: set[int] = set()
        hits = [table.get(key) for table, key in zip(self._tables, keys)]
        for hit in hits:
            if hit is None:
                continue
            for doc in hit if isinstance(hit, list) else (hit,):
                if doc in checked:
                    continue
                checked.add(doc)
                if shingles is None:
                    shingles = _distinct(hashes)
                self.counts.lsh_candidates += 1
                if self._jaccard(shingles, doc) >= self.threshold:
                    return True
                self.counts.lsh_rejected += 1
        doc = len(self._shingles)
        # As they come (made distinct only when a candidate needs it): a view of the batch's array,
        # which stays in memory with the hashes of the batch's removed documents (~1.1 KB each;
        # copying every kept document's instead cost ~5 % of the stage's throughput).
        self._shingles.append(hashes)
        for table, key, hit in zip(self._tables, keys, hits):
            if hit is None:
                table[key] = doc  # the common case: a band no kept document has
            elif isinstance(hit, list):
                hit.append(doc)
            else:
                table[key] = [hit, doc]
        return False


# --- the filter -----------------------------------------------------------------------------


class CorpusFilter:
    """Stateful filter over a stream of documents (it remembers what it kept, for dedup)."""

    def __init__(self, spec: CorpusSpec, counts: CorpusCounts | None = None):
        self.spec = spec
        self.counts = counts if counts is not None else CorpusCounts()
        self._exact: set[int] | None = set() if spec.dedup.exact else None
        self._near = NearDuplicateIndex(spec.dedup, self.counts) if spec.dedup.near_duplicates else None

    def process(self, doc_id: str, text: Any) -> dict[str, str] | None:
        """The cleaned segment {"id", "text"}, or None when a filter removed it (and counted it)."""
        return self.process_many([(doc_id, text)])[0]

    def process_many(self, docs: list[tuple[str, Any]]) -> list[dict[str, str] | None]:
        """`process` of each (id, text) in turn; normalisation and the near-duplicate step run once
        for the batch (a document is still checked against the earlier ones of its batch)."""
        c = self.counts
        out = [self._filter(doc_id, text) for doc_id, text in docs]
        if self._exact is not None or self._near is not None:
            passed = [i for i, segment in enumerate(out) if segment is not None]
            norms = normalised_utf8_many([out[i]["text"] for i in passed])
            pending: list[int] = []  # positions of the segments the near-duplicate step decides on
            pending_norms: list[bytes] = []
            for i, norm in zip(passed, norms):
                if self._exact is not None:
                    key = exact_key(norm)
                    if key in self._exact:
                        c.exact_duplicate += 1
                        out[i] = None
                        continue
                    self._exact.add(key)
                if self._near is not None and norm:
                    pending.append(i)
                    pending_norms.append(norm)
            if pending:
                for i, duplicate in zip(pending, self._near.seen_many(pending_norms)):
                    if duplicate:
                        c.near_duplicate += 1
                        out[i] = None
        c.kept += sum(segment is not None for segment in out)
        return out

    def _filter(self, doc_id: str, text: Any) -> dict[str, str] | None:
        # Every filter but deduplication.
        c = self.counts
        c.read += 1
        if not isinstance(text, str):
            c.missing_text += 1
            return None
        if len(text) < self.spec.min_chars:
            c.too_short += 1
            return None
        if self.spec.boilerplate:
            text, removed = clean_boilerplate(text)
            c.boilerplate_lines_removed += removed
            if boilerplate_page_reason(text) is not None:
                c.boilerplate += 1
                return None
        else:
            text = text.strip()
        if len(text) < self.spec.min_chars:
            c.too_short += 1
            return None
        if len(text) > self.spec.max_chars:
            c.too_long += 1
            return None
        return {"id": doc_id, "text": text}


# Documents per batch of the dedup steps: enough that numpy's per-call overhead is small beside
# the work (~270 shingles each), few enough that a stage's progress and memory do not notice.
_BATCH = 256


def filter_corpus(records: Iterable[tuple[str, dict]], spec: CorpusSpec,
                  counts: CorpusCounts | None = None) -> Iterator[dict[str, str]]:
    """Filter (where, record) pairs; yield {"id", "text"} segments in input order.

    The id is record[spec.id_field] when that field is set and present, else `where`
    ("file:line"); the text is record[spec.text_field]. Ids are unique in the output: a kept segment
    whose id an earlier one took (two segments of one url, say) becomes `id#2`, `id#3`, ... and is
    counted (`duplicate_ids_renamed`), so the inference stages' exactly-once by id holds.
    """
    flt = CorpusFilter(spec, counts)
    counts = flt.counts
    text_field, id_field = spec.text_field, spec.id_field
    used: set[str] = set()
    records = iter(records)
    while batch := list(islice(records, _BATCH)):
        docs = []
        for where, record in batch:
            doc_id = where
            if id_field is not None:
                value = record.get(id_field)
                if value is not None:
                    doc_id = str(value)
            docs.append((doc_id, record.get(text_field)))
        for segment in flt.process_many(docs):
            if segment is None:
                continue
            doc_id = segment["id"]
            if doc_id in used:
                n = 2
                while f"{doc_id}#{n}" in used:
                    n += 1
                segment["id"] = doc_id = f"{doc_id}#{n}"
                counts.duplicate_ids_renamed += 1
            used.add(doc_id)
            yield segment
