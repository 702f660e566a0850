"""A proposer that asks a large language model (any OpenAI-compatible chat-completions endpoint).

The paper used GPT-4 as the proposer. Its answers are untrusted text: they are parsed leniently,
validated strictly, retried when unusable, and replaced by the evolutionary proposer for the round
when every try fails, so a search never stops because of the endpoint.
"""

from __future__ import annotations

import http.client
import json
import logging
import math
import os
import random
import re
import time
import urllib.error
import urllib.request

from ..surgery.depth import is_depth_unit
from .memory import Entry, MemoryBank
from .proposers import Decision, EvolutionProposer, Proposer, SearchContext

log = logging.getLogger("tdcdiff")

MAX_RATIO = 0.95
_FENCE = re.compile(r"```(?:json)?\s*(.*?)```", re.DOTALL | re.IGNORECASE)

SYSTEM_PROMPT = (
    "You design structural pruning decisions for a diffusion model's denoiser (a UNet). A decision gives, "
    "for each prunable unit, the fraction of its channels to remove. Every decision is rescaled afterwards "
    "to meet the budget, so choose WHICH units to prune more or less. Layer units (names with .resnets. or "
    ".attentions.) are whole layers: 1 removes the layer, 0 keeps it. Candidates are scored by a proxy: "
    "the denoising loss on one group of timesteps relative to the unpruned model (lower is better, 1.0 = "
    "no loss of quality). Answer with a JSON object only."
)


class LLMProposerError(RuntimeError):
    """The endpoint gave no usable answer and no fallback proposer was configured."""


def _env(*names: str) -> str | None:
    return next((os.environ[n] for n in names if os.environ.get(n)), None)


class LLMProposer:
    """Proposes decisions by asking a chat model, with retries and a fallback.

    base_url: the API root, e.g. "https://api.openai.com/v1" (POST {base_url}/chat/completions);
        default $TDCDIFF_LLM_BASE_URL, then $OPENAI_BASE_URL.
    model: the model name; default $TDCDIFF_LLM_MODEL.
    api_key: sent as "Authorization: Bearer <key>" and never logged; default $TDCDIFF_LLM_API_KEY,
        then $OPENAI_API_KEY; none sends no Authorization header (local servers).
    temperature: sampling temperature of the chat model.
    timeout: seconds to wait for one answer.
    retries: extra tries after an unusable answer (timeout, HTTP error, non-JSON, no valid candidate).
    backoff: seconds before the first retry; doubled for each further one.
    max_memory_entries: how many of the best past candidates the prompt shows.
    fallback: the proposer used for a round when every try failed (default EvolutionProposer());
        None raises LLMProposerError instead.

    `fallbacks` counts the rounds that fell back; `last_source` labels the last round's entries in the
    memory bank ("llm", or e.g. "evolution (llm fallback)").
    """

    name = "llm"

    def __init__(
        self,
        base_url: str | None = None,
        model: str | None = None,
        api_key: str | None = None,
        *,
        temperature: float = 0.7,
        timeout: float = 60.0,
        retries: int = 2,
        backoff: float = 1.0,
        max_memory_entries: int = 20,
        fallback: Proposer | None = EvolutionProposer(),
    ):
        self.base_url = (base_url or _env("TDCDIFF_LLM_BASE_URL", "OPENAI_BASE_URL") or "").rstrip("/")
        self.model = model or _env("TDCDIFF_LLM_MODEL")
        if not self.base_url:
            raise ValueError("the llm proposer needs an endpoint: pass base_url or set TDCDIFF_LLM_BASE_URL "
                             "(or OPENAI_BASE_URL)")
        if not self.model:
            raise ValueError("the llm proposer needs a model name: pass model or set TDCDIFF_LLM_MODEL")
        if retries < 0:
            raise ValueError(f"retries must be >= 0, got {retries}")
        self._api_key = api_key or _env("TDCDIFF_LLM_API_KEY", "OPENAI_API_KEY")
        self.temperature, self.timeout, self.retries, self.backoff = temperature, timeout, retries, backoff
        self.max_memory_entries, self.fallback = max_memory_entries, fallback
        self.context: SearchContext | None = None
        self.fallbacks = 0
        self.last_source = self.name

    def __repr__(self) -> str:
        return f"LLMProposer(base_url={self.base_url!r}, model={self.model!r})"  # never the key

    def set_context(self, context: SearchContext) -> None:
        """Budget and unit facts for the prompt (the search calls this before the first round)."""
        self.context = context

    def propose(self, units: list[str], memory_view: list[Entry], n: int, rng: random.Random) -> list[Decision]:
        """Up to n valid decisions from the model (see Proposer.propose); rng is only used by the fallback."""
        messages = [
            {"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": self.prompt(units, memory_view, n)},
        ]
        tries = 1 + self.retries
        for attempt in range(tries):
            try:
                decisions = parse_decisions(self._ask(messages), units)[:n]
                self.last_source = self.name
                return decisions
            except (OSError, ValueError, http.client.HTTPException) as err:  # URLError, HTTPError, timeouts: OSError
                reason = self._redact(f"{type(err).__name__}: {err}")
                log.info("llm proposer: try %d of %d gave no usable answer (%s)", attempt + 1, tries, reason)
                if attempt + 1 < tries:
                    time.sleep(self.backoff * 2**attempt)
        if self.fallback is None:
            raise LLMProposerError(
                f"the llm proposer at {self.base_url} gave no usable answer in {tries} tries ({reason})"
            )
        self.fallbacks += 1
        self.last_source = f"{self.fallback.name} (llm fallback)"
        log.warning(
            "llm proposer: no usable answer from %s in %d tries (last: %s); falling back to %s for this round",
            self.base_url, tries, reason, self.fallback.name,
        )
        return self.fallback.propose(units, memory_view, n, rng)

    def prompt(self, units: list[str], memory_view: list[Entry], n: int) -> str:
        """The user message: units, budget, memory table and the answer format."""
        info = self.context.unit_info if self.context else {}
        unit_lines = [f"- {u}" + (f" ({_facts(info[u])})" if info.get(u) else "") for u in units]
        budget = (
            f"The {self.context.budget_unit} budget is {self.context.budget_fraction:.3f} of the unpruned model's "
            f"{self.context.budget_unit}."
            if self.context else "The FLOPs budget is fixed; decisions are rescaled to meet it."
        )
        memory = MemoryBank(list(memory_view)).summary_for_prompt(self.max_memory_entries)
        example = {"decisions": [{u: 0.3 for u in units[:2]}]}
        return "\n".join([
            "Prunable units (in network order):", *unit_lines, "", budget, "",
            "Candidates evaluated so far (best first; decisions shown after rescaling to the budget):", memory, "",
            f"Propose {n} new, different decisions that you expect to score lower (better) than those above.",
            f"Each ratio is a number in [0, {MAX_RATIO}]; each layer unit is 0 (keep) or 1 (remove); units you "
            "leave out get 0 (not pruned, kept).",
            f'Answer ONLY a JSON object of the form {json.dumps(example)} with {n} entries in "decisions".',
        ])

    def _ask(self, messages: list[dict]) -> str:
        body = json.dumps({"model": self.model, "messages": messages, "temperature": self.temperature}).encode()
        headers = {"Content-Type": "application/json"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        request = urllib.request.Request(f"{self.base_url}/chat/completions", data=body, headers=headers, method="POST")
        with urllib.request.urlopen(request, timeout=self.timeout) as response:
            # Redacted before parsing, so no error message quoting the answer can carry the key.
            reply = json.loads(self._redact(response.read().decode("utf-8")))
        try:
            return reply["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError) as err:
            raise ValueError(
                f"not a chat-completions answer (no choices[0].message.content): {str(reply)[:200]}"
            ) from err

    def _redact(self, text: str) -> str:
        # An endpoint may echo the request headers back in an error body.
        return text.replace(self._api_key, "***") if self._api_key else text


def _facts(facts: dict) -> str:
    return ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in facts.items())


def parse_decisions(text: str, units: list[str]) -> list[Decision]:
    """The valid decisions in a model's answer; ValueError when there are none.

    text: the answer: a JSON object {"decisions": [...]} or a bare list, possibly inside ```json fences
        or surrounded by prose.
    units: the known unit names. A candidate is dropped when it names an unknown unit, has a ratio that is
        not a number in [0, 0.95], or a layer unit that is not 0 or 1; units it leaves out get 0.
    """
    data = _extract_json(text)
    candidates = data.get("decisions") if isinstance(data, dict) else data
    if not isinstance(candidates, list):
        raise ValueError('the answer has no "decisions" list')
    valid, problems = [], []
    for i, candidate in enumerate(candidates):
        problem = _problem(candidate, units)
        if problem:
            problems.append(f"#{i}: {problem}")
        else:
            valid.append({u: float(candidate.get(u, 0.0)) for u in units})
    if problems:
        log.info("llm proposer: dropped %d invalid candidate(s): %s", len(problems), "; ".join(problems)[:500])
    if not valid:
        raise ValueError(f"no valid candidate among {len(candidates)}")
    return valid


def _extract_json(text: str):
    for chunk in [m.group(1) for m in _FENCE.finditer(text)] + [text]:
        try:
            return json.loads(chunk)
        except ValueError:
            pass
    # Prose around the object: take the outermost braces.
    start, end = text.find("{"), text.rfind("}")
    if 0 <= start < end:
        try:
            return json.loads(text[start : end + 1])
        except ValueError:
            pass
    raise ValueError(f"the answer is not JSON: {text[:200]!r}")


def _problem(candidate, units: list[str]) -> str | None:
    if not isinstance(candidate, dict):
        return "not an object"
    unknown = sorted(set(candidate) - set(units))
    if unknown:
        return f"unknown units {unknown}"
    for unit, ratio in candidate.items():
        if is_depth_unit(unit):
            if isinstance(ratio, bool) or ratio not in (0, 1):
                return f"{unit}={ratio!r} is a layer: 0 (keep) or 1 (remove)"
            continue
        number = isinstance(ratio, (int, float)) and not isinstance(ratio, bool)
        if not number or not math.isfinite(ratio) or not 0 <= ratio <= MAX_RATIO:
            return f"{unit}={ratio!r} is not a number in [0, {MAX_RATIO}]"
    return None
