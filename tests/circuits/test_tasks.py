"""Built-in prompt sets: right answers, aligned token lengths, counterfactuals, clear errors."""
import json

import pytest

from saelab.circuits.prompts import tokenize
from saelab.circuits.tasks import agreement, arithmetic, build_task, champ_steps
from saelab.errors import UsageError
from tests.builders import tiny_tokenizer


def test_arithmetic_answers_are_sums_and_lengths_match():
    tok = tiny_tokenizer()
    ps = arithmetic(20, seed=1)
    for p in ps:
        a, b = p.prompt.splitlines()[-1].rstrip(" =").split(" + ")
        assert int(p.answer) == int(a) + int(b) <= 99 and 10 <= int(a) and 1 <= int(b) <= 9
    batch = tokenize(tok, ps, "auto", 1, 0)
    assert batch.metric == "logprob" and batch.corrupted_ids_BS is not None
    assert arithmetic(5, seed=1) == ps[:5]


def test_agreement_verb_follows_the_subject_not_the_attractor():
    ps = agreement(16, seed=0)
    for p in ps:
        subj, attr = p.prompt.split()[1], p.prompt.split()[-1]
        plural = p.answer == " are"
        assert (subj.endswith("s") or subj == "children") == plural
        assert (attr.endswith("s") or attr == "children") != plural
        assert p.wrong_answer == (" is" if plural else " are")
        assert p.corrupted.split()[1] != subj and p.corrupted.split()[2:] == p.prompt.split()[2:]


def test_agreement_keeps_single_token_nouns_so_positions_align():
    class OneTokenFor:  # a stand-in tokenizer: only these words are one token
        words = {" author", " authors", " pilot", " pilots", " is", " are"}

        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [1] if text in self.words else [1, 2]}

    ps = agreement(10, tokenizer=OneTokenFor())
    assert {p.prompt.split()[1] for p in ps} <= {"author", "authors", "pilot", "pilots"}


def test_champ_steps_end_before_the_key_number(tmp_path):
    f = tmp_path / "champ.jsonl"
    f.write_text(json.dumps({"text": "Find x.\nWe have 2x = 14.\nSo x = 7."}) + "\n")
    ps = champ_steps(f, n=10)
    assert sorted((p.prompt, p.answer) for p in ps) == [
        ("Find x.\nWe have 2x = ", "14"), ("Find x.\nWe have 2x = 14.\nSo x = ", "7")]
    with pytest.raises(UsageError, match="corpora fetch champ"):
        champ_steps(tmp_path / "missing.jsonl")
    with pytest.raises(UsageError, match="unknown task 'agreemnt'.*agreement"):
        build_task("agreemnt")
