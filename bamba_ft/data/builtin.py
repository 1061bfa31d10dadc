"""The builtin task: generated instructions with exact answers, and the character tokenizer of builtin:tiny.

Six skills (add, subtract, reverse, sort, upper-case, count letters). The pretraining corpus is plain text:
terse facts (`reverse(cat)=tac`) and question/answer lines ("Q: Spell cat backwards." / "A: tac"). The
fine-tuning set asks the same questions as chat turns with the answer as the assistant turn. The base model
never sees the chat format or its special tokens, so its exact match starts at zero; what LoRA fine-tuning
teaches is to answer in that format, and the metric shows whether it did.

About 10% of the inputs (by a hash of the operands, e.g. `12+34` or `reverse(cat)`) are held out: they never
appear in the pretraining corpus or the fine-tuning training set, and are the only inputs of the validation
set, so validation measures answers to inputs the model has not seen in any form.
"""

from __future__ import annotations

import hashlib
import random
import string
from collections.abc import Callable

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = ["<|pad|>", "<|unk|>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>"]
VOCAB_SIZE = 128  # 6 special + 96 characters, rounded up to a multiple of 64 for matmul-friendly shapes

# Each message is <|role|>content<|end|>; <|end|> is also EOS, so generation stops after the answer.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def build_char_tokenizer() -> PreTrainedTokenizerFast:
    """One token per printable ASCII character (plus newline and tab), and the chat special tokens."""
    chars = ["\n", "\t"] + [chr(c) for c in range(32, 127)]
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + chars)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<|unk|>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("[\\s\\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(SPECIAL_TOKENS)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<|pad|>",
        unk_token="<|unk|>",
        eos_token="<|end|>",
        chat_template=CHAT_TEMPLATE,
        model_max_length=4096,
        clean_up_tokenization_spaces=False,
    )


def _word(rng: random.Random, lo: int = 3, hi: int = 7) -> str:
    return "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(lo, hi)))


# Each skill: rng -> (fact as plain text, question, answer).
def _add(rng: random.Random) -> tuple[str, str, str]:
    a, b = rng.randint(0, 99), rng.randint(0, 99)
    return f"{a}+{b}={a + b}", rng.choice([f"What is {a} plus {b}?", f"Add {a} and {b}."]), str(a + b)


def _sub(rng: random.Random) -> tuple[str, str, str]:
    a, b = sorted((rng.randint(0, 99), rng.randint(0, 99)), reverse=True)
    return f"{a}-{b}={a - b}", rng.choice([f"What is {a} minus {b}?", f"Subtract {b} from {a}."]), str(a - b)


def _reverse(rng: random.Random) -> tuple[str, str, str]:
    w = _word(rng)
    return f"reverse({w})={w[::-1]}", rng.choice([f"Reverse the letters of {w}.", f"Spell {w} backwards."]), w[::-1]


def _sort(rng: random.Random) -> tuple[str, str, str]:
    w = _word(rng)
    s = "".join(sorted(w))
    return f"sort({w})={s}", rng.choice([f"Sort the letters of {w}.", f"Put the letters of {w} in order."]), s


def _upper(rng: random.Random) -> tuple[str, str, str]:
    w = _word(rng)
    return f"upper({w})={w.upper()}", rng.choice([f"Write {w} in capitals.", f"Uppercase {w}."]), w.upper()


def _count(rng: random.Random) -> tuple[str, str, str]:
    w = _word(rng, 2, 9)
    return f"len({w})={len(w)}", rng.choice([f"How many letters are in {w}?", f"Count the letters of {w}."]), str(len(w))


SKILLS: dict[str, Callable[[random.Random], tuple[str, str, str]]] = {
    "add": _add,
    "sub": _sub,
    "reverse": _reverse,
    "sort": _sort,
    "upper": _upper,
    "count": _count,
}


def held_out(fact: str) -> bool:
    """True for the ~10% of inputs reserved for validation (decided by the operands, not the phrasing)."""
    return hashlib.md5(fact.split("=", 1)[0].encode()).digest()[0] < 26


def _draw(rng: random.Random, skill: str, validation: bool) -> tuple[str, str, str]:
    while True:
        fact, question, answer = SKILLS[skill](rng)
        if held_out(fact) == validation:
            return fact, question, answer


def generate_sft(n: int, seed: int, validation: bool = False) -> list[dict]:
    """`n` chat examples {"messages": [...], "skill": ...}, from held-out inputs when `validation`."""
    rng = random.Random(seed)
    names = list(SKILLS)
    rows = []
    for i in range(n):
        skill = names[i % len(names)]
        _, question, answer = _draw(rng, skill, validation)
        rows.append(
            {
                "messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}],
                "skill": skill,
            }
        )
    return rows


def generate_pretrain(n: int, seed: int, lines_per_doc: int = 10, validation: bool = False) -> list[dict]:
    """`n` plain-text documents {"text": ...}: facts and Q/A pairs from all skills, one per line."""
    rng = random.Random(seed)
    names = list(SKILLS)
    docs = []
    for _ in range(n):
        lines = []
        for _ in range(lines_per_doc):
            fact, question, answer = _draw(rng, rng.choice(names), validation)
            lines.append(fact if rng.random() < 0.5 else f"Q: {question}\nA: {answer}")
        docs.append({"text": "\n".join(lines)})
    return docs


def builtin_splits(kind: str, n_train: int, n_val: int, seed: int) -> tuple[list[dict], list[dict]]:
    """(train, validation) rows; validation inputs never appear in any training split (see `held_out`)."""
    if kind == "pretrain":
        return generate_pretrain(n_train, seed), generate_pretrain(n_val, seed + 1_000_003, validation=True)
    return generate_sft(n_train, seed), generate_sft(n_val, seed + 1_000_003, validation=True)
