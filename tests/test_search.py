"""Proxy-based pruning: the proxy score, proposers, memory bank and the multi-round search (digits-8 UNet)."""

import json
import random
from dataclasses import asdict

import pytest
import torch

from tdcdiff.flops import count_flops
from tdcdiff.models import build_unet
from tdcdiff.prune.fit import fit_to_budget
from tdcdiff.prune.llm import LLMProposer
from tdcdiff.prune.memory import Entry, MemoryBank
from tdcdiff.prune.proposers import EvolutionProposer, UniformProposer
from tdcdiff.prune.proxy import Proxy, ProxyBatch, finetune
from tdcdiff.prune.search import SearchConfig, get_proposer, search

SHAPE = (1, 8, 8)
GROUP = range(250, 500)
UNITS = ["down_blocks.0", "down_blocks.1", "mid_block", "up_blocks.0", "up_blocks.1"]


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.one_thread


@pytest.fixture(scope="module")
def base(digits, scheduler):
    """A digits-8 UNet trained 150 steps on the first 1500 digits (about 10 s): enough to make pruning hurt."""
    torch.manual_seed(0)
    model = build_unet("digits-8")
    return finetune(model, digits.images[:1500], scheduler, range(1000), steps=150, lr=2e-3, batch_size=64).eval()


@pytest.fixture(scope="module")
def batch(digits, scheduler):
    return ProxyBatch.make(digits.images[1500:], GROUP, scheduler, size=64, seed=0)


@pytest.fixture(scope="module")
def proxy(base, batch, scheduler):
    return Proxy(base, batch, scheduler)


@pytest.fixture(scope="module")
def budget(base):
    return int(0.6 * count_flops(base, SHAPE))


class Spy:
    """Wraps a proposer and records how many memory entries it was shown each round."""

    def __init__(self, inner):
        self.inner, self.name, self.shown = inner, inner.name, []

    def propose(self, units, memory_view, n, rng):
        self.shown.append(len(memory_view))
        return self.inner.propose(units, memory_view, n, rng)


EVOLUTION = SearchConfig(rounds=3, candidates_per_round=3, proposer="evolution", seed=0)


@pytest.fixture(scope="module")
def evolution(base, budget, proxy, tmp_path_factory):
    spy = Spy(EvolutionProposer())
    log_path = tmp_path_factory.mktemp("search") / "search.jsonl"
    result = search(base, budget, SHAPE, proxy, EVOLUTION, proposer=spy, progress=False, log_path=log_path)
    return result, spy, log_path


@pytest.fixture(scope="module")
def uniform(base, budget, proxy):
    return search(base, budget, SHAPE, proxy, SearchConfig(rounds=3, candidates_per_round=3, proposer="uniform"),
                  progress=False)


# --- proxy ---------------------------------------------------------------------------------------------


def test_proxy_batch_is_fixed_and_covers_the_group(digits, scheduler, batch):
    again = ProxyBatch.make(digits.images[1500:], GROUP, scheduler, size=64, seed=0)
    for a, b in ((batch.images, again.images), (batch.timesteps, again.timesteps), (batch.noise, again.noise)):
        assert torch.equal(a, b)
    assert batch.images.shape == (64, *SHAPE) and batch.noise.shape == (64, *SHAPE)
    assert 250 <= int(batch.timesteps.min()) < 260 and 490 <= int(batch.timesteps.max()) < 500  # stratified
    other = ProxyBatch.make(digits.images[1500:], GROUP, scheduler, size=64, seed=1)
    assert not torch.equal(batch.noise, other.noise)
    with pytest.raises(ValueError, match="0..999"):
        ProxyBatch.make(digits.images, range(990, 1010), scheduler)


def test_base_scores_exactly_one(base, batch, scheduler, proxy):
    assert proxy.score(base) == pytest.approx(1.0, abs=1e-6)
    assert Proxy(base, batch, scheduler, space="x0").score(base) == pytest.approx(1.0, abs=1e-6)


def test_pruned_model_scores_worse_and_fine_tuning_recovers(base, batch, scheduler, proxy, budget):
    pruned = fit_to_budget(base, {}, budget, SHAPE).model
    before = [p.clone() for p in pruned.parameters()]
    relative = proxy.score(pruned)
    assert relative > 1.05
    assert Proxy(base, batch, scheduler, space="x0").score(pruned) > 1.05
    tuned = Proxy(base, batch, scheduler, finetune_steps=10, finetune_lr=1e-3, finetune_batch_size=32).score(pruned)
    assert tuned < relative
    assert all(torch.equal(a, b) for a, b in zip(before, pruned.parameters()))  # a copy was fine-tuned


# --- proposers and memory (no pruning) ---------------------------------------------------------------


def test_evolution_proposer_first_round_and_determinism():
    first = EvolutionProposer().propose(UNITS, [], 4, random.Random(3))
    assert first[0] == {u: 0.3 for u in UNITS}  # the uniform shape: never worse than the baseline
    assert len(first) == 4 and len({tuple(d.values()) for d in first}) == 4
    memory = [Entry(0, d, 100, 100, score, "evolution") for d, score in zip(first, (1.4, 1.2, 1.9, 1.3))]
    children = EvolutionProposer(top_k=2).propose(UNITS, memory, 6, random.Random(5))
    assert children == EvolutionProposer(top_k=2).propose(UNITS, memory, 6, random.Random(5))
    assert all(set(c) == set(UNITS) and all(0 <= r <= 0.9 for r in c.values()) for c in children)
    parents = (first[1], first[3])  # top-2 by score; each ratio comes from one of them, perturbed
    assert all(child not in parents for child in children)  # every child is mutated
    for child in children:
        assert all(min(abs(child[u] - p[u]) for p in parents) < 0.5 for u in UNITS)


def test_uniform_proposer_proposes_one_shape():
    assert UniformProposer(0.2).propose(UNITS, [], 5, random.Random(0)) == [{u: 0.2 for u in UNITS}]


def test_memory_best_view_and_prompt_summary():
    bank = MemoryBank(enabled=False)
    bank.add(Entry(0, {"a": 0.2, "b": 0.4}, 590, 600, 1.5, "evolution", "repair scale 1.000"))
    bank.add(Entry(0, {"a": 0.9, "b": 0.9}, 0, 600, None, "evolution", "not fitted"))
    bank.add(Entry(1, {"a": 0.3, "b": 0.1}, 610, 600, 1.25, "llm"))
    assert [e.score for e in bank.best(5)] == [1.25, 1.5]  # failed entries are never "best"
    assert bank.view() == [] and len(bank) == 3  # memory off: hidden from the proposer, still recorded
    table = bank.summary_for_prompt(max_entries=1)
    assert "1 | 1 | llm | 1.017 | 1.2500 | a=0.30, b=0.10" in table
    assert "(1 worse candidates not shown)" in table and "(1 candidates could not be fitted" in table
    assert MemoryBank().summary_for_prompt() == "(no candidates evaluated yet)"


def test_unknown_proposer_lists_the_valid_names():
    with pytest.raises(ValueError, match=r"unknown proposer 'gpt-5'.*evolution.*uniform.*llm"):
        get_proposer("gpt-5")


# --- search ----------------------------------------------------------------------------------------


@pytest.mark.slow
def test_evolution_with_memory_beats_uniform(evolution, uniform):
    result, _, _ = evolution
    assert len(uniform.memory) == 1  # one distinct candidate, no wasted rounds
    assert result.score <= uniform.score, f"proxy score at 60% FLOPs: evolution {result.score}, uniform {uniform.score}"
    # The uniform shape is the evolution's first candidate: the same model and score as the baseline.
    assert result.memory.entries[0].decision == uniform.decision
    assert result.memory.entries[0].score == pytest.approx(uniform.score)
    # ... and the rounds that saw the memory found better decisions than the first round.
    first_round = min(e.score for e in result.memory.entries if e.round == 0)
    later = min(e.score for e in result.memory.entries if e.round > 0)
    assert later < first_round and result.score == later


@pytest.mark.slow
def test_result_flops_are_within_tolerance_of_the_budget(evolution, uniform, budget):
    for result in (evolution[0], uniform):
        measured = count_flops(result.model, SHAPE)
        assert measured == result.flops and abs(measured - budget) <= 0.03 * budget
        assert result.budget == budget
    assert all(abs(e.flops - budget) <= 0.03 * budget for e in evolution[0].memory.entries)


@pytest.mark.slow
def test_search_is_deterministic(base, budget, proxy, evolution):
    first, _, _ = evolution
    again = search(base, budget, SHAPE, proxy, EVOLUTION, progress=False)
    assert again.decision == first.decision and again.score == first.score
    assert [(e.decision, e.score) for e in again.memory.entries] == [(e.decision,
                                                                      e.score) for e in first.memory.entries]


@pytest.mark.slow
def test_memory_is_shown_logged_and_round_trips(evolution, tmp_path):
    result, spy, log_path = evolution
    per_round = [sum(e.round == r for e in result.memory.entries) for r in range(3)]
    assert spy.shown == [0, per_round[0], per_round[0] + per_round[1]]
    lines = log_path.read_text().splitlines()
    assert [json.loads(line) for line in lines] == [asdict(e) for e in result.memory.entries]
    assert MemoryBank.from_json(result.memory.to_json()) == result.memory
    path = result.memory.save(tmp_path / "run" / "memory.json")
    assert MemoryBank.load(path) == result.memory and [p.name for p in path.parent.iterdir()] == ["memory.json"]


def test_memory_off_shows_nothing_but_records_everything(base, budget, proxy):
    spy = Spy(EvolutionProposer())
    config = SearchConfig(rounds=2, candidates_per_round=2, memory=False, seed=1)
    result = search(base, budget, SHAPE, proxy, config, proposer=spy, progress=False)
    assert spy.shown == [0, 0]
    # Seeing no memory, round 1 starts afresh: its uniform shape repeats round 0's and is skipped.
    assert [e.round for e in result.memory.entries] == [0, 0, 1]
    assert not result.memory.enabled and result.memory.view() == []
    assert result.score == min(e.score for e in result.memory.entries)


def test_taylor_importance_is_calibrated_on_the_group(base, budget, proxy):
    config = SearchConfig(rounds=1, candidates_per_round=1, importance="taylor")
    result = search(base, budget, SHAPE, proxy, config, progress=False)
    assert result.score > 1 and abs(result.flops - budget) <= 0.03 * budget


def test_budget_at_or_above_the_base_returns_an_unpruned_copy(base, proxy):
    full = count_flops(base, SHAPE)
    result = search(base, full, SHAPE, proxy, SearchConfig(), progress=False)
    assert (result.score, result.flops, len(result.memory)) == (1.0, full, 0)
    assert result.model is not base and set(result.decision.values()) == {0.0}


@pytest.mark.parametrize(
    "change, message",
    [
        ({"rounds": 0}, "rounds must be >= 1, got 0"),
        ({"candidates_per_round": -1}, "candidates_per_round must be >= 1, got -1"),
        ({"proposer": "gpt"}, "unknown proposer 'gpt'"),
        ({"importance": "l1"}, "unknown importance 'l1'"),
        ({"proxy_space": "epsilon"}, "unknown proxy_space 'epsilon'"),
        ({"proxy_finetune_steps": -2}, "proxy_finetune_steps must be >= 0"),
        ({"tolerance": 0}, r"tolerance must be in \(0, 1\), got 0"),
        ({"proxy_space": "x0"}, "build the Proxy from the config's settings"),
        ({"units": {"a": "down_blocks.0"}}, "units must map unit names to lists of module names"),
        ({"ignored_layers": "conv_in"}, "ignored_layers must be a list of module names"),
        ({"num_heads": {"mid_block.attentions.0": 0}}, "num_heads must map attention module names to positive"),
    ],
)
def test_invalid_config_is_named(base, budget, proxy, change, message):
    with pytest.raises(ValueError, match=message):
        search(base, budget, SHAPE, proxy, SearchConfig(**change), progress=False)


def test_invalid_budget_and_scorer(base, proxy):
    with pytest.raises(ValueError, match="budget_flops must be > 0"):
        search(base, 0, SHAPE, proxy, SearchConfig(), progress=False)

    class Constant:
        def score(self, model):
            return 1.0

    with pytest.raises(ValueError, match="taylor.*needs a Proxy"):
        search(base, 1000, SHAPE, Constant(), SearchConfig(importance="taylor"), progress=False)


def test_llm_proposer_gets_the_task_context(base, budget, proxy, monkeypatch):
    prompts = []

    def answer(self, messages):  # stands in for the endpoint (HTTP is covered by test_llm_proposer.py)
        prompts.append(messages[-1]["content"])
        return json.dumps({"decisions": [{"down_blocks.0": 0.4, "up_blocks.1": 0.2},
                                         {"mid_block": 0.5, "up_blocks.0": 0.3}]})

    monkeypatch.setattr(LLMProposer, "_ask", answer)
    proposer = LLMProposer("http://127.0.0.1:9/v1", "test-model", "sk-unused")
    result = search(base, budget, SHAPE, proxy, SearchConfig(rounds=3, candidates_per_round=2), proposer=proposer,
                    progress=False)
    assert [e.proposer for e in result.memory.entries] == ["llm", "llm"]
    assert len(prompts) == 2  # round 1 repeated round 0's answer: nothing new, so the search stopped
    assert "FLOPs budget is 0.600 of the unpruned" in prompts[0] \
        and "up_blocks.0 (channels=64, flops_share=0.39)" in prompts[0]
    assert "(no candidates evaluated yet)" in prompts[0] and f"{result.score:.4f}" in prompts[1]


@pytest.mark.slow
def test_llm_fallback_rounds_are_labelled_in_the_memory_bank(base, budget, proxy, monkeypatch):
    answers = iter([json.dumps({"decisions": [{"down_blocks.0": 0.4, "up_blocks.1": 0.2}]})])

    def answer(self, messages):  # one good answer, then the endpoint is gone
        try:
            return next(answers)
        except StopIteration:
            raise OSError("connection refused") from None

    monkeypatch.setattr(LLMProposer, "_ask", answer)
    proposer = LLMProposer("http://127.0.0.1:9/v1", "test-model", "sk-unused", retries=0,
                            fallback=EvolutionProposer(sigma=0.3))  # big steps: children that repair to new shapes
    result = search(base, budget, SHAPE, proxy, SearchConfig(rounds=3, candidates_per_round=4), proposer=proposer,
                    progress=False)
    sources = [(e.round, e.proposer) for e in result.memory.entries]
    assert sources[0] == (0, "llm") and sources[1:] and {s for r, s in sources[1:]} == {"evolution (llm fallback)"}
    assert proposer.fallbacks == 2


@pytest.mark.slow
def test_search_with_depth_proposes_and_remembers_layer_units(base, proxy, budget):
    """With depth on, the evolution proposer's decisions also keep/remove layers (0/1), the repair keeps them
    0/1, and the winner's removed layers are gone from its modules."""
    from tdcdiff.surgery.depth import removed_units

    result = search(base, budget, SHAPE, proxy, SearchConfig(rounds=2, candidates_per_round=4, depth=True),
                    progress=False)
    layers = ["mid_block.resnets.0", "mid_block.resnets.1"]
    for entry in result.memory.entries:
        assert set(layers) <= set(entry.decision) and {entry.decision[u] for u in layers} <= {0.0, 1.0}
        assert not all(entry.decision[u] for u in layers)  # the mid block keeps a layer
    assert any(e.decision["mid_block.resnets.0"] or e.decision["mid_block.resnets.1"] for e in result.memory.entries)
    assert removed_units(result.model) == [u for u in layers if result.decision[u]]
    assert "layer units: 1=removed" in result.memory.summary_for_prompt()


def test_proposers_treat_layer_units_as_flags():
    units = ["down_blocks.0", "mid_block", "mid_block.resnets.1", "up_blocks.0.attentions.0"]
    assert UniformProposer(ratio=0.4).propose(units, [], 3, random.Random(0)) == [
        {"down_blocks.0": 0.4, "mid_block": 0.4, "mid_block.resnets.1": 0.0, "up_blocks.0.attentions.0": 0.0}
    ]
    evolution = EvolutionProposer(mutate_prob=1.0, init_remove=1.0)
    first = evolution.propose(units, [], 3, random.Random(0))
    assert [[d[u] for u in units[2:]] for d in first] == [[0.0, 0.0], [1.0, 1.0], [1.0, 1.0]]  # uniform, randoms
    parent = Entry(0, {"down_blocks.0": 0.3, "mid_block": 0.3, "mid_block.resnets.1": 1.0,
                       "up_blocks.0.attentions.0": 0.0}, 1, 1, 0.5, "evolution")
    child = evolution.propose(units, [parent], 1, random.Random(0))[0]
    assert (child["mid_block.resnets.1"], child["up_blocks.0.attentions.0"]) == (0.0, 1.0)  # every unit mutated
