"""What tuning cost against what the chosen bundle returns: time and FLOPs per phase, throughput at a few batch
sizes, payback in images and, with a price, the cost per 1,000 images."""

from __future__ import annotations

import json
import statistics

from ..files import atomic_write_text
from .measures import time_models
from .output import write_csv
from .records import read_phases


def payback_images(tuning_seconds: float, base_seconds_per_image: float,
                   chosen_seconds_per_image: float) -> float | None:
    """Images after which the sampling time saved equals the time spent tuning; None when nothing is saved."""
    saving = base_seconds_per_image - chosen_seconds_per_image
    return tuning_seconds / saving if saving > 0 else None


def cost_per_1000(seconds_per_image: float, price_per_hour: float) -> float:
    """The price of generating 1,000 images at `seconds_per_image` on a machine costing `price_per_hour`."""
    return 1000 * seconds_per_image / 3600 * price_per_hour


def phases_of_others(chosen: dict, others: list[dict]) -> list[dict]:
    """The time/FLOPs records of every phase of the candidates other than the chosen one (result.json records),
    each shared quality-curves measurement counted once: curves are measured once per (N, grouping) and
    every "TDC curves" candidate of that pair carries the same record, the chosen one included."""
    counted = {json.dumps(chosen["phases"].get("curves"), sort_keys=True)}
    phases = []
    for record in others:
        for name, phase in record["phases"].items():
            if name == "curves":
                key = json.dumps(phase, sort_keys=True)
                if key in counted:
                    continue
                counted.add(key)
            phases.append(phase)
    return phases


def _total(items: list[dict | None]) -> dict:
    """The sum of phase records (records.since()'s; None items are left out); FLOPs None when none has any."""
    items = [i for i in items if i]
    flops = [i["flops"] for i in items if i.get("flops") is not None]
    return {"wall_s": round(sum(i["wall_s"] for i in items), 2), "cpu_s": round(sum(i["cpu_s"] for i in items), 2),
            "flops": sum(flops) if flops else None}


def _phase_rows(tune, chosen: str) -> list[dict]:
    """The cost table: stage 1, the chosen candidate's search and stage 2 (none when the base was chosen, at a
    free setting), the other candidates, the measurements, and the total of tuning (everything after stage 1)."""
    phases = read_phases(tune.dir)
    records = [r for s in tune.candidates if (r := tune.result(s["index"])) is not None and "failed" not in r]
    mine = next((r for r in records if r["name"] == chosen), {"phases": {"search": None, "stage2": None}})
    others = [r for r in records if r["name"] != chosen]
    stage1 = phases.get("stage1")
    rows = [
        {"phase": "stage 1 (base)", **(stage1 or {"wall_s": None, "cpu_s": None, "flops": None}),
         "note": "trained here" if stage1 else "not run here (the base was given)"},
        {"phase": "search (chosen)", **_total([mine["phases"]["search"], mine["phases"].get("curves")]),
         "note": "pruning search" + (" + quality curves (their training)" if "curves" in mine["phases"] else "")
                 + "; proxy FLOPs not counted"},
        {"phase": "stage 2 (chosen)", **_total([mine["phases"]["stage2"]]), "note": "fine-tuning"},
        {"phase": "tuning (other candidates)", **_total(phases_of_others(mine, others)),
         "note": f"{len(others)} candidates: search + stage 2"},
        {"phase": "tuning (screening + FID)",
         **_total([phases.get("screening"), phases.get("sample screen"), phases.get("finalists")]),
         "note": "measurements (last run's)"},
    ]
    rows.append({"phase": "total tuning", **_total(rows[1:]), "note": "everything after stage 1"})
    return rows


def write_cost(tune, models: dict, chosen: dict) -> dict:
    """Cost and return of the chosen bundle (`chosen`: its results.json row, a point of tune.points; models:
    measures.load_models'), against the reference (the base at the reference setting):
    time and FLOPs per phase, throughput gained at batch 1 and TuneConfig.batch (the headline's batches: a batch
    the user did not ask for may not fit in memory, and check_base_run checked only theirs), payback in images,
    and with TuneConfig.price_per_hour, the cost per 1,000 images before and after. Writes cost.json, cost.csv
    (per phase) and return.csv (per batch size) into tune.dir; returns cost.json's dict."""
    rows = _phase_rows(tune, chosen["model"])
    tuning, price = rows[-1], tune.config.price_per_hour
    batches = sorted({1, tune.config.batch})
    tune.say(f"timing: base vs chosen at batches {batches}")
    throughput = []
    for b in batches:
        rounds = time_models(tune, models, ["base", chosen["name"]], b)
        t = {n: statistics.median(r) for n, r in rounds.items()}
        base_s, chosen_s = t["base"] / b, t[chosen["name"]] / b
        item = {"batch": b, "base_images_per_s": 1 / base_s, "chosen_images_per_s": 1 / chosen_s,
                "speedup": base_s / chosen_s, "payback_images": payback_images(tuning["cpu_s"], base_s, chosen_s)}
        if price is not None:
            item["base_cost_per_1000"] = cost_per_1000(base_s, price)
            item["chosen_cost_per_1000"] = cost_per_1000(chosen_s, price)
        throughput.append(item)
    cost = {"chosen": chosen["name"], "phases": rows, "throughput": throughput,
            "tuning_cost": tuning["cpu_s"] / 3600 * price if price is not None else None,
            "notes": "times are process CPU seconds (wall seconds beside them); payback = tuning CPU seconds / "
                     "CPU seconds saved per image; stage 1 is not counted in the payback (the base exists "
                     "either way); an interrupted phase counts only its last, resumed part"}
    atomic_write_text(tune.dir / "cost.json", json.dumps(cost, indent=2))
    for name, table in (("cost.csv", rows), ("return.csv", throughput)):
        write_csv(tune.dir / name, table, list(table[0]))
    return cost


def cost_rows(cost: dict, price: bool) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """The cost table (per phase) and the return table (per batch size) as strings; price: show the cost per
    1,000 images (cost.json has it)."""
    def num(value, unit=""):
        return "-" if value is None else f"{value:.1f}{unit}"

    phases = [{"phase": r["phase"], "wall": num(r["wall_s"], " s"), "CPU": num(r["cpu_s"], " s"),
               "train TFLOPs": "-" if r["flops"] is None else f"{r['flops'] / 1e12:.2f}", "note": r["note"]}
              for r in cost["phases"]]
    returns = []
    for t in cost["throughput"]:
        row = {"batch": str(t["batch"]), "base img/s": f"{t['base_images_per_s']:.1f}",
               "chosen img/s": f"{t['chosen_images_per_s']:.1f}", "speedup": f"{t['speedup']:.2f}x",
               "pays back after": ("never (no saving)" if t["payback_images"] is None
                                   else f"{t['payback_images']:,.0f} images")}
        if price:
            row["cost / 1k images"] = f"{t['base_cost_per_1000']:.4f} -> {t['chosen_cost_per_1000']:.4f}"
        returns.append(row)
    return phases, returns
