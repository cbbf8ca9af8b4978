"""prepare-corpus filtering on the shipped c4 sample: window, dedup, boilerplate, counts."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from datasketch import MinHash

from humpback_runtime.corpus import (
    CorpusCounts,
    CorpusFilter,
    MinHasher,
    boilerplate_page_reason,
    clean_boilerplate,
    filter_corpus,
    lsh_bands,
    normalise,
    normalised_utf8,
    normalised_utf8_many,
    shingle_hash32,
)
from humpback_runtime.spec import CorpusSpec, DedupSpec

ROOT = Path(__file__).resolve().parents[3]
C4 = ROOT / "examples" / "data" / "c4_sample.jsonl"
REMOVALS = ("missing_text", "too_short", "too_long", "boilerplate", "exact_duplicate", "near_duplicate")


@pytest.fixture(scope="module")
def c4():
    return [json.loads(line) for line in open(C4, encoding="utf-8")]


@pytest.fixture(scope="module")
def in_window(c4):
    """The c4 texts that the default spec keeps (600-3,000 characters after cleaning)."""
    return [s["text"] for s in run(CorpusSpec(source="x"), c4)[0]]


def run(spec, rows, counts=None):
    counts = counts if counts is not None else CorpusCounts()
    out = list(filter_corpus([(f"c4_sample.jsonl:{i + 1}", r) for i, r in enumerate(rows)], spec, counts))
    return out, counts


def spec(**kw):
    dedup = kw.pop("dedup", {})
    return CorpusSpec(source="x", dedup=DedupSpec(**dedup), **kw)


def assert_counts_add_up(counts):
    d = counts.as_dict()
    assert d["read"] == d["kept"] + sum(d[k] for k in REMOVALS), d


def change_words(text, n, word="zebra"):
    """A near-duplicate: n words, evenly spread, replaced."""
    words = text.split(" ")
    for k in range(1, n + 1):
        words[k * len(words) // (n + 1)] = word
    return " ".join(words)


# --- length window --------------------------------------------------------------------------


def test_length_window_counts_match_the_c4_sample_lengths(c4):
    out, counts = run(spec(boilerplate=False, dedup={"exact": False, "near_duplicates": False}), c4)
    lengths = [len(r["text"].strip()) for r in c4]
    assert counts.too_short == sum(n < 600 for n in lengths) == 266
    assert counts.too_long == sum(n > 3000 for n in lengths) == 206
    assert counts.kept == len(out) == 528
    assert all(600 <= len(s["text"]) <= 3000 for s in out)
    assert_counts_add_up(counts)


def test_custom_window_is_applied_to_the_cleaned_text(c4):
    out, counts = run(spec(min_chars=1000, max_chars=2000), c4)
    assert out and all(1000 <= len(s["text"]) <= 2000 for s in out)
    assert counts.too_short > 266 and counts.too_long > 206
    assert_counts_add_up(counts)


def test_default_spec_on_c4_keeps_segments_in_the_paper_window(c4):
    out, counts = run(CorpusSpec(source="x"), c4)
    assert all(600 <= len(s["text"]) <= 3000 for s in out)
    assert counts.kept == len(out) > 500
    assert counts.boilerplate == 0  # c4 is clean prose: no article is rejected as boilerplate
    assert counts.exact_duplicate == counts.near_duplicate == 0  # the sample has no duplicates
    assert_counts_add_up(counts)


# --- deduplication --------------------------------------------------------------------------


def test_exact_duplicate_differing_in_whitespace_case_and_punctuation_is_dropped(in_window):
    text = in_window[0]
    variants = [text.upper(), text.replace(" ", "   ").replace("\n", "\n\n"), text.replace(",", "").replace(".", " .")]
    rows = [{"text": t} for t in [text, *variants, in_window[1]]]
    out, counts = run(spec(dedup={"near_duplicates": False}), rows)
    assert [s["text"] for s in out] == [text, in_window[1]]
    assert counts.exact_duplicate == 3


def test_near_duplicate_with_a_few_words_changed_is_dropped_and_distinct_docs_kept(in_window):
    originals = [t for t in in_window if len(t.split()) >= 200][:20]
    copies = [change_words(t, 3) for t in originals]
    rows = [{"text": t} for t in in_window + copies]
    out, counts = run(spec(dedup={"exact": True}), rows)
    assert counts.exact_duplicate == 0  # the copies differ, exact dedup cannot catch them
    assert counts.near_duplicate == len(copies) == 20
    assert [s["text"] for s in out] == in_window  # every distinct document kept, in order


def test_first_occurrence_is_kept(in_window):
    original = in_window[3]
    copy = change_words(original, 2)
    out, _ = run(spec(id_field="id"), [{"text": copy, "id": "first"}, {"text": original, "id": "second"}])
    assert [s["id"] for s in out] == ["first"]


def test_near_duplicates_are_kept_when_switched_off(in_window):
    copy = change_words(in_window[0], 3)
    out, counts = run(spec(dedup={"near_duplicates": False}), [{"text": in_window[0]}, {"text": copy}])
    assert len(out) == 2 and counts.near_duplicate == 0


def test_dissimilar_edit_is_not_a_near_duplicate(in_window):
    # Every 4th word replaced: Jaccard of 5-gram shingles is near zero.
    text = in_window[5]
    words = text.split(" ")
    edited = " ".join("zebra" if i % 4 == 0 else w for i, w in enumerate(words))
    out, counts = run(spec(), [{"text": text}, {"text": edited}])
    assert len(out) == 2 and counts.near_duplicate == 0


def shingle_set(text, n=5):
    """The word n-gram shingles of a text, as the near-duplicate filter defines them (no hashing)."""
    words = normalise(text).split(" ")
    return {tuple(words[i:i + n]) for i in range(max(len(words) - n + 1, 1))}


def jaccard(a, b):
    x, y = shingle_set(a), shingle_set(b)
    return len(x & y) / len(x | y)


def copies_at_jaccard(texts, low, high, n=40):
    """(original, copy) pairs whose exact shingle Jaccard lies in [low, high): evenly spread words
    replaced, as few as reach the band; from the first n texts of at least 150 words that get there."""
    pairs = []
    for text in texts:
        if len(text.split()) < 150:
            continue
        for k in range(1, 100):
            copy = change_words(text, k)
            j = jaccard(text, copy)
            if j < high:
                if j >= low:
                    pairs.append((text, copy))
                break
        if len(pairs) == n:
            break
    assert len(pairs) >= 20, (low, high, len(pairs))
    return pairs


@pytest.mark.parametrize("low,high", [(0.8, 0.84), (0.84, 0.88), (0.88, 0.95)])
def test_every_pair_at_or_above_the_threshold_is_removed(in_window, low, high):
    # Estimated-Jaccard verification misses a pair at 0.82 about a third of the time, and a plain
    # LSH decision a fifth; exact verification of the candidates of a 16x4 banding misses ~1e-4.
    pairs = copies_at_jaccard(in_window, low, high)
    originals = [a for a, _ in pairs]
    rows = [{"text": t} for t in originals + [b for _, b in pairs]]
    out, counts = run(spec(), rows)
    assert [s["text"] for s in out] == originals  # every copy removed, every original kept
    assert counts.near_duplicate == len(pairs) and counts.exact_duplicate == 0
    assert_counts_add_up(counts)


@pytest.mark.parametrize("low,high", [(0.55, 0.65), (0.72, 0.8)])
def test_no_pair_under_the_threshold_is_removed(in_window, low, high):
    # The LSH returns most of these pairs as candidates (16 bands of 4 rows: 89% at 0.6); the exact
    # Jaccard rejects them all, where a signature estimate would remove some of those near 0.8.
    pairs = copies_at_jaccard(in_window, low, high)
    rows = [{"text": t} for pair in pairs for t in pair]
    out, counts = run(spec(), rows)
    assert [s["text"] for s in out] == [r["text"] for r in rows]
    assert counts.near_duplicate == 0
    assert counts.lsh_rejected > len(pairs) // 2  # candidates were checked and turned down
    assert counts.lsh_candidates == counts.lsh_rejected + counts.near_duplicate


def test_candidate_counts_add_up_when_some_are_removed(in_window):
    removed = copies_at_jaccard(in_window, 0.85, 0.9, n=20)
    kept = copies_at_jaccard(in_window[200:], 0.55, 0.65, n=20)
    rows = [{"text": t} for pair in removed + kept for t in pair]
    out, counts = run(spec(), rows)
    assert counts.near_duplicate == len(removed) and counts.kept == len(rows) - len(removed)
    assert counts.lsh_candidates == counts.lsh_rejected + counts.near_duplicate
    assert counts.lsh_rejected >= len(kept) // 2


def test_the_earlier_of_two_near_duplicates_is_kept_in_either_order(in_window):
    a, b = copies_at_jaccard(in_window, 0.8, 0.84)[0]
    other = in_window[-1]
    for first, second in [(a, b), (b, a)]:
        out, counts = run(spec(), [{"text": first}, {"text": other}, {"text": second}])
        assert [s["text"] for s in out] == [first, other] and counts.near_duplicate == 1


def test_lsh_banding_favours_recall_at_the_threshold():
    assert lsh_bands(0.8, 64) == (16, 4)  # the default
    assert lsh_bands(0.8, 128) == (25, 5)
    assert lsh_bands(1.0, 128) == (1, 128)  # identical shingle sets share every band
    for threshold in (0.5, 0.7, 0.8, 0.9, 0.95):
        for num_perm in (16, 64, 128, 256, 1024):
            bands, rows = lsh_bands(threshold, num_perm)
            assert bands * rows <= num_perm
            assert (1 - threshold ** rows) ** bands <= 1e-3, (threshold, num_perm, bands, rows)


@pytest.mark.parametrize("threshold,num_perm,ngram", [(1.0, 128, 5), (0.5, 16, 1), (0.9, 1024, 32)])
def test_dedup_settings_at_the_edges_of_the_spec_work(in_window, threshold, num_perm, ngram):
    # Punctuation-only edits give identical shingle sets: a near-duplicate at any threshold.
    copy = in_window[0].replace(",", "").replace(".", "!")
    rows = [{"text": t} for t in [*in_window[:20], copy]]
    out, counts = run(spec(dedup={"exact": False, "threshold": threshold, "num_perm": num_perm, "ngram": ngram}), rows)
    assert counts.near_duplicate == 1 and len(out) == 20


def test_signature_equals_datasketch_minhash_of_the_shingles(in_window):
    hasher = MinHasher(num_perm=64, ngram=5)
    for text in [*in_window[:10], "two words", "héllo wörld — ünïcode ✓ text here and more"]:
        norm = normalise(text)
        words = norm.split(" ")
        shingles = [" ".join(words[i:i + 5]).encode() for i in range(max(len(words) - 4, 1))]
        reference = MinHash(num_perm=64, seed=1, scheme="affine32", hashfunc=shingle_hash32)
        reference.update_batch(shingles)
        assert np.array_equal(hasher.signature(norm), reference.hashvalues), text[:40]


def test_normalise_ignores_case_whitespace_and_punctuation():
    assert normalise("  Hello,\n\tWORLD!  It's   me.") == "hello world it s me"


def test_the_fast_normalisation_gives_the_same_words(c4):
    odd = ["a_b__c", "___", "", "\ud83d lone \ud800\udfff x\u00a0y caf\u00e9\u2019s \u201cq\u201d \u2014 42\u00b2 \u0130stanbul \ufb01ne",
           "\u00c0\u00c9-\u00fc \u3000\u6f22\u5b57\u3002\u304b\u306a", "tab\tand\x0bvertical\x0cfeed\r\n\x85next"]
    for text in [r["text"] for r in c4] + odd:
        assert normalised_utf8(text).decode("utf-8", "surrogatepass") == normalise(text), text[:60]


# --- boilerplate ----------------------------------------------------------------------------

HEADER = ["Home", "About Us", "Services", "Blog", "Contact", "",
          "We use cookies to improve your experience on our site. Accept"]
FOOTER = ["", "Share this post", "Follow us on Facebook and Twitter",
          "Sign up for our newsletter to get the latest recipes.", "Click here to read more stories.",
          "Please enable JavaScript to view the comments.", "Posted by admin on 12/03/2019", "12/03/2019 10:45 | 3,207", "Privacy Policy | Terms of Use",
          "© 2019 Acme Media Inc. All rights reserved.", "Facebook", "Twitter"]


def test_boilerplate_lines_are_removed_and_content_kept(in_window):
    content = in_window[7]
    page = "\n".join([*HEADER, "", content, *FOOTER])
    cleaned, removed = clean_boilerplate(page)
    assert cleaned == content
    assert removed == sum(1 for line in HEADER + FOOTER if line)
    out, counts = run(spec(), [{"text": page}])
    assert [s["text"] for s in out] == [content]
    assert counts.boilerplate_lines_removed == removed


def test_page_padded_past_max_chars_by_boilerplate_is_judged_by_its_content(in_window):
    content = next(t for t in in_window if len(t) > 2600)
    page = "\n".join([*HEADER, *FOOTER, content, *HEADER, *FOOTER])
    assert len(page) > 3000
    out, counts = run(spec(), [{"text": page}])
    assert [s["text"] for s in out] == [content] and counts.too_long == 0


def test_headings_list_items_and_paragraphs_mentioning_phrases_are_kept():
    page = "\n".join([
        "How to Smoke a Brisket Like a Pro",
        "Smoking a brisket takes patience, a steady fire and a good thermometer. If you have never "
        "done it, click here in your mind and picture twelve hours of low heat; then read on, because "
        "we share this recipe with everyone who asks us at the market every single weekend.",
        "Ingredients",
        "- Salt",
        "- 2 cups coarse black pepper",
        "- Brisket",
        "Method",
        "Trim the fat cap to a quarter inch. Season the meat the night before. Smoke it at 225 degrees "
        "until the bark sets, wrap it in butcher paper, and rest it for an hour before slicing.",
    ])
    cleaned, removed = clean_boilerplate(page)
    assert cleaned == page and removed == 0
    assert boilerplate_page_reason(cleaned) is None


def test_cleaning_is_idempotent_on_c4(c4):
    for row in c4:
        cleaned, _ = clean_boilerplate(row["text"])
        assert clean_boilerplate(cleaned) == (cleaned, 0)


NAVIGATION_PAGE = "\n".join([
    *HEADER, "Best BBQ Recipes of 2019", "How to Smoke a Brisket Like a Pro", "Top 10 Grills for Summer",
    "Pulled Pork Sandwich Ideas", "Texas Style Beef Ribs", "Kansas City Burnt Ends", "Smoked Salmon Guide",
    "Our Favourite Rubs and Sauces", "Backyard Pitmaster Tips", "Reviews", "Recipes", "Gear", "Events",
    "Shop", "Gift Cards", "Careers", "Press", "Help Center", "Store Locator", *FOOTER,
])
LOREM_PAGE = ("Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor incididunt "
              "ut labore et dolore magna aliqua. Ut enim ad minim veniam, quis nostrud exercitation. ") * 5
CODE_PAGE = "\n".join([
    "function init() { var menu = document.getElementById('menu'); if (menu) { menu.onclick = function(e) {",
    "  e.preventDefault(); toggle(menu); }; } var items = [{ id: 1, label: 'Home' }, { id: 2, label: 'About' }];",
    "  items.forEach(function(item) { render(item); }); window.addEventListener('load', function() { init(); });",
] * 3)
TEASER_PAGE = "\n".join(
    f"Story {i}: the council met on Tuesday to discuss the new budget for road repairs and the..."
    for i in range(12))
APP_SHELL_PAGE = "\n".join([
    *HEADER, "JavaScript is disabled in your browser.", "You need to enable JavaScript to run this app.",
    "Loading", "My Account", "Orders", "Wish List", "Track Package", "Gift Cards", "Customer Service",
    "Download the App", "Store Finder", "Weekly Ad", *FOOTER,
])
SPAM_PAGE = " ".join(["cheap flights hotel deals car rental travel insurance last minute offers"] * 12)


@pytest.mark.parametrize("page,reason", [
    (NAVIGATION_PAGE, "navigation"),
    (LOREM_PAGE, "lorem ipsum"),
    (CODE_PAGE, "code-like"),
    (TEASER_PAGE, "teaser"),
    (APP_SHELL_PAGE, "navigation"),
    (SPAM_PAGE, "fewer than three sentences"),
])
def test_boilerplate_pages_are_rejected(page, reason):
    assert len(page) >= 600
    assert reason in boilerplate_page_reason(clean_boilerplate(page)[0])
    out, counts = run(spec(), [{"text": page}])
    assert out == [] and counts.boilerplate == 1
    assert_counts_add_up(counts)


def test_boilerplate_switched_off_keeps_the_page_as_is(in_window):
    page = "\n".join([*HEADER, in_window[2], *FOOTER])
    out, counts = run(spec(boilerplate=False, max_chars=10_000), [{"text": "  " + page + "\n"}])
    assert [s["text"] for s in out] == [page] and counts.boilerplate_lines_removed == 0


# --- records, counts, determinism -----------------------------------------------------------


def test_missing_null_or_non_string_text_is_counted_as_missing_text(in_window):
    rows = [{"url": "x"}, {"text": None}, {"text": 123}, {"text": ["a", "b"]}, {"text": ""}, {"text": in_window[0]}]
    out, counts = run(spec(), rows)
    assert counts.missing_text == 4
    assert counts.too_short == 1  # the empty string is text, just too short
    assert counts.kept == len(out) == 1
    assert_counts_add_up(counts)


def test_text_with_lone_surrogates_and_emoji_is_processed(in_window):
    # json.loads("\"\\ud83d\"") gives a lone surrogate; it must not make the encoder raise.
    odd = in_window[0] + " \ud83d broken emoji and a real one 🍖.\n\ud800\udfff\ud800"
    out, counts = run(spec(), [{"text": odd}, {"text": odd.upper()}])
    assert len(out) == 1 and counts.exact_duplicate == 1


def test_id_comes_from_id_field_when_present_else_from_where(in_window):
    rows = [{"text": in_window[0], "url": "https://a.example/1"}, {"text": in_window[1]},
            {"text": in_window[2], "url": None}]
    out, _ = run(spec(id_field="url"), rows)
    assert [s["id"] for s in out] == ["https://a.example/1", "c4_sample.jsonl:2", "c4_sample.jsonl:3"]
    out, _ = run(spec(), rows[:1])
    assert out == [{"id": "c4_sample.jsonl:1", "text": in_window[0]}]


def test_text_field_is_configurable(in_window):
    out, counts = run(spec(text_field="body"), [{"body": in_window[0]}, {"text": in_window[1]}])
    assert [s["text"] for s in out] == [in_window[0]] and counts.missing_text == 1


def test_counts_add_up_with_every_kind_of_removal(c4, in_window):
    rows = [*c4, {"text": None}, {"text": in_window[0].upper()}, {"text": change_words(in_window[1], 2)},
            {"text": NAVIGATION_PAGE}]
    out, counts = run(spec(), rows)
    d = counts.as_dict()
    assert set(d) == {"read", "kept", *REMOVALS, "boilerplate_lines_removed", "duplicate_ids_renamed",
                      "lsh_candidates", "lsh_rejected"}
    assert d["read"] == len(rows) and d["kept"] == len(out)
    assert all(d[k] >= 1 for k in REMOVALS), d
    assert_counts_add_up(counts)


def test_process_counts_into_the_given_counts(in_window):
    counts = CorpusCounts()
    flt = CorpusFilter(spec(), counts)
    assert flt.process("a", in_window[0]) == {"id": "a", "text": in_window[0]}
    assert flt.process("b", in_window[0]) is None
    assert flt.counts is counts and counts.read == 2 and counts.exact_duplicate == 1


def _digest(rows):
    out, counts = run(spec(), rows)
    return json.dumps([out, counts.as_dict()], sort_keys=True)


def test_two_runs_give_identical_output(c4, in_window):
    rows = c4 + [{"text": change_words(t, 3)} for t in in_window[:50]]
    assert _digest(rows) == _digest(rows)


DIGEST_SCRIPT = """
import hashlib, json, sys
from humpback_runtime.corpus import CorpusCounts, filter_corpus
from humpback_runtime.spec import CorpusSpec
rows = [json.loads(line) for line in open(sys.argv[1], encoding="utf-8")]
rows += [{"text": r["text"].upper()} for r in rows[:100]]
counts = CorpusCounts()
out = list(filter_corpus([(str(i), r) for i, r in enumerate(rows)], CorpusSpec(source="x"), counts))
print(hashlib.sha256(json.dumps([out, counts.as_dict()], sort_keys=True).encode()).hexdigest())
"""


def test_output_does_not_depend_on_the_python_hash_seed():
    digests = set()
    for seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": seed, "PYTHONPATH": str(ROOT)}
        done = subprocess.run([sys.executable, "-c", DIGEST_SCRIPT, str(C4)], env=env, cwd=ROOT,
                              capture_output=True, text=True, timeout=120, check=True)
        digests.add(done.stdout.strip())
    assert len(digests) == 1


def test_duplicate_ids_are_made_unique_and_counted(in_window):
    rows = [{"text": in_window[0], "url": "u"}, {"text": in_window[1], "url": "u"}, {"text": in_window[2], "url": "u"},
            {"text": in_window[3], "url": "u#2"}]
    counts = CorpusCounts()
    out = list(filter_corpus(((f"f:{i}", r) for i, r in enumerate(rows, 1)),
                             CorpusSpec(source="x", id_field="url", dedup={"nearDuplicates": False}), counts))
    assert [s["id"] for s in out] == ["u", "u#2", "u#3", "u#2#2"]
    assert counts.duplicate_ids_renamed == 3 and counts.kept == 4


# --- batches --------------------------------------------------------------------------------


def test_batches_decide_as_one_document_at_a_time(c4, in_window):
    # filter_corpus works 256 documents at a time: duplicates within a batch, across batches and
    # of documents removed by earlier filters are decided as the one-at-a-time filter decides.
    rows = c4 + [{"text": change_words(t, 3)} for t in in_window[:300]] + [{"text": t.upper()} for t in in_window[::7]]
    batched, counts = run(spec(), rows)
    one_counts = CorpusCounts()
    one = CorpusFilter(spec(), one_counts)
    single = [s for i, r in enumerate(rows) if (s := one.process(f"c4_sample.jsonl:{i + 1}", r.get("text")))]
    assert batched == single and counts == one_counts
    assert counts.near_duplicate > 200 and counts.exact_duplicate > 70  # short texts: 3 words are more
    pair = [{"text": in_window[0]}, {"text": change_words(in_window[0], 2)}]
    assert len(run(spec(), pair)[0]) == 1  # both in one batch


def test_batch_normalisation_equals_one_text_at_a_time(c4):
    texts = [r["text"] for r in c4[:300]] + ["", "  ", "—", " lead and trail ", "x\u00a0\u00a0y", "\u201cq\u201d",
                                              "caf\u00e9 \u6f22\u5b57\u3002", "\ud83d lone", "a_b", "\u2070\u00b2 \u2122"]
    batch = normalised_utf8_many(texts)
    assert [b.decode("utf-8", "surrogatepass") for b in batch] == [normalise(t) for t in texts]
    assert batch[:3] == normalised_utf8_many(texts[:3]) and batch[-5:] == normalised_utf8_many(texts[-5:])


def test_the_near_duplicate_step_does_not_import_datasketch():
    # datasketch imports scipy (about a second per stage start); its permutations are drawn here.
    code = ("import sys\nfrom humpback_runtime.corpus import filter_corpus\nfrom humpback_runtime.spec import CorpusSpec\n"
            "list(filter_corpus([('a', {'text': 'word ' * 200 + '. end. end. end.'})], CorpusSpec(source='x')))\n"
            "print(sorted(m for m in ('datasketch', 'scipy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"
