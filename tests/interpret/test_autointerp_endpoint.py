"""The endpoint backend against real servers on 127.0.0.1 (no other network).

* `transformers serve` (the `serve` extra, installed by `make setup`) serving a tiny random Llama with
  the embedded model's tokenizer: the explanations and yes/no answers that come back over HTTP equal
  what the same model gives in this process (greedy), the API key reaches no file and no log line.
* Failure paths: a port where nothing listens and a socket that accepts but never answers end in a
  UsageError after the configured retries, and a refused request (HTTP 4xx) ends at once.
"""
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from saelab.errors import UsageError
from saelab.models import load_tokenizer
from saelab.interpret.autointerp import AutointerpConfig, EndpointBackend, LocalBackend, explain_prompt, run_autointerp
from saelab.interpret.autointerp.prompts import Context, detect_prompt, parse_explanation, parse_yes_no
from saelab.interpret.autointerp.sampling import sample_contexts

SERVE = shutil.which("transformers", path=str(Path(sys.executable).parent)) or shutil.which("transformers")
SECRET = "sk-saelab-test-7f3a9c"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    """A 1-layer random Llama with the embedded model's tokenizer (and chat template), saved to a directory."""
    try:
        tok = load_tokenizer("default")
    except UsageError as e:
        pytest.skip(f"needs the embedded model's tokenizer: {e}")
    d = tmp_path_factory.mktemp("tiny_llama")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id)
    LlamaForCausalLM(cfg).save_pretrained(d)
    tok.save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    """`transformers serve DIR` on 127.0.0.1:PORT; stopped (by its process id) after the module."""
    if SERVE is None:
        pytest.skip("`transformers serve` is not installed: pip install 'saelab[serve]' (make setup does)")
    port = _free_port()
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    fh = open(log, "w")
    proc = subprocess.Popen([SERVE, "serve", str(tiny_model_dir), "--host", "127.0.0.1", "--port", str(port),
                             "--device", "cpu", "--dtype", "float32"], stdout=fh, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 240
    while time.time() < deadline:
        assert proc.poll() is None, log.read_text()[-3000:]
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as r:
                if r.status == 200:
                    break
        except OSError:
            time.sleep(0.5)
    else:
        proc.kill()
        pytest.fail("transformers serve did not come up in 240 s:\n" + log.read_text()[-3000:])
    yield url, str(tiny_model_dir), log
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
    fh.close()



@pytest.mark.slow
def test_endpoint_answers_equal_the_same_model_in_process(server, tiny_model_dir):
    url, name, _ = server
    ep = EndpointBackend(url + "/v1", model=name, concurrency=3, timeout=120, retries=1)
    local = LocalBackend(str(tiny_model_dir))
    ctx = [Context([" the", " cat", " sat"], [0, 2, 0], [False, True, False], i) for i in range(3)]
    prompts = [explain_prompt(ctx[:k + 1]) for k in range(3)]
    assert ep.generate(prompts, 12) == local.generate(prompts, 12)
    judged = ep.classify([detect_prompt(f"the word number {i}", c) for i, c in enumerate(ctx)])
    first = local.generate([detect_prompt(f"the word number {i}", c) for i, c in enumerate(ctx)], 1)
    assert [j.answer for j in judged] == [parse_yes_no(t) for t in first]


@pytest.mark.slow
def test_run_through_endpoint_with_api_key_never_saved_or_logged(server, planted, tmp_path, caplog, monkeypatch):
    url, name, serve_log = server
    p = planted
    sae, store, hook, res = p.sae_obj, p.store_obj, p.hook, p.res
    monkeypatch.setenv("SAELAB_TEST_KEY", SECRET)
    cfg = AutointerpConfig(explainer=url + "/v1", explainer_model=name, scorer="rule", api_key_env="SAELAB_TEST_KEY",
                           n_test=3, n_top=3, bands=1, max_new_tokens=8, concurrency=2, timeout=120)
    caplog.set_level("DEBUG")
    r = run_autointerp(sae, store, hook, res.stats, [0, 1, 2], cfg, tmp_path / "out", tokenizer=p.tok, quiet=True)
    local = LocalBackend(name)
    for f, rec in r.records.items():
        assert rec["explainer_reply"] == local.generate([explain_prompt(_explain_ctx(sae, store, hook, res, f, p))],
                                                        8)[0]
        assert rec["explanation"] == parse_explanation(rec["explainer_reply"])
    saved = "".join(f.read_text() for f in (tmp_path / "out").rglob("*.json"))
    assert SECRET not in saved and "SAELAB_TEST_KEY" in saved
    assert SECRET not in caplog.text


def _explain_ctx(sae, store, hook, res, f, p):
    return sample_contexts(sae, store, hook, res.stats, [f], p.tok, n_top=3, bands=1, n_test=3)[f].explain


@pytest.mark.slow
def test_refused_request_fails_at_once(server):
    url, _, _ = server
    ep = EndpointBackend(url, model="no-such-model-anywhere", retries=3, timeout=60)
    with pytest.raises(UsageError, match=r"refused the request \(HTTP 4\d\d") as e:  # not retried
        ep.generate([explain_prompt([Context(["a"], [1], [True], 0)])], 4)
    assert "--explainer-model" in str(e.value)


def test_nothing_listening_ends_in_a_clear_error_after_retries():
    port = _free_port()  # closed again: connections are refused
    ep = EndpointBackend(f"http://127.0.0.1:{port}/v1", model="m", retries=1, timeout=2)
    with pytest.raises(UsageError, match=r"did not answer after 2 attempts .*ConnectionRefused"):
        ep.generate([explain_prompt([Context(["a"], [1], [True], 0)])], 4)


def test_silent_server_times_out():
    with socket.socket() as s:  # accepts connections (the kernel's backlog) but never replies
        s.bind(("127.0.0.1", 0))
        s.listen(8)
        ep = EndpointBackend(f"http://127.0.0.1:{s.getsockname()[1]}", model="m", retries=0, timeout=0.5)
        with pytest.raises(UsageError, match=r"after 1 attempts \(last error: timed out after 0.5 s\)"):
            ep.classify([detect_prompt("x", Context(["a"], [0], [False], 0))])


def test_missing_key_variable_is_named():
    with pytest.raises(UsageError, match="SAELAB_NO_SUCH_KEY_VAR"):
        EndpointBackend("http://127.0.0.1:9/v1", model="m", api_key_env="SAELAB_NO_SUCH_KEY_VAR")
