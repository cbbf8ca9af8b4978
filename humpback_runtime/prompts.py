"""Every prompt string humpback shows a model: training, augmentation, curation, rewriting, evaluation.

Earlier public implementations of instruction backtranslation swapped the system-prompt tags and
trained and inferred with different templates. Here one module builds every prompt, every stage
calls it, and :data:`TEMPLATE_VERSION` (plus :func:`template_digest`) goes into the stage
fingerprints, so a template edit re-runs whatever depends on it. Pure functions over strings, the
standard library only (no torch, no transformers), so the operator-side code may import it too::

    from humpback_runtime import prompts
    system = prompts.inference_system(run.spec.system_prompts)   # the seed tag, as in training
    text = prompts.forward_prompt("Name three whales.", system)   # what M0 or Mk sees before answering

Formats (base models and the demo's tiny model have no chat template, so the format is plain text
and owned here):

* forward model (M0, Mk): ``"{system}\\n\\n### Instruction:\\n{instruction}\\n\\n### Response:\\n"``,
  completion ``"{response}"``. With an empty system the first block (and its blank line) is left out.
* backward model (Myx, p(instruction | response)):
  ``"### Response:\\n{response}\\n\\n### Instruction that this is the answer to:\\n"``, completion
  ``"{instruction}"``. No system text (the paper tags only the forward model's data).
* curation, instruction-only rating, rewriting: a task text (the paper's rubric and the pair) that
  is the *instruction* of a forward-model prompt. Pass ``system=`` to get the complete text for a
  model trained here (M(k-1)); leave it out to get the bare task text for an external chat model
  (one user message) or a plain base model.

Rules that keep training and inference identical:

* ``prompt + completion`` of a training example is exactly the inference prompt followed by the
  model's answer; :class:`TrainingExample` carries the two halves so the trainer computes the loss
  on the completion tokens only. Every prompt ends in ``"\\n"`` and every completion starts with a
  non-space character, so for the usual pre-tokenizers (GPT-2/Llama-3-style byte-level BPE,
  SentencePiece) the tokens of the prompt are a prefix of the tokens of prompt + completion
  (tested with the tiny model's tokenizer): the prompt's token count is the loss-mask boundary.
* The EOS token is not part of any string here: the trainer appends the tokenizer's EOS id to the
  completion, and inference stops on it.
* User text (instructions, responses, answers, system tags) loses leading and trailing whitespace
  (``str.strip()``) and nothing else: no newline or Unicode normalisation inside the text. Empty
  text (after stripping) is a ``ValueError``; stages drop such records (and count them) before they
  build a prompt. The one exception is the answers in :func:`pairwise_judge_prompt`: an empty
  answer is a legitimate (bad) answer to judge.
* System tags: seed examples carry ``SystemPrompts.seed`` ("Answer in the style of an AI
  Assistant."), augmented ones ``SystemPrompts.augmented`` ("Answer with knowledge from web
  search."). M0 trains on seed examples only, so with the seed tag only; Mk on both. Every stage
  that prompts a forward model (curation, self-rewriting, evaluation) uses
  :func:`inference_system`, the seed tag: a text every forward model saw on each of its seed
  examples, so what a model sees at inference is exactly a system text it was trained with, and
  M0 and Mk answer evaluation prompts under the same text. (Li et al. 2023, Table 8, report a
  slightly higher win rate for Mk prompted with both tags concatenated, a text never seen in
  training; docs/method.md lists this deviation.)

Chat templates: :func:`chat_template` gives the Jinja chat template of a published model's tokenizer
(the publish stage writes it), so that ``tokenizer.apply_chat_template(messages,
add_generation_prompt=True)`` and a chat API (vLLM's ``/v1/chat/completions``) render exactly
:func:`forward_turn_prompt` (forward models; a missing system message means the seed tag, as at
inference here) or :func:`backward_prompt` (Myx). They are derived from the templates above and
tested against them token for token; they are not part of :func:`template_digest`, since only the
publish stage writes them (its fingerprint carries TEMPLATE_VERSION and its own code version).

Scores: the paper's generate-then-parse protocol (a brief reasoning, then ``Score: N`` on the last
line) is parsed by the strict :func:`parse_score`; the logprob protocol (the prompt ends with
``Score:``, the model's next-token distribution over the digits 1..5) is read by
:func:`score_from_top_logprobs` and is never unparsable.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:  # the spec module pulls in pydantic; this module stays standard-library only
    from humpback_runtime.spec import SystemPrompts

__all__ = [
    "BACKWARD_TEMPLATE",
    "CURATION_RUBRIC",
    "FORWARD_TEMPLATE",
    "FORWARD_TEMPLATE_NO_SYSTEM",
    "INSTRUCTION_ONLY_RUBRIC",
    "JUDGE_TASK",
    "LogprobScore",
    "REWRITE_TASK",
    "SCORES",
    "SCORE_PREFIX",
    "TEMPLATE_VERSION",
    "TrainingExample",
    "augmented_system",
    "backward_example",
    "backward_prompt",
    "chat_template",
    "curation_logprob_prompt",
    "curation_prompt",
    "forward_example",
    "forward_prompt",
    "forward_turn_prompt",
    "mt_bench_judge_prompt",
    "parse_rating",
    "inference_system",
    "instruction_only_logprob_prompt",
    "instruction_only_prompt",
    "logprob_score_prefix",
    "pairwise_judge_prompt",
    "parse_score",
    "parse_verdict",
    "rewrite_prompt",
    "score_from_top_logprobs",
    "seed_system",
    "template_digest",
]

# Bump whenever any template text below changes; stages put it into their fingerprints. The unit
# tests pin (TEMPLATE_VERSION, template_digest()) so an edit without a bump fails loudly.
# 2: forward models are prompted with the seed tag only (was: both tags); 3: MT-Bench judge prompts
# and the forward template's next turn.
TEMPLATE_VERSION: int = 3

SCORES: tuple[int, ...] = (1, 2, 3, 4, 5)

# --- templates --------------------------------------------------------------------------------
# Plain str.format templates: user text goes in as format *arguments*, so braces in it are inert.

FORWARD_TEMPLATE = "{system}\n\n### Instruction:\n{instruction}\n\n### Response:\n"
FORWARD_TEMPLATE_NO_SYSTEM = "### Instruction:\n{instruction}\n\n### Response:\n"
# A later turn of a conversation (MT-Bench's second question): appended after the previous answer.
FORWARD_NEXT_TURN_TEMPLATE = "\n\n### Instruction:\n{instruction}\n\n### Response:\n"
BACKWARD_TEMPLATE = "### Response:\n{response}\n\n### Instruction that this is the answer to:\n"

# What the model writes first on the line that carries its rating (and where a logprob prompt stops).
SCORE_PREFIX = "Score:"

_REASON_THEN_SCORE = (
    'Please first provide a brief reasoning you used to derive the rating score, and then write '
    '"Score: <rating>" in the last line.'
)

# Li et al. 2023, Table 1 / appendix (self-curation prompt), verbatim but with ASCII apostrophes.
CURATION_RUBRIC = (
    "Below is an instruction from an user and a candidate answer. Evaluate whether or not the "
    "answer is a good example of how AI Assistant should respond to the user's instruction. "
    "Please assign a score using the following 5-point scale:\n"
    "1: It means the answer is incomplete, vague, off-topic, controversial, or not exactly what the "
    "user asked for. For example, some content seems missing, numbered list does not start from the "
    "beginning, the opening sentence repeats user's question. Or the response is from another "
    "person's perspective with their personal experience (e.g. taken from blog posts), or looks "
    "like an answer from a forum. Or it contains promotional text, navigation text, or other "
    "irrelevant information.\n"
    "2: It means the answer addresses most of the asks from the user. It does not directly address "
    "the user's question. For example, it only provides a high-level methodology instead of the "
    "exact solution to user's question.\n"
    "3: It means the answer is helpful but not written by an AI Assistant. It addresses all the "
    "basic asks from the user. It is complete and self contained with the drawback that the "
    "response is not written from an AI assistant's perspective, but from other people's "
    "perspective. The content looks like an excerpt from a blog post, web page, or web search "
    "results. For example, it contains personal experience or opinion, mentions comments section, "
    "or share on social media, etc.\n"
    "4: It means the answer is written from an AI assistant's perspective with a clear focus of "
    "addressing the instruction. It provide a complete, clear, and comprehensive response to user's "
    "question or instruction without missing or irrelevant information. It is well organized, "
    "self-contained, and written in a helpful tone. It has minor room for improvement, e.g. more "
    "concise and focused.\n"
    "5: It means it is a perfect answer from an AI Assistant. It has a clear focus on being a "
    "helpful AI Assistant, where the response looks like intentionally written to address the "
    "user's question or instruction without any irrelevant sentences. The answer provides high "
    "quality content, demonstrating expert knowledge in the area, is very well written, logical, "
    "easy-to-follow, engaging and insightful.\n\n" + _REASON_THEN_SCORE
)
# The paper puts the instruction and the answer bare under the rubric; the labels are ours, so that
# a multi-paragraph instruction cannot run into the answer.
_CURATION_TASK = CURATION_RUBRIC + "\n\nInstruction:\n{instruction}\n\nAnswer:\n{response}"

# Kun-style (Zheng et al. 2024) quality filter on the instruction alone, in the paper's protocol.
INSTRUCTION_ONLY_RUBRIC = (
    "Below is an instruction that a user might give to an AI Assistant. Evaluate whether or not it "
    "is a good instruction to teach an AI Assistant with: clear, answerable and useful. Please "
    "assign a score using the following 5-point scale:\n"
    "1: It means the text is not a usable instruction. It is incoherent, contains no request, or "
    "cannot be answered without context that is missing (an attachment, a link, an earlier "
    "conversation, a specific web page). Or it is promotional text, navigation text, or other "
    "irrelevant information.\n"
    "2: It means the instruction contains a request, but it is vague or ambiguous: an assistant "
    "would have to guess what the user wants, or most of a good answer depends on missing "
    "context.\n"
    "3: It means the instruction is understandable and answerable, but of limited use. It is "
    "trivial, overly narrow, or underspecified in ways that an assistant could only partly "
    "resolve.\n"
    "4: It means the instruction is clear, self-contained and answerable, and asks for something "
    "useful. It has minor room for improvement, e.g. more specific about the expected scope or "
    "format.\n"
    "5: It means it is a perfect instruction for an AI Assistant. It is clear, specific and "
    "self-contained, an AI Assistant can answer it well without further context, and the answer "
    "would be genuinely helpful to the user.\n\n" + _REASON_THEN_SCORE
)
_INSTRUCTION_ONLY_TASK = INSTRUCTION_ONLY_RUBRIC + "\n\nInstruction:\n{instruction}"

REWRITE_TASK = (
    "Below is an instruction from an user and a candidate answer taken from a web page. Rewrite "
    "the answer so that it reads as a helpful AI Assistant's response to the instruction. Keep its "
    "content and facts, and do not add facts, numbers, names or links that are not in the "
    "candidate answer. Write from the AI Assistant's perspective instead of a blogger's or a forum "
    "user's, and leave out text that does not address the instruction, such as navigation text, "
    "promotional text or mentions of comments sections. Do not add a preamble or a closing remark "
    "about the rewriting. Output only the rewritten answer.\n\n"
    "Instruction:\n{instruction}\n\nAnswer:\n{response}"
)

# Pairwise judging for the evaluate stage (any OpenAI-compatible judge). Run both orders (A/B and
# B/A) to cancel position bias; the protocol mirrors the curation one: reasoning, then a last line.
JUDGE_TASK = (
    "Please act as an impartial judge and compare the two answers of AI Assistants to the user "
    "instruction below. Decide which answer follows the instruction better and is more helpful, "
    "accurate, relevant, complete and well written. Do not let the order of the answers or their "
    "length influence your decision. Please first provide a brief reasoning, and then write "
    '"Verdict: A", "Verdict: B" or "Verdict: tie" in the last line.\n\n'
    "Instruction:\n{instruction}\n\nAnswer A:\n{answer_a}\n\nAnswer B:\n{answer_b}"
)

# MT-Bench single-answer grading (Zheng et al. 2023, "Judging LLM-as-a-Judge with MT-Bench and
# Chatbot Arena"): the judge prompts "single-v1", "single-math-v1", "single-v1-multi-turn" and
# "single-math-v1-multi-turn" of lm-sys/FastChat, fastchat/llm_judge/data/judge_prompts.jsonl
# (commit 0e6e7fdc78bf64aceea1508694ce4e6472810b8b), Apache-2.0, copyright the FastChat / LMSYS
# authors; verbatim, including their typos ("You evaluation"). (system prompt, user template).
_MT_RATE = ('After providing your explanation, you must rate the response on a scale of 1 to 10 by strictly '
            'following this format: "[[rating]]", for example: "Rating: [[5]]".')
MT_BENCH_SINGLE = (
    "You are a helpful assistant.",
    "[Instruction]\nPlease act as an impartial judge and evaluate the quality of the response provided by an AI "
    "assistant to the user question displayed below. Your evaluation should consider factors such as the "
    "helpfulness, relevance, accuracy, depth, creativity, and level of detail of the response. Begin your "
    "evaluation by providing a short explanation. Be as objective as possible. " + _MT_RATE + "\n\n"
    "[Question]\n{question}\n\n[The Start of Assistant's Answer]\n{answer}\n[The End of Assistant's Answer]",
)
MT_BENCH_SINGLE_MATH = (
    "You are a helpful assistant.",
    "[Instruction]\nPlease act as an impartial judge and evaluate the quality of the response provided by an AI "
    "assistant to the user question displayed below. Your evaluation should consider correctness and "
    "helpfulness. You will be given a reference answer and the assistant's answer. Begin your evaluation by "
    "comparing the assistant's answer with the reference answer. Identify and correct any mistakes. Be as "
    "objective as possible. " + _MT_RATE + "\n\n"
    "[Question]\n{question}\n\n[The Start of Reference Answer]\n{ref_answer_1}\n[The End of Reference Answer]\n\n"
    "[The Start of Assistant's Answer]\n{answer}\n[The End of Assistant's Answer]",
)
_MT_CONVERSATION = (
    "<|The Start of Assistant A's Conversation with User|>\n\n### User:\n{question_1}\n\n### Assistant A:\n"
    "{answer_1}\n\n### User:\n{question_2}\n\n### Assistant A:\n{answer_2}\n\n"
    "<|The End of Assistant A's Conversation with User|>"
)
MT_BENCH_SINGLE_MULTI_TURN = (
    "Please act as an impartial judge and evaluate the quality of the response provided by an AI assistant to "
    "the user question displayed below. Your evaluation should consider factors such as the helpfulness, "
    "relevance, accuracy, depth, creativity, and level of detail of the response. You evaluation should focus "
    "on the assistant's answer to the second user question. Begin your evaluation by providing a short "
    "explanation. Be as objective as possible. " + _MT_RATE + "\n\n",
    _MT_CONVERSATION,
)
MT_BENCH_SINGLE_MATH_MULTI_TURN = (
    "Please act as an impartial judge and evaluate the quality of the response provided by an AI assistant to "
    "the user question. Your evaluation should consider correctness and helpfulness. You will be given a "
    "reference answer and the assistant's answer. You evaluation should focus on the assistant's answer to the "
    "second question. Begin your evaluation by comparing the assistant's answer with the reference answer. "
    "Identify and correct any mistakes. Be as objective as possible. " + _MT_RATE + "\n\n",
    "<|The Start of Reference Answer|>\n\n### User:\n{question_1}\n\n### Reference answer:\n{ref_answer_1}\n\n"
    "### User:\n{question_2}\n\n### Reference answer:\n{ref_answer_2}\n\n<|The End of Reference Answer|>\n\n\n"
    + _MT_CONVERSATION,
)

_ALL_TEMPLATES: tuple[tuple[str, str], ...] = (
    ("forward", FORWARD_TEMPLATE),
    ("forward_no_system", FORWARD_TEMPLATE_NO_SYSTEM),
    ("backward", BACKWARD_TEMPLATE),
    ("score_prefix", SCORE_PREFIX),
    ("curation", _CURATION_TASK),
    ("instruction_only", _INSTRUCTION_ONLY_TASK),
    ("rewrite", REWRITE_TASK),
    ("judge", JUDGE_TASK),
    ("forward_next_turn", FORWARD_NEXT_TURN_TEMPLATE),
    *((f"mt_bench_{name}_{i}", text) for name, pair in (
        ("single", MT_BENCH_SINGLE), ("single_math", MT_BENCH_SINGLE_MATH),
        ("single_multi_turn", MT_BENCH_SINGLE_MULTI_TURN), ("single_math_multi_turn", MT_BENCH_SINGLE_MATH_MULTI_TURN),
    ) for i, text in enumerate(pair)),
    ("inference_system", "seed"),  # which tag forward models see at inference
    ("bare_logprob_join", "\n\n"),
)


def template_digest() -> str:
    """SHA-256 over every template text: a fingerprint input that changes with any template edit."""
    h = hashlib.sha256()
    for name, text in _ALL_TEMPLATES:
        for part in (name, text):
            data = part.encode("utf-8")
            h.update(len(data).to_bytes(8, "little"))
            h.update(data)
    return h.hexdigest()


# --- text hygiene -----------------------------------------------------------------------------


def _clean(text: str, field: str) -> str:
    """``text`` without leading/trailing whitespace; a ValueError when nothing is left."""
    if not isinstance(text, str):
        raise TypeError(f"{field} must be a str, got {type(text).__name__}")
    stripped = text.strip()
    if not stripped:
        raise ValueError(f"{field} is empty (after stripping whitespace); drop the record before building a prompt")
    return stripped


def _clean_system(system: str) -> str:
    if not isinstance(system, str):
        raise TypeError(f"system must be a str, got {type(system).__name__}")
    return system.strip()


# --- system tags ------------------------------------------------------------------------------


def seed_system(tags: SystemPrompts) -> str:
    """The tag of seed (human-written) training examples: ``tags.seed``."""
    return _clean(tags.seed, "systemPrompts.seed")


def augmented_system(tags: SystemPrompts) -> str:
    """The tag of augmented (backtranslated, curated) training examples: ``tags.augmented``."""
    return _clean(tags.augmented, "systemPrompts.augmented")


def inference_system(tags: SystemPrompts) -> str:
    """The system text of every forward model (M0, Mk) at inference: the seed tag, ``tags.seed``.

    Every forward model trained with it (M0 on all its examples, Mk on its seed examples), so an
    inference prompt equals the prompt of a training example with the same instruction, token for
    token. The augmented tag marks web-derived training data only.
    """
    return seed_system(tags)


# --- forward and backward models --------------------------------------------------------------


@dataclass(frozen=True)
class TrainingExample:
    """One supervised example: the loss covers the completion tokens only.

    ``prompt + completion`` is exactly what the model sees at inference followed by its answer.
    The EOS token is not in ``completion``: the trainer appends the tokenizer's EOS id.
    """

    prompt: str
    completion: str
    # The characters of ``prompt`` that hold user text the trainer may cut from its end to fit
    # maxSeqLength (the backward model's response); None: the prompt is kept whole.
    cut_span: tuple[int, int] | None = None

    @property
    def text(self) -> str:
        return self.prompt + self.completion

    def with_cut_text(self, text: str) -> TrainingExample:
        """The same example with the cuttable span replaced by ``text`` (a shortened version of it)."""
        if self.cut_span is None:
            raise ValueError("this example has no cuttable span")
        start, end = self.cut_span
        return TrainingExample(self.prompt[:start] + text + self.prompt[end:], self.completion,
                               (start, start + len(text)))


def forward_prompt(instruction: str, system: str) -> str:
    """What the forward model (M0, Mk) sees before its answer.

    ``"{system}\\n\\n### Instruction:\\n{instruction}\\n\\n### Response:\\n"``; an empty ``system``
    leaves out the first block.
    """
    instruction = _clean(instruction, "instruction")
    system = _clean_system(system)
    if not system:
        return FORWARD_TEMPLATE_NO_SYSTEM.format(instruction=instruction)
    return FORWARD_TEMPLATE.format(system=system, instruction=instruction)


def forward_turn_prompt(history: Sequence[tuple[str, str]], instruction: str, system: str) -> str:
    """A later turn of a conversation: :func:`forward_prompt` of the first question, each earlier
    answer followed by the next question in the same ``### Instruction:`` / ``### Response:`` form.

    ``history`` is ``[(question, answer), ...]`` of the earlier turns; empty, this is
    :func:`forward_prompt`. Used by MT-Bench's second turn (the first answer stays in context).
    """
    if not history:
        return forward_prompt(instruction, system)
    text = forward_prompt(history[0][0], system)
    for i, (_, answer) in enumerate(history):
        following = history[i + 1][0] if i + 1 < len(history) else instruction
        text += answer.strip() + FORWARD_NEXT_TURN_TEMPLATE.format(instruction=_clean(following, "instruction"))
    return text


def forward_example(instruction: str, response: str, system: str) -> TrainingExample:
    """A forward-model training example; ``prompt`` is :func:`forward_prompt` for the same inputs."""
    return TrainingExample(forward_prompt(instruction, system), _clean(response, "response"))


def backward_prompt(response: str) -> str:
    """What the backward model Myx (p(instruction | response)) sees before the instruction it writes."""
    return BACKWARD_TEMPLATE.format(response=_clean(response, "response"))


def backward_example(instruction: str, response: str) -> TrainingExample:
    """A backward-model training example from a seed pair: the response in, the instruction out.

    The response may be cut to fit maxSeqLength (``cut_span``): the instruction is what the model learns.
    """
    response = _clean(response, "response")
    start = BACKWARD_TEMPLATE.index("{response}")
    return TrainingExample(backward_prompt(response), _clean(instruction, "instruction"),
                           (start, start + len(response)))


# --- chat templates of published models -----------------------------------------------------


def _jinja_string(text: str) -> str:
    """``text`` as a Jinja string literal (Jinja reads backslash escapes; other characters as they are)."""
    escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\r", "\\r")
    return f'"{escaped}"'


def chat_template(role: Literal["forward", "backward"], *, default_system: str = "", bos: bool = False) -> str:
    """The Jinja chat template that renders a conversation exactly as this module prompts the model.

    Forward models (M0, Mk): an optional system message (missing: ``default_system``, the seed tag
    the model saw at inference here; empty: no system block), then user and assistant turns; with
    ``add_generation_prompt`` the text ends with ``"### Response:\\n"``: :func:`forward_turn_prompt`
    of the conversation. The backward model (Myx): one user message, the response, rendered as
    :func:`backward_prompt`; the assistant writes the instruction. Contents lose surrounding
    whitespace (Jinja's ``trim`` is ``str.strip``, as here). ``bos``: start with the tokenizer's BOS
    token, for tokenizers that add it when encoding text (vLLM's chat API tokenizes the rendered
    text without special tokens, its completions API with them: both then see the same tokens).
    No EOS after an assistant turn: :func:`forward_turn_prompt` puts none between turns.
    """
    head = "{{- bos_token -}}" if bos else ""
    if role == "backward":
        return (
            head
            + "{%- for message in messages -%}"
            "{%- if message['role'] == 'user' -%}"
            "{{- '### Response:\\n' + message['content'] | trim + '\\n\\n' -}}"
            "{%- elif message['role'] == 'assistant' -%}"
            "{{- '### Instruction that this is the answer to:\\n' + message['content'] | trim -}}"
            "{%- else -%}"
            "{{- raise_exception('the backward model takes a user message (a response) and writes its instruction; "
            "got a ' + message['role'] + ' message') -}}"
            "{%- endif -%}"
            "{%- endfor -%}"
            "{%- if add_generation_prompt -%}{{- '### Instruction that this is the answer to:\\n' -}}{%- endif -%}"
        )
    if role != "forward":
        raise ValueError(f"role must be forward or backward, got {role!r}")
    return (
        "{%- if messages and messages[0]['role'] == 'system' -%}"
        "{%- set system = messages[0]['content'] | trim -%}{%- set turns = messages[1:] -%}"
        "{%- else -%}"
        "{%- set system = " + _jinja_string(_clean_system(default_system)) + " -%}{%- set turns = messages -%}"
        "{%- endif -%}"
        + head
        + "{%- if system -%}{{- system + '\\n\\n' -}}{%- endif -%}"
        "{%- for message in turns -%}"
        "{%- if message['role'] == 'user' -%}"
        "{%- if not loop.first -%}{{- '\\n\\n' -}}{%- endif -%}"
        "{{- '### Instruction:\\n' + message['content'] | trim + '\\n\\n' -}}"
        "{%- elif message['role'] == 'assistant' -%}"
        "{{- '### Response:\\n' + message['content'] | trim -}}"
        "{%- else -%}"
        "{{- raise_exception('unexpected ' + message['role'] + ' message: a system message comes first, then "
        "user and assistant turns') -}}"
        "{%- endif -%}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{- '### Response:\\n' -}}{%- endif -%}"
    )


# --- curation, instruction rating, rewriting, judging -----------------------------------------


def _as_model_input(task: str, system: str | None) -> str:
    """The task text as the instruction of a forward-model prompt, or bare when ``system`` is None."""
    return task if system is None else forward_prompt(task, system)


def _with_score_prefix(task: str, system: str | None, score_prefix: str) -> str:
    if score_prefix not in ("Score:", "Score: "):
        raise ValueError(f"score_prefix must be 'Score:' or 'Score: ' (see logprob_score_prefix), got {score_prefix!r}")
    if system is None:
        return task + "\n\n" + score_prefix
    return forward_prompt(task, system) + score_prefix


def curation_prompt(instruction: str, response: str, *, system: str | None = None) -> str:
    """The paper's self-curation prompt: 5-point rubric, then the candidate instruction and answer.

    The rater writes a brief reasoning and ``Score: <rating>`` on its last line (read it with
    :func:`parse_score`). Without ``system`` this is the bare task text, ending with the answer: the
    user message for an external chat model. For a rater trained here (M(k-1)) pass its system text
    (e.g. ``inference_system(tags)``): the task then goes into the forward template, and the result
    ends with ``"### Response:\\n"``.
    """
    task = _CURATION_TASK.format(
        instruction=_clean(instruction, "instruction"), response=_clean(response, "response")
    )
    return _as_model_input(task, system)


def curation_logprob_prompt(
    instruction: str, response: str, *, system: str | None = None, score_prefix: str = SCORE_PREFIX
) -> str:
    """The same rubric, stopping right before the rating: the text ends with ``Score:``.

    The rater's next token is the score (``" 5"`` and the like); read the first generated token's
    top logprobs with :func:`score_from_top_logprobs`. ``system`` as in :func:`curation_prompt`
    (with it, the model's answer is prefilled with ``Score:``; without it, ``"\\n\\nScore:"``
    follows the answer). For tokenizers that split ``" 5"`` into ``" "`` + ``"5"`` (Llama-3,
    cl100k, Qwen) pass ``score_prefix=logprob_score_prefix(encode)``, which is then ``"Score: "``.
    """
    task = _CURATION_TASK.format(
        instruction=_clean(instruction, "instruction"), response=_clean(response, "response")
    )
    return _with_score_prefix(task, system, score_prefix)


def instruction_only_prompt(instruction: str, *, system: str | None = None) -> str:
    """Kun-style rating of the instruction alone (clarity, answerability, usefulness), 1-5.

    Same protocol as :func:`curation_prompt`: reasoning, then ``Score: <rating>`` on the last line.
    """
    task = _INSTRUCTION_ONLY_TASK.format(instruction=_clean(instruction, "instruction"))
    return _as_model_input(task, system)


def instruction_only_logprob_prompt(
    instruction: str, *, system: str | None = None, score_prefix: str = SCORE_PREFIX
) -> str:
    """:func:`instruction_only_prompt` stopping right before the rating (ends with ``Score:``)."""
    task = _INSTRUCTION_ONLY_TASK.format(instruction=_clean(instruction, "instruction"))
    return _with_score_prefix(task, system, score_prefix)


def rewrite_prompt(instruction: str, response: str, *, system: str | None = None) -> str:
    """Ask for the response rewritten in AI-assistant style: same content and facts, no new facts,
    no preamble; the model outputs only the rewritten answer.

    Without ``system``: the bare task for an external model (back-and-forth translation); for
    self-rewriting by M(k-1) pass its system text (e.g. ``seed_system(tags)``).
    """
    task = REWRITE_TASK.format(
        instruction=_clean(instruction, "instruction"), response=_clean(response, "response")
    )
    return _as_model_input(task, system)


def pairwise_judge_prompt(instruction: str, answer_a: str, answer_b: str) -> str:
    """Pairwise comparison for the evaluate stage; the judge ends with ``Verdict: A|B|tie``.

    Judge each pair in both orders to cancel position bias. Empty answers are allowed (an empty
    answer loses on its merits); read the verdict with :func:`parse_verdict`.
    """
    for name, answer in (("answer_a", answer_a), ("answer_b", answer_b)):
        if not isinstance(answer, str):
            raise TypeError(f"{name} must be a str, got {type(answer).__name__}")
    return JUDGE_TASK.format(
        instruction=_clean(instruction, "instruction"), answer_a=answer_a.strip(), answer_b=answer_b.strip()
    )


def mt_bench_judge_prompt(question_1: str, answer_1: str, *, question_2: str | None = None,
                          answer_2: str | None = None, reference: Sequence[str] | None = None) -> str:
    """MT-Bench's single-answer grading prompt (FastChat's published wording), for turn 1 or 2.

    Turn 2 when ``question_2`` is given (the judge sees the whole conversation and grades the
    second answer). With ``reference`` (the reference answers of the turns; FastChat uses them for
    math, reasoning and coding) the "math" variant compares against it. The judge ends with
    ``[[rating]]``, 1 to 10: read it with :func:`parse_rating`. FastChat sends the first part as
    the system message; this completions-API prompt puts it first, separated by a blank line.
    """
    fields = {"question_1": _clean(question_1, "question_1"), "question": question_1.strip(),
              "answer_1": answer_1.strip(), "answer": answer_1.strip()}
    if question_2 is None:
        system, template = MT_BENCH_SINGLE_MATH if reference else MT_BENCH_SINGLE
    else:
        fields.update(question_2=_clean(question_2, "question_2"), answer_2=(answer_2 or "").strip())
        system, template = MT_BENCH_SINGLE_MATH_MULTI_TURN if reference else MT_BENCH_SINGLE_MULTI_TURN
    if reference:
        refs = list(reference) + [""] * 2
        fields.update(ref_answer_1=refs[0].strip(), ref_answer_2=refs[1].strip())
    return system.rstrip("\n") + "\n\n" + template.format(**fields)


# FastChat's own patterns: "[[8]]", else "[8]"; a rating outside 1..10 is unreadable.
_RATING = (re.compile(r"\[\[(\d+\.?\d*)\]\]"), re.compile(r"\[(\d+\.?\d*)\]"))


def parse_rating(text: str) -> float | None:
    """The MT-Bench rating (1 to 10) in the judge's text, as FastChat reads it, or None."""
    for pattern in _RATING:
        m = pattern.search(text)
        if m:
            value = float(m.group(1))
            return value if 1 <= value <= 10 else None
    return None


# --- reading scores ---------------------------------------------------------------------------

# One line, already stripped. re.ASCII: with IGNORECASE alone, "ſcore" (long s) would match "score".
_SCORE_LINE = re.compile(
    r"""
      score[ \t]*:[ \t]*(?P<plain>[1-5])\.?                                  # Score: 5 | Score: 5.
    | \*\*[ \t]*score[ \t]*:[ \t]*(?P<bold>[1-5])(?:\.\*\*|[ \t]*\*\*\.?)     # **Score: 5** | **Score: 5.** | **Score: 5**.
    | \*\*[ \t]*score[ \t]*:[ \t]*\*\*[ \t]*(?P<label>[1-5])\.?               # **Score:** 5 | **Score:** 5.
    """,
    re.ASCII | re.IGNORECASE | re.VERBOSE,
)


def _last_line(text: str) -> str | None:
    for line in reversed(text.splitlines()):
        if line.strip():
            return line.strip()
    return None


def parse_score(text: str) -> int | None:
    """The rating from a generate-mode answer, or None. Strict on purpose; never raises.

    The last non-empty line (any line ending: ``\\n``, ``\\r\\n``, ...) must be exactly
    ``Score: N`` with N a single digit 1..5: ``score`` in any case, optional spaces or tabs around
    the colon and around the line, optional markdown bold (``**Score: 5**`` or ``**Score:** 5``)
    and one optional trailing period. Everything else is None: ``Score: 6``, ``Score: 4.5``,
    ``Score: 3/5``, ``Score: 4 or 5``, a score followed by more text or on an earlier line, no score.
    """
    if not isinstance(text, str):
        return None
    line = _last_line(text)
    if line is None:
        return None
    match = _SCORE_LINE.fullmatch(line)
    if match is None:
        return None
    digit = match.group("plain") or match.group("bold") or match.group("label")
    return int(digit)


_VERDICT_LINE = re.compile(
    r"""
      verdict[ \t]*:[ \t]*(?P<plain>a|b|tie)\.?
    | \*\*[ \t]*verdict[ \t]*:[ \t]*(?P<bold>a|b|tie)(?:\.\*\*|[ \t]*\*\*\.?)
    | \*\*[ \t]*verdict[ \t]*:[ \t]*\*\*[ \t]*(?P<label>a|b|tie)\.?
    """,
    re.ASCII | re.IGNORECASE | re.VERBOSE,
)


def parse_verdict(text: str) -> Literal["A", "B", "tie"] | None:
    """The pairwise verdict (``"A"``, ``"B"`` or ``"tie"``) from the judge's last non-empty line, or None.

    Same strictness as :func:`parse_score`: the last line must be ``Verdict: A|B|tie`` (any case,
    optional bold and trailing period), nothing else. Never raises.
    """
    if not isinstance(text, str):
        return None
    line = _last_line(text)
    if line is None:
        return None
    match = _VERDICT_LINE.fullmatch(line)
    if match is None:
        return None
    v = (match.group("plain") or match.group("bold") or match.group("label")).lower()
    return "tie" if v == "tie" else v.upper()  # type: ignore[return-value]


@dataclass(frozen=True)
class LogprobScore:
    """A score read from the next-token distribution after ``Score:``.

    ``probs``: probability of each score 1..5 (all five keys), renormalised over the five.
    ``expected``: sum of score x probability. ``argmax``: the most probable score; exact ties go to
    the *lower* score, so a tie never lifts a candidate over a threshold. ``mass``: the probability
    the model put on score tokens before renormalising (capped at 1.0); a low mass means the rater
    mostly wanted to write something else, which stages report.
    """

    expected: float
    argmax: int
    probs: dict[int, float]
    mass: float


# Markers some servers leave on raw token strings: GPT-2 byte-level space, SentencePiece space.
_TOKEN_SPACE_MARKERS = ("\u0120", "\u2581")


def _score_digit(token: str) -> int | None:
    if not isinstance(token, str):
        return None
    t = token.strip()
    while t.startswith(_TOKEN_SPACE_MARKERS):
        t = t[1:].strip()
    if len(t) == 1 and t in "12345":
        return int(t)
    return None


def score_from_top_logprobs(top_logprobs: Mapping[str, float] | None) -> LogprobScore | None:
    """Score from the first generated token's ``top_logprobs`` (token string -> natural-log prob).

    That is the shape the OpenAI completions API returns per position (``logprobs.top_logprobs[0]``).
    Tokens count for score d when, without surrounding whitespace (and a leading ``Ġ``/``▁``
    marker), they are exactly the digit d: ``"5"``, ``" 5"`` and ``"\\n5"`` all add to 5; ``"5."`` or
    ``"55"`` do not. Probabilities are summed per digit and renormalised over the five. None when
    no score token appears (or all of them have probability 0); other tokens only lower ``mass``.
    """
    if not top_logprobs:
        return None
    raw = dict.fromkeys(SCORES, 0.0)
    for token, logprob in top_logprobs.items():
        digit = _score_digit(token)
        if digit is None:
            continue
        try:
            lp = float(logprob)
        except (TypeError, ValueError):
            continue
        if math.isnan(lp):
            continue
        raw[digit] += math.exp(min(lp, 0.0))
    mass = sum(raw.values())
    if mass <= 0.0:
        return None
    probs = {d: raw[d] / mass for d in SCORES}
    expected = sum(d * p for d, p in probs.items())
    best = max(probs.values())
    argmax = min(d for d in SCORES if probs[d] == best)
    return LogprobScore(expected=expected, argmax=argmax, probs=probs, mass=min(mass, 1.0))


def logprob_score_prefix(encode: Callable[[str], Sequence[int]]) -> str:
    """``"Score:"`` or ``"Score: "``: the logprob prompt ending after which one token is the digit.

    ``encode`` maps text to token ids without special tokens (e.g.
    ``lambda s: tokenizer(s, add_special_tokens=False).input_ids``). GPT-2-style byte-level BPE
    (the tiny model) has ``" 5"`` as one token, so ``"Score:"``; Llama-3, cl100k and Qwen split it
    into ``" "`` + ``"5"``, so ``"Score: "``. A ValueError when neither holds for all five digits:
    use generate mode with such a tokenizer.
    """
    context = "\n"  # as in the prompts, "Score:" starts a line
    for prefix in (SCORE_PREFIX, SCORE_PREFIX + " "):
        head = list(encode(context + prefix))
        if all(
            (full := list(encode(f"{context}{SCORE_PREFIX} {d}")))[: len(head)] == head
            and len(full) == len(head) + 1
            for d in SCORES
        ):
            return prefix
    raise ValueError(
        "this tokenizer encodes 'Score: N' so that no prompt ending puts the digit in one next "
        "token; logprob curation cannot read it: use curation mode 'generate'"
    )
