"""What to know about a student/teacher tokenizer pair before training across them (docs/methods.md §14): the
share of the student's vocabulary with an exact teacher match, and how each side splits numerals (a warning
where they split digits differently: their groups then span whole numbers, and per-digit knowledge is merged)."""

from __future__ import annotations

from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from distill.crosstok.align import token_bytes
from distill.losses import ExactMatches

NUMERALS = ["7", "42", "2024", "123456", "3.14159", " 1000000"]


@dataclass
class Preflight:
    """exact_share: matched student tokens / the student's vocabulary; numerals: {numeral: (student pieces,
    teacher pieces)}; warnings: the numerals split differently."""

    exact_share: float
    numerals: dict[str, tuple[list[str], list[str]]]
    warnings: list[str]

    def line(self) -> str:
        shown = "; ".join(f"{n.strip()!r}: student {'|'.join(s)} teacher {'|'.join(t)}"
                          for n, (s, t) in self.numerals.items())
        return f"cross-tokenizer: {self.exact_share:.1%} of the student's vocabulary has an exact teacher token; {shown}"


def _pieces(tok: PreTrainedTokenizerBase, table: list[bytes], text: str) -> list[str]:
    ids = tok(text, add_special_tokens=False)["input_ids"]
    return [table[i].decode("utf-8", errors="replace") for i in ids]


def preflight(student_tok: PreTrainedTokenizerBase, teacher_tok: PreTrainedTokenizerBase,
              matches: ExactMatches) -> Preflight:
    """The pre-flight report of a tokenizer pair and its exact matches."""
    s_table, t_table = token_bytes(student_tok), token_bytes(teacher_tok)
    numerals, warnings = {}, []
    for text in NUMERALS:
        s, t = _pieces(student_tok, s_table, text), _pieces(teacher_tok, t_table, text)
        numerals[text] = (s, t)
        if s != t:
            warnings.append(f"the student splits {text.strip()!r} as {'|'.join(s)} and the teacher as {'|'.join(t)}: "
                            "their digit positions are compared only where both end a token")
    return Preflight(len(matches.student_ids) / max(len(s_table), 1), numerals, warnings)
