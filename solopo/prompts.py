"""Prompt text shared by synth (building prompts), select/eval (parsing answers) and training.

Prompts are stored as the *user message content*; every consumer renders them with the model's chat
template (token counts in synth include the template and the generation prompt)."""

from __future__ import annotations

# Rendering of one document; RULER uses "Document {i}:\n{title}\n{text}".
DOC_TEMPLATE = "Document {i} (Title: {title}): {text}"
DOC_SEPARATOR = "\n\n"

FINAL_ANSWER_PREFIX = "The answer is:"

# Same instruction and question in x_short and x_long; only {documents} differs.
PROMPT_TEMPLATE = (
    "Answer the question based on the given documents.\n\n"
    "The following are given documents.\n\n"
    "{documents}\n\n"
    "Answer the question based on the given documents. Think step by step, then finish with one line of the "
    'form "' + FINAL_ANSWER_PREFIX + ' <short answer>".\n\n'
    "Question: {question}"
)


def render_document(i: int, title: str, text: str, template: str = DOC_TEMPLATE) -> str:
    return template.format(i=i, title=title, text=text)


def render_prompt(documents: list[str], question: str, template: str = PROMPT_TEMPLATE) -> str:
    return template.format(documents=DOC_SEPARATOR.join(documents), question=question)
