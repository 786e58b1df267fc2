"""RULER's QA context builder, reproduced for the synth benchmark (not used by solopo itself).

Source: NVIDIA/RULER, scripts/data/synthetic/qa.py (Copyright (c) 2024, NVIDIA CORPORATION; Apache License 2.0,
http://www.apache.org/licenses/LICENSE-2.0). Read through the code index from a mirror of upstream (the version with
the binary search and `model_template_token`; identical to starmpcc/RULER@1e62e20 but for one added comment).
Every step below cites the line of that file it reproduces as `# qa.py:N`. The algorithm is unchanged; what differs
is stated where it happens:

  * data: RULER ships SQuAD and HotpotQA readers only. MuSiQue is read like SQuAD (qa.py:77-94): the gold
    (supporting) paragraphs are `context`, the question's own other paragraphs `more_context`; a document is
    "{title}\\n{text}" as in the HotpotQA reader (qa.py:101). DOCS is the sorted set of every paragraph (qa.py:79).
  * template: solopo's instruction with {documents}/{question} renamed {context}/{query}, rendered in the model's
    chat template as RULER's model templates do, so both builders count the same prompt the same way.
  * tokens_to_generate defaults to 0 here (RULER's QA task reserves 32) so that both aim at the same prompt budget.
  * RULER loops forever when a prompt still overflows at `incremental` documents (qa.py:198-206); here that case
    raises `RulerInfiniteLoop` so that a benchmark terminates, and the caller counts it.

As a process (what one RULER invocation is: one target length):

    python3 bench/synth/ruler_qa.py --data musique.jsonl --max-seq-length 4096 --tokenizer DIR \\
        --template "...{context}...{query}" --out /tmp/ruler-4096.jsonl

It imports nothing from solopo: a RULER process pays only for what RULER loads (transformers, its data).
"""

from __future__ import annotations

import argparse
import json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DOCUMENT_PROMPT = "Document {i}:\n{document}"  # qa.py:115


class RulerInfiniteLoop(RuntimeError):
    """qa.py:198-206 would spin forever: the prompt overflows and used_docs can no longer shrink."""


@dataclass
class RulerQA:
    """The module state of qa.py: QAS, DOCS, the tokenizer, args.template and the seeded `random` module."""

    qas: list[dict[str, Any]]
    docs: list[str]
    count_tokens: Any  # str -> int: len(TOKENIZER.text_to_tokens(text)) for the chat-rendered prompt
    template: str
    random_seed: int = 42  # qa.py:63 (--random_seed default)
    tokens_to_generate: int = 0
    rng: random.Random = field(init=False)
    tokenizer_calls: int = 0
    num_docs: int | None = None  # what the binary search found (for the report)

    def __post_init__(self) -> None:
        # qa.py:73 seeds the global `random` module once per process; a private instance gives the same stream
        # without sharing state with the rest of this process.
        self.rng = random.Random(self.random_seed)

    def tokens(self, text: str) -> int:
        self.tokenizer_calls += 1
        return self.count_tokens(text)

    def generate_input_output(self, index: int, num_docs: int) -> tuple[str, list[str], list[int]]:
        """qa.py:125-150. Also returns the DOCS index of every rendered document (for the gold-depth metrics)."""
        qa = self.qas[index]
        curr_q, curr_a = qa["query"], qa["outputs"]  # qa.py:126-127
        curr_docs, curr_more = qa["context"], qa.get("more_context", [])  # qa.py:128-129
        if num_docs < len(self.docs):  # qa.py:130
            if (num_docs - len(curr_docs)) > len(curr_more):  # qa.py:131
                # qa.py:132, including its list membership test (part of RULER's cost)
                addition_docs = [i for i, d in enumerate(self.docs) if i not in curr_docs + curr_more]
                all_docs = (  # qa.py:133
                    curr_docs
                    + curr_more
                    + self.rng.sample(addition_docs, max(0, num_docs - len(curr_docs) - len(curr_more)))
                )
            else:
                all_docs = curr_docs + self.rng.sample(curr_more, num_docs - len(curr_docs))  # qa.py:135
        else:
            repeats = (num_docs + len(self.docs) - 1) // len(self.docs)  # qa.py:140
            all_docs = (list(range(len(self.docs))) * repeats)[:num_docs]  # qa.py:141 (indices, not texts)
        random.Random(self.random_seed).shuffle(all_docs)  # qa.py:143: the same permutation for every question
        context = "\n\n".join(  # qa.py:145
            DOCUMENT_PROMPT.format(i=i + 1, document=self.docs[d]) for i, d in enumerate(all_docs)
        )
        input_text = self.template.format(context=context, query=curr_q)  # qa.py:146-149
        return input_text, curr_a, all_docs

    def find_num_docs(self, max_seq_length: int, incremental: int = 10) -> int:
        """qa.py:159-192: binary search of the document count, once, on question 0."""
        sample_input_text, _, _ = self.generate_input_output(0, incremental)  # qa.py:160
        tokens_per_doc = self.tokens(sample_input_text) / incremental  # qa.py:161-162
        estimated_max_docs = int((max_seq_length / tokens_per_doc) * 3)  # qa.py:166
        lower_bound = incremental  # qa.py:169
        upper_bound = max(estimated_max_docs, incremental * 2)  # qa.py:170
        optimal_num_docs = None  # qa.py:172
        while lower_bound <= upper_bound:  # qa.py:177
            mid = (lower_bound + upper_bound) // 2  # qa.py:178
            input_text, _, _ = self.generate_input_output(0, mid)  # qa.py:179
            total_tokens = self.tokens(input_text) + self.tokens_to_generate  # qa.py:180
            if total_tokens <= max_seq_length:  # qa.py:184-187
                optimal_num_docs = mid
                lower_bound = mid + 1
            else:  # qa.py:188-190
                upper_bound = mid - 1
        return optimal_num_docs if optimal_num_docs is not None else incremental  # qa.py:192

    def generate_samples(self, num_samples: int, max_seq_length: int, incremental: int = 10) -> list[dict[str, Any]]:
        """qa.py:153-219 (pre_samples=0, model_template_token=0, no answer-prefix split: the template has none)."""
        num_docs = self.num_docs = self.find_num_docs(max_seq_length, incremental)
        out = []
        for index in range(num_samples):  # qa.py:196
            used_docs = num_docs  # qa.py:197
            while True:  # qa.py:198
                try:  # qa.py:199-203
                    input_text, answer, doc_ids = self.generate_input_output(index, used_docs)
                    length = self.tokens(input_text) + self.tokens_to_generate
                    assert length <= max_seq_length, f"{length} exceeds max_seq_length."
                    break
                except (AssertionError, ValueError):  # qa.py:204 is a bare except: these are what it catches here
                    if used_docs > incremental:  # qa.py:205-206
                        used_docs -= incremental
                    else:  # RULER retries the same call forever
                        raise RulerInfiniteLoop(
                            f"question {index}: {used_docs} documents still overflow {max_seq_length} tokens"
                        ) from None
            out.append({"index": index, "input": input_text, "outputs": answer, "length": length, "doc_ids": doc_ids})
        return out


def read_musique(path: str | Path) -> list[dict[str, Any]]:
    """MuSiQue JSONL, answerable questions (what solopo's load stage keeps), read with json as RULER reads its data."""
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [r for r in rows if r.get("answerable", True)]


def from_musique(rows: list[dict[str, Any]], count_tokens: Any, template: str, tokens_to_generate: int = 0) -> RulerQA:
    """QAS and DOCS shaped like qa.py's SQuAD reader (qa.py:77-94): gold = supporting paragraphs, more = the rest."""

    def doc(p: dict[str, Any]) -> str:
        return f"{p['title']}\n{p['paragraph_text']}"  # qa.py:101 (HotpotQA's title + text)

    docs = sorted({doc(p) for r in rows for p in r["paragraphs"]})  # qa.py:78-79
    index = {d: i for i, d in enumerate(docs)}  # qa.py:80
    qas = []
    for r in rows:
        gold = [index[doc(p)] for p in r["paragraphs"] if p["is_supporting"]]
        own = [index[doc(p)] for p in r["paragraphs"] if not p["is_supporting"]]
        answers = [r["answer"], *[a for a in r.get("answer_aliases", []) if a != r["answer"]]]
        qas.append(  # qa.py:87-92
            {
                "query": r["question"],
                "outputs": answers,
                "context": gold,
                "more_context": [i for i in own if i not in gold],
            }
        )
    return RulerQA(qas, docs, count_tokens, template, tokens_to_generate=tokens_to_generate)


def chat_counter(tokenizer: Any) -> Any:
    """len(TOKENIZER.text_to_tokens(prompt)) for the prompt in the model's chat template (RULER's model templates)."""

    def count(text: str) -> int:
        chat = tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
        )
        return len(tokenizer(chat, add_special_tokens=False)["input_ids"])

    return count


def ruler_template(prompt_template: str) -> str:
    return prompt_template.replace("{documents}", "{context}").replace("{question}", "{query}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", required=True, help="a MuSiQue JSONL file")
    ap.add_argument("--max-seq-length", type=int, required=True)
    ap.add_argument("--tokens-to-generate", type=int, default=0)
    ap.add_argument("--tokenizer", required=True, help="tokenizer dir")
    ap.add_argument("--template", required=True, help="prompt template with {context} and {query}")
    ap.add_argument("--out", type=Path, required=True, help="jsonl of prompts; timings go to <out>.timing.json")
    args = ap.parse_args()
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(args.tokenizer)
    rows = read_musique(args.data)
    t0 = time.perf_counter()
    ruler = from_musique(rows, chat_counter(tok), args.template, args.tokens_to_generate)
    out = ruler.generate_samples(len(ruler.qas), args.max_seq_length)
    secs = time.perf_counter() - t0
    with open(args.out, "w") as f:  # RULER's write_manifest: one JSON object per line
        for r in out:
            f.write(json.dumps(r) + "\n")
    Path(f"{args.out}.timing.json").write_text(
        json.dumps({"builder_seconds": secs, "tokenizer_calls": ruler.tokenizer_calls, "rows": len(out)})
    )


if __name__ == "__main__":
    main()
