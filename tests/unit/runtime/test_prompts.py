"""One module owns every prompt: training equals inference, tags never swap, scores parse strictly."""

from __future__ import annotations

import json
import math
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest

from humpback_runtime import prompts as P
from humpback_runtime.prompts import LogprobScore, TrainingExample
from humpback_runtime.spec import SystemPrompts

REPO = Path(__file__).resolve().parents[3]
DATA = REPO / "examples" / "data"

TAGS = SystemPrompts()
SEED_TAG = "Answer in the style of an AI Assistant."
AUG_TAG = "Answer with knowledge from web search."

INSTRUCTION = "Name three species of whale and one fact about each."
RESPONSE = "1. Humpback whale: sings complex songs.\n2. Blue whale: the largest animal.\n3. Orca: hunts in pods."


def oasst_pairs() -> list[tuple[str, str]]:
    with open(DATA / "oasst1_pairs.jsonl", encoding="utf-8") as fh:
        rows = [json.loads(line) for line in fh if line.strip()]
    return [(r["instruction"], r["response"]) for r in rows]


# --- system tags and the forward model --------------------------------------------------------


def test_spec_defaults_are_the_papers_tags():
    assert TAGS.seed == SEED_TAG
    assert TAGS.augmented == AUG_TAG


def test_seed_and_augmented_tags_are_never_swapped():
    assert P.seed_system(TAGS) == SEED_TAG
    assert P.augmented_system(TAGS) == AUG_TAG
    seed_ex = P.forward_example(INSTRUCTION, RESPONSE, P.seed_system(TAGS))
    aug_ex = P.forward_example(INSTRUCTION, RESPONSE, P.augmented_system(TAGS))
    assert seed_ex.prompt.startswith(SEED_TAG + "\n\n") and AUG_TAG not in seed_ex.prompt
    assert aug_ex.prompt.startswith(AUG_TAG + "\n\n") and SEED_TAG not in aug_ex.prompt


def test_inference_system_is_the_seed_tag_every_forward_model_trained_with():
    # M0 trains on seed examples only (seed tag); it must never be prompted with the web tag.
    assert P.inference_system(TAGS) == SEED_TAG
    prompt = P.forward_prompt(INSTRUCTION, P.inference_system(TAGS))
    assert AUG_TAG not in prompt
    assert prompt == P.forward_example(INSTRUCTION, RESPONSE, P.seed_system(TAGS)).prompt


def test_custom_tags_flow_through():
    tags = SystemPrompts(seed="  Be an assistant.  ", augmented="Use the web.")
    assert P.inference_system(tags) == "Be an assistant."
    assert P.forward_prompt("Hi?", P.seed_system(tags)).startswith("Be an assistant.\n\n")


def test_blank_tag_is_an_error_not_a_silent_untagged_prompt():
    tags = SystemPrompts.model_construct(seed="   ", augmented=AUG_TAG)
    with pytest.raises(ValueError, match="systemPrompts.seed"):
        P.inference_system(tags)


def test_forward_prompt_golden():
    assert P.forward_prompt(INSTRUCTION, P.inference_system(TAGS)) == (
        "Answer in the style of an AI Assistant.\n\n"
        "### Instruction:\nName three species of whale and one fact about each.\n\n"
        "### Response:\n"
    )
    assert P.forward_prompt("Hi?", "") == "### Instruction:\nHi?\n\n### Response:\n"


@pytest.mark.parametrize("system", [SEED_TAG, AUG_TAG, f"{SEED_TAG} {AUG_TAG}", ""])
def test_training_prompt_equals_inference_prompt(system):
    for instruction, response in [(INSTRUCTION, RESPONSE), *oasst_pairs()[:50]]:
        ex = P.forward_example(instruction, response, system)
        inference = P.forward_prompt(instruction, system)
        assert isinstance(ex, TrainingExample)
        assert ex.prompt == inference
        assert ex.text == ex.prompt + ex.completion
        assert (ex.prompt + ex.completion).startswith(inference)
        # What the model learns to write after the prompt is the response itself, nothing more.
        assert ex.completion == response.strip()
        assert not ex.completion.endswith("</s>")


def test_only_surrounding_whitespace_is_stripped():
    ex = P.forward_example("  \n What is 2+2?\r\n", "\n\n  It is 4.\n\n  Done.  \n", SEED_TAG)
    assert "### Instruction:\nWhat is 2+2?\n\n### Response:\n" in ex.prompt
    assert ex.completion == "It is 4.\n\n  Done."
    # Braces in user text are data, not format fields.
    assert "{system}" in P.forward_prompt("print('{system}')", SEED_TAG)


@pytest.mark.parametrize(
    "call",
    [
        lambda: P.forward_prompt("   ", SEED_TAG),
        lambda: P.forward_example(INSTRUCTION, "\n\t ", SEED_TAG),
        lambda: P.backward_prompt(""),
        lambda: P.backward_example("", RESPONSE),
        lambda: P.curation_prompt(" ", RESPONSE),
        lambda: P.rewrite_prompt(INSTRUCTION, ""),
        lambda: P.instruction_only_prompt("\n"),
    ],
)
def test_empty_text_is_rejected(call):
    with pytest.raises(ValueError, match="empty"):
        call()


# --- the backward model -----------------------------------------------------------------------


def test_backward_example_reverses_the_pair():
    ex = P.backward_example(INSTRUCTION, RESPONSE)
    assert RESPONSE in ex.prompt
    assert INSTRUCTION not in ex.prompt
    assert ex.completion == INSTRUCTION
    assert ex.prompt == P.backward_prompt(RESPONSE)
    assert ex.prompt == (
        f"### Response:\n{RESPONSE}\n\n### Instruction that this is the answer to:\n"
    )


def test_backward_prompt_differs_from_every_forward_prompt():
    back = P.backward_prompt(RESPONSE)
    for system in (SEED_TAG, AUG_TAG, P.inference_system(TAGS), ""):
        fwd = P.forward_prompt(RESPONSE, system)
        assert back != fwd
        assert not fwd.endswith("### Instruction that this is the answer to:\n")
        assert not back.endswith("### Response:\n")
        assert "### Instruction:\n" not in back


# --- curation, instruction-only, rewriting, judging -------------------------------------------

RUBRIC_LINES = [
    "1: It means the answer is incomplete, vague, off-topic, controversial, or not exactly what the user asked for.",
    "2: It means the answer addresses most of the asks from the user.",
    "3: It means the answer is helpful but not written by an AI Assistant.",
    "4: It means the answer is written from an AI assistant's perspective with a clear focus of addressing the instruction.",
    "5: It means it is a perfect answer from an AI Assistant.",
]


def test_curation_prompt_carries_the_papers_rubric():
    text = P.curation_prompt(INSTRUCTION, RESPONSE)
    assert text.startswith(
        "Below is an instruction from an user and a candidate answer. Evaluate whether or not the "
        "answer is a good example of how AI Assistant should respond to the user's instruction. "
        "Please assign a score using the following 5-point scale:\n1: "
    )
    lines = text.splitlines()
    for rubric_line in RUBRIC_LINES:
        assert any(line.startswith(rubric_line) for line in lines), rubric_line
    assert [line[:2] for line in lines if re.match(r"^[1-5]: ", line)] == ["1:", "2:", "3:", "4:", "5:"]
    assert (
        'Please first provide a brief reasoning you used to derive the rating score, and then write '
        '"Score: <rating>" in the last line.'
    ) in text
    assert INSTRUCTION in text and RESPONSE in text
    assert text.index("5: It means") < text.index(INSTRUCTION) < text.index(RESPONSE)


def test_curation_prompt_ends_with_the_answer_and_logprob_prompt_with_score():
    gen = P.curation_prompt(INSTRUCTION, RESPONSE)
    assert gen.endswith("\n\nAnswer:\n" + RESPONSE)
    lp = P.curation_logprob_prompt(INSTRUCTION, RESPONSE)
    assert lp == gen + "\n\nScore:"
    assert lp.endswith("Score:")


def test_curation_prompt_for_a_model_trained_here_uses_the_forward_template():
    system = P.inference_system(TAGS)
    gen = P.curation_prompt(INSTRUCTION, RESPONSE, system=system)
    assert gen == P.forward_prompt(P.curation_prompt(INSTRUCTION, RESPONSE), system)
    assert gen.endswith("### Response:\n")
    lp = P.curation_logprob_prompt(INSTRUCTION, RESPONSE, system=system)
    assert lp == gen + "Score:"
    assert P.curation_logprob_prompt(INSTRUCTION, RESPONSE, system=system, score_prefix="Score: ") == gen + "Score: "
    with pytest.raises(ValueError, match="score_prefix"):
        P.curation_logprob_prompt(INSTRUCTION, RESPONSE, score_prefix="Rating:")


def test_instruction_only_prompts_rate_the_instruction_alone():
    gen = P.instruction_only_prompt(INSTRUCTION)
    assert INSTRUCTION in gen and RESPONSE not in gen
    assert gen.endswith("Instruction:\n" + INSTRUCTION)
    assert [line[:2] for line in gen.splitlines() if re.match(r"^[1-5]: ", line)] == ["1:", "2:", "3:", "4:", "5:"]
    for word in ("clear", "answer", "useful"):
        assert word in gen.lower()
    assert '"Score: <rating>" in the last line.' in gen
    assert P.instruction_only_logprob_prompt(INSTRUCTION) == gen + "\n\nScore:"
    system = P.seed_system(TAGS)
    assert P.instruction_only_logprob_prompt(INSTRUCTION, system=system) == (
        P.forward_prompt(gen, system) + "Score:"
    )


def test_rewrite_prompt_keeps_facts_and_asks_for_the_answer_only():
    text = P.rewrite_prompt(INSTRUCTION, RESPONSE)
    assert text.endswith("Answer:\n" + RESPONSE)
    assert INSTRUCTION in text
    lower = text.lower()
    for phrase in ("ai assistant", "keep its content and facts", "do not add facts", "preamble", "output only the rewritten answer"):
        assert phrase in lower, phrase
    assert P.rewrite_prompt(INSTRUCTION, RESPONSE, system=SEED_TAG) == P.forward_prompt(text, SEED_TAG)


def test_pairwise_judge_prompt_and_verdicts():
    text = P.pairwise_judge_prompt(INSTRUCTION, "first", "")
    assert text.endswith("Answer A:\nfirst\n\nAnswer B:\n")
    assert '"Verdict: A", "Verdict: B" or "Verdict: tie" in the last line' in text
    cases = {
        "I prefer A.\nVerdict: A": "A",
        "verdict: b": "B",
        "**Verdict: tie**": "tie",
        "**Verdict:** B.": "B",
        "Verdict: A\nActually B is better.": None,
        "Verdict: C": None,
        "Verdict: A or B": None,
        "": None,
    }
    for raw, expected in cases.items():
        assert P.parse_verdict(raw) == expected, raw


# --- parse_score ------------------------------------------------------------------------------

PARSE_CASES = [
    # valid
    ("Score: 5", 5),
    ("Score: 1", 1),
    ("The answer is good.\nScore: 4", 4),
    ("Reasoning line one.\nReasoning line two.\n\nScore: 3\n", 3),
    ("score: 2", 2),
    ("SCORE: 5", 5),
    ("  Score:5  ", 5),
    ("Score :\t3", 3),
    ("Score: 5.", 5),
    ("**Score: 5**", 5),
    ("**Score:** 4", 4),
    ("**Score: 4.**", 4),
    ("**Score: 4**.", 4),
    ("Great answer.\r\nScore: 5\r\n", 5),
    ("Old Mac line endings.\rScore: 2\r", 2),
    ("Score: 5\n\n   \n\t\n", 5),
    ("Score: 1\nScore: 5", 5),  # the last line decides
    # invalid: out of range, not an integer, not alone
    ("Score: 0", None),
    ("Score: 6", None),
    ("Score: 10", None),
    ("Score: -5", None),
    ("Score: 05", None),
    ("Score: 4.5", None),
    ("Score: 5.0", None),
    ("Score: 3/5", None),
    ("Score: 4 or 5", None),
    ("Score: 4-5", None),
    ("Score: five", None),
    ("Score: <5>", None),
    ("Score: 5 (excellent)", None),
    ("Score: 5**", None),
    ("**Score: 5.**.", None),
    ("Score: \uff15", None),  # fullwidth digit five
    ("\u017fcore: 5", None),  # long s: would match "score" under Unicode case folding
    ("Final Score: 5", None),
    ("My score: 5", None),
    ("Score 5", None),
    ("Score: 5</s>", None),
    # a score on an earlier line with other text after it
    ("Score: 5\nThe answer is perfect.", None),
    ("Reasoning.\nScore: 4\nBut on reflection it is a 2.", None),
    ("The answer deserves Score: 5 in my view.", None),
    # nothing there
    ("", None),
    ("   \n\n\t", None),
    ("The answer is fine.", None),
    ("Score:", None),
]


def test_parse_score_table_is_large_enough():
    assert len(PARSE_CASES) >= 20
    assert any(r is None for _, r in PARSE_CASES) and any(r is not None for _, r in PARSE_CASES)


@pytest.mark.parametrize(("text", "expected"), PARSE_CASES)
def test_parse_score(text, expected):
    assert P.parse_score(text) == expected


def test_parse_score_of_non_text_is_none():
    assert P.parse_score(None) is None  # type: ignore[arg-type]
    assert P.parse_score(b"Score: 5") is None  # type: ignore[arg-type]


def test_parse_score_never_raises_and_returns_only_none_or_1_to_5():
    rng = random.Random(20230812)
    pieces = [
        "Score", "score", "SCORE", ":", " ", "\t", "\n", "\r\n", "\r", "*", "**", ".", "0", "1", "2",
        "3", "4", "5", "6", "9", "10", "/", "-", "or", "a", "Answer", "\u00a0", "\u2028", "\u017f",
        "\uff15", "\x00", "\ud7ff", "é", "🐋", "<", ">", "(", ")", "[[", "]]",
    ]
    seen = set()
    for _ in range(5000):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 20)))
        result = P.parse_score(text)
        seen.add(result)
        assert result is None or (type(result) is int and 1 <= result <= 5), (text, result)
        if result is not None:
            last = [line for line in text.splitlines() if line.strip()][-1]
            assert str(result) in last and "score" in last.lower()
    for _ in range(2000):
        text = "".join(chr(rng.randint(0, 0x2FFF)) for _ in range(rng.randint(0, 40)))
        result = P.parse_score(text)
        assert result is None or result in P.SCORES
    assert None in seen


def test_parse_score_round_trips_generated_answers():
    rng = random.Random(7)
    words = ["The", "answer", "is", "clear", "helpful", "but", "long", "and", "vague", "Score", "5/5", "4."]
    for _ in range(500):
        reasoning = " ".join(rng.choice(words) for _ in range(rng.randint(0, 30)))
        n = rng.choice(P.SCORES)
        eol = rng.choice(["\n", "\r\n"])
        assert P.parse_score(f"{reasoning}{eol}Score: {n}{eol}") == n
        assert P.parse_score(f"{reasoning}{eol}Score: {n}{eol}{reasoning} more") is None


# --- score_from_top_logprobs ------------------------------------------------------------------


def test_leading_space_variants_are_summed_and_renormalised():
    top = {" 5": math.log(0.3), "5": math.log(0.1), " 4": math.log(0.2), "\n": math.log(0.4)}
    score = P.score_from_top_logprobs(top)
    assert isinstance(score, LogprobScore)
    assert score.mass == pytest.approx(0.6)
    assert score.probs == pytest.approx({1: 0.0, 2: 0.0, 3: 0.0, 4: 1 / 3, 5: 2 / 3})
    assert sum(score.probs.values()) == pytest.approx(1.0)
    assert score.argmax == 5
    assert score.expected == pytest.approx(4 * (1 / 3) + 5 * (2 / 3))


def test_expected_value_and_argmax_over_all_five():
    probs = {1: 0.05, 2: 0.1, 3: 0.15, 4: 0.3, 5: 0.4}
    score = P.score_from_top_logprobs({f" {d}": math.log(p) for d, p in probs.items()})
    assert score.mass == pytest.approx(1.0)
    assert score.probs == pytest.approx(probs)
    assert score.expected == pytest.approx(sum(d * p for d, p in probs.items()))
    assert score.argmax == 5


def test_non_score_tokens_are_ignored_but_lower_the_mass():
    top = {" 3": math.log(0.05), " The": math.log(0.5), " 5.": math.log(0.2), " 55": math.log(0.1), " 6": math.log(0.1)}
    score = P.score_from_top_logprobs(top)
    assert score.mass == pytest.approx(0.05)
    assert score.probs[3] == pytest.approx(1.0)
    assert score.argmax == 3 and score.expected == pytest.approx(3.0)


def test_raw_token_markers_count_as_spaces():
    score = P.score_from_top_logprobs({"\u01205": math.log(0.5), "\u25814": math.log(0.5)})
    assert score.probs[5] == pytest.approx(0.5) and score.probs[4] == pytest.approx(0.5)


def test_ties_go_to_the_lower_score():
    score = P.score_from_top_logprobs({" 4": math.log(0.5), " 5": math.log(0.5)})
    assert score.argmax == 4
    assert score.expected == pytest.approx(4.5)


@pytest.mark.parametrize(
    "top",
    [{}, None, {" The": -0.1, "\n": -2.0, " 6": -1.0, "0": -1.0}, {" 5": float("-inf")}, {" 5": float("nan")}],
)
def test_no_score_token_gives_none(top):
    assert P.score_from_top_logprobs(top) is None


# --- templates are plain, versioned, deterministic --------------------------------------------


def test_templates_are_plain_versioned_strings():
    assert type(P.TEMPLATE_VERSION) is int and P.TEMPLATE_VERSION >= 1
    for name in ("FORWARD_TEMPLATE", "FORWARD_TEMPLATE_NO_SYSTEM", "BACKWARD_TEMPLATE", "CURATION_RUBRIC",
                 "INSTRUCTION_ONLY_RUBRIC", "REWRITE_TASK", "JUDGE_TASK", "SCORE_PREFIX"):
        text = getattr(P, name)
        assert type(text) is str, name
        assert "{%" not in text and "{{" not in text and "{#" not in text, name
        assert text.isascii(), name
    builders = [
        lambda: P.forward_prompt(INSTRUCTION, P.inference_system(TAGS)),
        lambda: P.forward_example(INSTRUCTION, RESPONSE, SEED_TAG),
        lambda: P.backward_example(INSTRUCTION, RESPONSE),
        lambda: P.curation_prompt(INSTRUCTION, RESPONSE),
        lambda: P.curation_logprob_prompt(INSTRUCTION, RESPONSE, system=SEED_TAG),
        lambda: P.instruction_only_prompt(INSTRUCTION),
        lambda: P.rewrite_prompt(INSTRUCTION, RESPONSE),
        lambda: P.pairwise_judge_prompt(INSTRUCTION, "a", "b"),
    ]
    for build in builders:
        assert build() == build()


def test_template_edits_need_a_version_bump():
    # Changed a template? Bump TEMPLATE_VERSION and update the digest here: stages fingerprint both.
    assert (P.TEMPLATE_VERSION, P.template_digest()) == (
        3,
        "5581850ae400dacb305ca383d64bbb053cf67111f24c44b6ede3b026d82753d8",
    )


def test_module_imports_without_heavy_dependencies():
    code = (
        "import sys; import humpback_runtime.prompts; "
        "heavy = [m for m in ('torch', 'transformers', 'pydantic', 'yaml', 'vllm') if m in sys.modules]; "
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


# --- token-level boundary with a real tokenizer -----------------------------------------------


class _CharEncoder:
    """Every character one token: " 5" is two tokens, like Llama-3 / cl100k / Qwen pre-tokenizers."""

    def __call__(self, text):
        return [ord(c) for c in text]


def _gpt2_like(text):
    """' 5' is one token (GPT-2-style byte-level BPE)."""
    return [hash(t) & 0xFFFF for t in re.findall(r" ?\d|\w+|\s|[^\w\s]", text)]


def _merges_colon_digit(text):
    """': 5' is one token: no prompt ending leaves the digit alone in the next token."""
    return [hash(t) & 0xFFFF for t in re.findall(r": \d|\w+|\s|[^\w\s]", text)]


def test_logprob_score_prefix_follows_the_tokenizer():
    assert P.logprob_score_prefix(_gpt2_like) == "Score:"
    assert P.logprob_score_prefix(_CharEncoder()) == "Score: "
    with pytest.raises(ValueError, match="generate"):
        P.logprob_score_prefix(_merges_colon_digit)


@pytest.fixture(scope="module")
def tiny_tokenizer(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("tokenizers")
    model_dir = REPO / ".cache" / "tiny-llama"
    if not (model_dir / "tokenizer.json").is_file():
        from humpback_runtime.tiny_model import build_tiny_model

        model_dir = build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")
    return transformers.AutoTokenizer.from_pretrained(str(model_dir))


EDGE_RESPONSES = [
    "Sure! Here you go.",
    "- a bullet\n- another",
    "```python\nprint('hi')\n```",
    "42 is the answer.",
    "'Tis the season.",
    "'s a contraction start",
    "  indented first line gets stripped",
    "\n\nleading newlines get stripped",
    "Grüße 🐋 中文",
    "### Heading in the answer",
    ":colon first",
]


def _assert_prefix(tokenizer, prompt, completion):
    p_ids = tokenizer(prompt).input_ids
    full_ids = tokenizer(prompt + completion).input_ids
    assert full_ids[: len(p_ids)] == p_ids, (prompt[-40:], completion[:40])
    assert len(full_ids) > len(p_ids)


def test_prompt_tokens_are_a_prefix_of_prompt_plus_completion(tiny_tokenizer):
    pairs = oasst_pairs() + [(INSTRUCTION, r) for r in EDGE_RESPONSES]
    for instruction, response in pairs:
        for system in (SEED_TAG, AUG_TAG, P.inference_system(TAGS), ""):
            ex = P.forward_example(instruction, response, system)
            _assert_prefix(tiny_tokenizer, ex.prompt, ex.completion)
            _assert_prefix(tiny_tokenizer, P.forward_prompt(instruction, system), ex.completion)
        ex = P.backward_example(response, instruction)
        _assert_prefix(tiny_tokenizer, ex.prompt, ex.completion)
        ex = P.backward_example(instruction, response)
        _assert_prefix(tiny_tokenizer, ex.prompt, ex.completion)


def test_logprob_prompt_leaves_the_score_as_one_next_token(tiny_tokenizer):
    def encode(text):
        return tiny_tokenizer(text, add_special_tokens=False).input_ids

    prefix = P.logprob_score_prefix(encode)
    assert prefix == "Score:"
    prompt = P.curation_logprob_prompt(INSTRUCTION, RESPONSE, system=P.inference_system(TAGS), score_prefix=prefix)
    for d in P.SCORES:
        p_ids, full_ids = encode(prompt), encode(prompt + f" {d}")
        assert full_ids[: len(p_ids)] == p_ids
        assert len(full_ids) == len(p_ids) + 1
        token = tiny_tokenizer.convert_ids_to_tokens(full_ids[-1])
        assert P.score_from_top_logprobs({tiny_tokenizer.decode([full_ids[-1]]): 0.0}).argmax == d, token
