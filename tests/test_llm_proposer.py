"""The LLM proposer against a local OpenAI-compatible chat-completions server (127.0.0.1, no network)."""

import json
import logging
import random
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tdcdiff.prune.llm import LLMProposer, LLMProposerError, parse_decisions
from tdcdiff.prune.memory import Entry
from tdcdiff.prune.proposers import EvolutionProposer, SearchContext
from tdcdiff.prune.search import get_proposer

UNITS = ["down_blocks.0", "down_blocks.1", "mid_block", "up_blocks.0", "up_blocks.1"]
KEY = "sk-test-SECRET-0123456789abcdef"
MEMORY = [
    Entry(0, {u: 0.25 for u in UNITS}, 18_000_000, 18_000_000, 1.3125, "evolution", "repair scale 1.000"),
    Entry(0, {u: 0.1 * i for i, u in enumerate(UNITS)}, 17_800_000, 18_000_000, 1.2071, "evolution"),
]


def chat_answer(content: str) -> tuple[int, str]:
    return 200, json.dumps({"choices": [{"index": 0, "message": {"role": "assistant", "content": content}}]})


class Server:
    """A chat-completions server that plays a script of answers, one per request, and records the requests.

    Script items: (status, body), "sleep" (waits until the test ends), or "echo" (answers a non-JSON text
    that quotes the request's Authorization header, like a careless proxy would).
    """

    def __init__(self, script):
        self.script, self.requests, self.release = list(script), [], threading.Event()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.requests.append({"path": self.path, "headers": dict(self.headers), "body": body})
                item = outer.script.pop(0) if len(outer.script) > 1 else outer.script[0]
                if item == "sleep":
                    outer.release.wait(10)
                    return
                if item == "echo":
                    item = chat_answer(f"cannot comply, you sent {self.headers['Authorization']}")
                status, text = item
                data = text.encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):  # keep pytest output clean
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def serve(monkeypatch):
    for name in ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)  # 127.0.0.1 must never go through a proxy
    servers = []

    def start(*script):
        servers.append(Server(script))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


def proposer_for(server, **kwargs) -> LLMProposer:
    kwargs = {"timeout": 120.0, "backoff": 0.01, **kwargs}  # generous: a loaded machine may answer slowly
    proposer = LLMProposer(server.url, "test-model", KEY, **kwargs)
    proposer.set_context(SearchContext(0.6, {u: {"channels": 32, "flops_share": 0.2} for u in UNITS}))
    return proposer


def test_good_answer_is_used_and_request_carries_budget_memory_and_key(serve):
    answer = {"decisions": [{"down_blocks.0": 0.1, "up_blocks.1": 0.5}, {u: 0.3 for u in UNITS}]}
    server = serve(chat_answer("Here you go:\n```json\n" + json.dumps(answer) + "\n```"))
    proposer = proposer_for(server)
    decisions = proposer.propose(UNITS, MEMORY, 2, random.Random(0))

    assert decisions[0] == {"down_blocks.0": 0.1, "down_blocks.1": 0.0, "mid_block": 0.0, "up_blocks.0": 0.0,
                            "up_blocks.1": 0.5}
    assert decisions[1] == {u: 0.3 for u in UNITS}
    assert proposer.fallbacks == 0 and proposer.last_source == "llm"
    (request,) = server.requests
    assert request["path"] == "/v1/chat/completions"
    assert request["headers"]["Authorization"] == f"Bearer {KEY}"
    body = request["body"]
    assert body["model"] == "test-model" and body["temperature"] == 0.7
    prompt = body["messages"][-1]["content"]
    assert "0.600 of the unpruned model's FLOPs" in prompt
    assert "1.2071" in prompt and "1.3125" in prompt  # the memory table
    assert "mid_block (channels=32, flops_share=0.2)" in prompt
    assert '"decisions"' in prompt and "Propose 2" in prompt


def test_retry_after_one_bad_answer_needs_no_fallback(serve):
    server = serve((500, "overloaded"), chat_answer(json.dumps({"decisions": [{"mid_block": 0.4}]})))
    proposer = proposer_for(server)
    assert proposer.propose(UNITS, [], 3, random.Random(0)) == [{u: (0.4 if u == "mid_block" else 0.0) for u in UNITS}]
    assert len(server.requests) == 2 and proposer.fallbacks == 0


def test_garbage_answers_are_retried_then_fall_back_to_evolution(serve, caplog):
    invalid = {"decisions": [{"conv_out": 0.3}, {"mid_block": 1.5}, {"mid_block": "lots"}, {"mid_block": True}, [0.2]]}
    server = serve(chat_answer("I think you should prune the mid block."), chat_answer(json.dumps(invalid)),
                   (500, "boom"))
    proposer = proposer_for(server, retries=2)
    with caplog.at_level(logging.INFO, logger="tdcdiff"):
        decisions = proposer.propose(UNITS, MEMORY, 3, random.Random(7))

    assert len(server.requests) == 3  # 1 try + 2 retries
    assert proposer.fallbacks == 1 and proposer.last_source == "evolution (llm fallback)"
    assert decisions == EvolutionProposer().propose(UNITS, MEMORY, 3, random.Random(7))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "falling back to evolution" in warnings[0] and "HTTPError" in warnings[0]
    assert "unknown units ['conv_out']" in caplog.text and "mid_block=1.5" in caplog.text


def test_timeout_falls_back(serve, caplog):
    server = serve("sleep")
    proposer = proposer_for(server, timeout=0.5, retries=1)
    with caplog.at_level(logging.WARNING, logger="tdcdiff"):
        decisions = proposer.propose(UNITS, [], 2, random.Random(0))
    assert len(server.requests) == 2 and proposer.fallbacks == 1
    assert decisions == EvolutionProposer().propose(UNITS, [], 2, random.Random(0))
    assert "timed out" in caplog.text and "falling back" in caplog.text


def test_api_key_never_in_logs_or_errors(serve, caplog):
    server = serve("echo", (500, f"bad key {KEY}"), "echo")
    with caplog.at_level(logging.DEBUG):
        proposer = proposer_for(server, retries=2)
        proposer.propose(UNITS, [], 2, random.Random(0))
        strict = proposer_for(server, retries=1, fallback=None)
        with pytest.raises(LLMProposerError) as caught:
            strict.propose(UNITS, [], 2, random.Random(0))
    assert "you sent Bearer ***" in caplog.text  # the echoed answer was logged, redacted
    for text in (caplog.text, str(caught.value), repr(caught.value), repr(proposer)):
        assert KEY not in text and "SECRET" not in text


def test_settings_from_environment(monkeypatch):
    for name in ("TDCDIFF_LLM_BASE_URL", "TDCDIFF_LLM_MODEL", "TDCDIFF_LLM_API_KEY", "OPENAI_BASE_URL",
                 "OPENAI_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ValueError, match="TDCDIFF_LLM_BASE_URL"):
        LLMProposer(model="m")
    monkeypatch.setenv("OPENAI_BASE_URL", "http://127.0.0.1:1/v1/")
    with pytest.raises(ValueError, match="TDCDIFF_LLM_MODEL"):
        LLMProposer()
    monkeypatch.setenv("TDCDIFF_LLM_MODEL", "env-model")
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    proposer = get_proposer("llm")
    assert (proposer.base_url, proposer.model, proposer.name) == ("http://127.0.0.1:1/v1", "env-model", "llm")
    assert KEY not in repr(proposer)
    monkeypatch.setenv("TDCDIFF_LLM_BASE_URL", "http://127.0.0.1:2/v1")
    assert LLMProposer().base_url == "http://127.0.0.1:2/v1"  # the tdcdiff variable wins


@pytest.mark.parametrize(
    "text, expected",
    [
        ('{"decisions": [{"mid_block": 0.2}]}', [{"a": 0.0, "mid_block": 0.2}]),
        ('[{"a": 0.95, "mid_block": 0}]', [{"a": 0.95, "mid_block": 0.0}]),
        ('Sure! {"decisions": [{"a": 0.1}, {"a": -0.1}, {}]} Hope it helps.',
         [{"a": 0.1, "mid_block": 0.0}, {"a": 0.0, "mid_block": 0.0}]),
        ('```\n{"decisions": [{"a": 0.5, "mid_block": 0.25}]}\n```', [{"a": 0.5, "mid_block": 0.25}]),
    ],
)
def test_parse_decisions(text, expected):
    assert parse_decisions(text, ["a", "mid_block"]) == expected


@pytest.mark.parametrize("text", ["no json here", '{"answer": 3}', '{"decisions": [{"b": 0.1}, {"a": NaN}]}'])
def test_parse_decisions_rejects(text):
    with pytest.raises(ValueError):
        parse_decisions(text, ["a", "mid_block"])


def test_layer_units_must_be_0_or_1():
    from tdcdiff.prune.llm import parse_decisions

    units = ["mid_block", "mid_block.resnets.1"]
    text = '{"decisions": [{"mid_block": 0.4, "mid_block.resnets.1": 1}, {"mid_block.resnets.1": 0.5}]}'
    assert parse_decisions(text, units) == [{"mid_block": 0.4, "mid_block.resnets.1": 1.0}]
