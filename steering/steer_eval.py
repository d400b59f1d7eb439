"""`tinymorph steer eval`: does steering put the concept in the text, and does the text stay good?

Why a built-in evaluation: steering is judged by two numbers that pull against each other —
concept presence and fluency — and every change to labels, search, units or calibration moves
both. The concept set (steering/data/eval/concepts.json: topics and registers, each with a
lexicon and a few examples) and the neutral prompts ship with the package, so the same run is
how strengths are calibrated and how regressions are caught. A second set of 20 other concepts
(`heldout.json`, no examples; `--concept-set heldout`) checks that a change tried on the first set
holds on concepts it was not tried on. A third (`strict.json`, `--concept-set strict`: 20 more
concepts, their lexicons only words of the concept, none a story could use anyway like "night" or
"game") is harder to hit by chance and was not used to tune anything but the fit's word bonus.

Metrics per method and strength (continuations of neutral prompts decoded as the editor's are —
greedy with the engine's mild repetition penalty — batched on the engine's own model and steering
hooks):
- hit rate: share of continuations that contain a word of the concept's lexicon;
- mean hits: lexicon words per continuation;
- perplexity of the continuation under the unsteered model, given the plain prompt;
- rep3: share of repeated word 3-grams in the continuation ("the the the" loops), and "repeating":
  the share of continuations with any (a rate of 0.005 can be one loop or many small echoes);
- speed cost: decode tokens/s with steering vs without, on the engine's normal path.
Methods: unsteered, prompting (the concept written before the prompt), the top search result
(the best SAE features steered together, at strengths calibrated as `steer add` calibrates them; "on
the concept" judges the best single feature's label), "feature" (that best feature alone; opt-in),
the described concept vector (raw strengths and calibrated), and a DiffMean vector from the concept's
examples.
"""

from __future__ import annotations

import json
import math
import re
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .batch import BatchRunner
from .calibration import TOKENS, rep3
from .distill import PROMPT_TEMPLATE as PROMPTING_TEMPLATE  # the eval's prompting is what vectors distil
from .steering import LayerEdit, ResolvedPlan

DATA = Path(__file__).parent / "data" / "eval" / "concepts.json"
CONCEPT_SETS = {"main": DATA, "heldout": DATA.with_name("heldout.json"),  # shipped sets by name
                "strict": DATA.with_name("strict.json")}
SUFFIXES = "(?:s|es|ed|d|ing|er|ers|ies|ly)?"


@dataclass
class Concept:
    name: str
    kind: str
    description: str
    query: str
    lexicon: list[str]
    examples: list[str] = field(default_factory=list)

    def pattern(self) -> re.Pattern:
        words = sorted((w.lower() for w in self.lexicon), key=len, reverse=True)
        alts = "|".join(re.escape(w) + ("" if " " in w else SUFFIXES) for w in words)
        return re.compile(rf"\b(?:{alts})\b", re.IGNORECASE)


@dataclass
class EvalSet:
    concepts: list[Concept]
    prompts: list[str]


def load_eval_set(path: str | Path | None = None) -> EvalSet:
    """A shipped set by name (`CONCEPT_SETS`) or a JSON file of the same shape (default: main).
    A set without prompts uses the main set's."""
    path = CONCEPT_SETS.get(str(path), path) if path else DATA
    data = json.loads(Path(path).read_text())
    prompts = data.get("prompts") or json.loads(DATA.read_text())["prompts"]
    return EvalSet([Concept(**c) for c in data["concepts"]], prompts)


def feature_on_concept(info: dict, pattern: re.Pattern) -> bool:
    """Whether a found feature is about the concept: its readable phrase contains a word of the
    concept's lexicon, or at least half of the tokens it fires on most are such words (a feature
    that fires on 'Q', ' war', ' put', ... is not a war feature)."""
    if pattern.search(info.get("phrase", "")):
        return True
    fired = [t.strip() for t in info.get("top_act_tokens", [])[:6] if t.strip()]
    return bool(fired) and 2 * sum(bool(pattern.fullmatch(t)) for t in fired) >= len(fired)


def count_hits(text: str, pattern: re.Pattern) -> int:
    return len(pattern.findall(text))


@dataclass
class Row:
    """One continuation to produce: the prompt the model sees, the prompt fluency is judged on, and
    the steering delta for its row (None = unsteered)."""

    concept: Concept | None
    prompt: str
    judged_prompt: str
    pushes: dict[int, torch.Tensor] | None = None  # residual delta per layer (None = unsteered)
    written: dict[int, torch.Tensor] | None = None  # the same at the generated tokens (None: `pushes`)


@dataclass
class Result:
    method: str
    strength: float | None
    n: int
    hit_rate: float
    mean_hits: float
    perplexity: float
    rep3: float
    repeating: float = 0.0  # share of continuations with a repeated word 3-gram
    examples: list[dict] = field(default_factory=list)
    per_concept: dict[str, float] = field(default_factory=dict)


class Generator:
    """Batched continuation + scoring over an `Engine` (same model and hooks as completions)."""

    def __init__(self, engine, tokens: int, batch: int = 48, steer_prompt: bool = True, steer_new: bool = True):
        self.engine = engine
        self.steer_prompt, self.steer_new = steer_prompt, steer_new
        self.tokens = tokens
        self.batch = batch
        self.runner = BatchRunner(engine.model, engine.hooks, engine.special_ids)
        self.stop = sorted(engine.eos_ids)

    def run(self, rows: Sequence[Row]) -> list[tuple[str, float]]:
        """(continuation text, mean NLL under the unsteered model given `judged_prompt`) per row."""
        out: list[tuple[str, float]] = []
        tok = self.engine.tokenize
        for start in range(0, len(rows), self.batch):
            chunk = rows[start:start + self.batch]
            prompts = [tok(r.prompt) for r in chunk]
            plan = _row_plan(chunk, self.engine.info.d_model)
            ids = self.runner.generate(prompts, self.tokens, plan, self.stop, self.steer_prompt, self.steer_new)
            ids = [[t for t in seq if t not in self.engine.eos_ids] for seq in ids]
            nll, _ = self.runner.score([tok(r.judged_prompt) for r in chunk], ids)
            out += [(self.engine.detokenize(seq), n) for seq, n in zip(ids, nll, strict=True)]
        return out


def _row_plan(rows: Sequence[Row], d_model: int) -> ResolvedPlan | None:
    layers = sorted({layer for r in rows if r.pushes for layer in r.pushes})
    if not layers:
        return None
    zero = torch.zeros(d_model)

    def stacked(layer: int, written: bool) -> torch.Tensor:
        return torch.stack([((r.written if written and r.written is not None else r.pushes) or {}).get(
            layer, zero).float() for r in rows])[:, None, :]

    return {layer: LayerEdit(add=stacked(layer, False), written=stacked(layer, True)) for layer in layers}


def pushes_of(handles, strength: float, writing: bool = False) -> dict[int, torch.Tensor]:
    """Residual delta per layer of `add` at `strength` for a reference's handles (`writing`: at the
    tokens the model writes)."""
    out: dict[int, torch.Tensor] = {}
    for h in handles:
        for layer, delta in h.add_deltas(strength, writing=writing).items():
            out[layer] = out[layer] + delta if layer in out else delta
    return out


def summarize(method: str, strength: float | None, rows: Sequence[Row], outputs, keep_examples: int = 3) -> Result:
    hits, nlls, reps, examples = [], [], [], []
    per_concept: dict[str, list[int]] = {}
    for row, (text, nll) in zip(rows, outputs, strict=True):
        n = count_hits(text, row.concept.pattern()) if row.concept else 0
        hits.append(n)
        nlls.append(nll)
        reps.append(rep3(text))
        if row.concept:
            per_concept.setdefault(row.concept.name, []).append(int(n > 0))
        if len(examples) < keep_examples and row.concept and row.concept.name not in {e["concept"] for e in examples}:
            examples.append({"concept": row.concept.name, "prompt": row.judged_prompt, "text": text})
    return Result(method, strength, len(rows), sum(h > 0 for h in hits) / max(1, len(hits)),
                  statistics.fmean(hits) if hits else 0.0, math.exp(statistics.fmean(nlls)) if nlls else 0.0,
                  statistics.fmean(reps) if reps else 0.0, sum(r > 0 for r in reps) / max(1, len(reps)), examples,
                  {k: sum(v) / len(v) for k, v in per_concept.items()})


@dataclass
class EvalReport:
    results: list[Result]
    speed: dict
    config: dict
    search_top1: dict[str, str]
    seconds: float
    search_on_concept: dict[str, bool] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"results": [asdict(r) for r in self.results], "speed": self.speed, "config": self.config,
                "search_top1": self.search_top1, "search_on_concept": self.search_on_concept,
                "seconds": round(self.seconds, 1)}

    def table(self) -> str:
        base = next((r for r in self.results if r.method == "unsteered"), None)
        lines = [f"{'method':<22} {'strength':>8} {'hit':>6} {'hits':>6} {'ppl':>7} {'xppl':>6} {'rep3':>6} "
                 f"{'repeating':>9}",
                 "-" * 78]
        for r in self.results:
            x = r.perplexity / base.perplexity if base and base.perplexity else float("nan")
            s = "" if r.strength is None else f"{r.strength:g}"
            lines.append(f"{r.method:<22} {s:>8} {r.hit_rate:>6.0%} {r.mean_hits:>6.2f} {r.perplexity:>7.2f} "
                         f"{x:>6.2f} {r.rep3:>6.3f} {r.repeating:>9.0%}")
        if self.search_on_concept:
            on = sum(self.search_on_concept.values())
            lines.append(f"search top-1 on the concept: {on}/{len(self.search_on_concept)} "
                         f"({on / len(self.search_on_concept):.0%})")
        if self.speed:
            lines.append(f"decode: unsteered {self.speed['unsteered_tok_s']:.1f} tok/s, steered "
                         f"{self.speed['steered_tok_s']:.1f} tok/s ({self.speed['overhead_pct']:+.1f} %)")
        return "\n".join(lines)


def measure_speed(engine, resolve: Callable, reps: int = 3, tokens: int = 24) -> dict:
    """Decode tokens/s with and without a steering plan, alternating, medians."""
    from .engine import CompletionRequest
    from .generate import GenerationOptions
    from .steering import SteeringEntry, SteeringPlan

    plan = SteeringPlan((SteeringEntry("concept:about the sea", 1.0),))
    resolve(plan)  # build (or load) the vector outside the timing
    opts = GenerationOptions(max_tokens=tokens, stop="none")
    rates: dict[str, list[float]] = {"unsteered": [], "steered": []}
    text = "The committee met on Tuesday to discuss the budget for next year, and"
    for i in range(reps):
        for name, p in (("unsteered", None), ("steered", plan)):
            c = engine.complete(CompletionRequest(text, doc_id=f"speed-{name}-{i}", options=opts, steering=p))
            rates[name].append(c.timings.decode_tokens_per_s)
    u, s = statistics.median(rates["unsteered"]), statistics.median(rates["steered"])
    return {"unsteered_tok_s": u, "steered_tok_s": s, "overhead_pct": (u / s - 1) * 100 if s else float("nan")}


def plot(report: EvalReport, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    base = next((r for r in report.results if r.method == "unsteered"), None)
    by_method: dict[str, list[Result]] = {}
    for r in report.results:
        by_method.setdefault(r.method, []).append(r)
    for method, rs in by_method.items():
        xs = [r.perplexity for r in rs]
        ys = [r.hit_rate * 100 for r in rs]
        ax.plot(xs, ys, marker="o", label=method)
        for r in rs:
            if r.strength is not None:
                ax.annotate(f"{r.strength:g}", (r.perplexity, r.hit_rate * 100), fontsize=7,
                            textcoords="offset points", xytext=(3, 3))
    if base:
        ax.axvline(base.perplexity * 1.5, color="grey", linestyle=":", label="1.5x unsteered perplexity")
    ax.set_xlabel("perplexity of the continuation under the unsteered model")
    ax.set_ylabel("concept hit rate (%)")
    ax.set_title("tinymorph steer eval: concept vs fluency")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run_eval(engine, library, *, quick: bool = False, strengths: Sequence[float] | None = None,
             methods: Sequence[str] | None = None, concepts: Sequence[str] | None = None,
             concept_set: str | Path | None = None, log: Callable[[str], None] = lambda _m: None) -> EvalReport:
    """Evaluate every method on the shipped concept set (see module docstring)."""
    from .concepts import NEUTRAL_CONTEXTS
    from .features import search_features, show_feature
    from .library import ADD_FRACTION
    from .steering import SteeringError
    from .vectors import vector_from_examples

    started = time.perf_counter()
    es = load_eval_set(concept_set)
    chosen = [c for c in es.concepts if not concepts or c.name in concepts]
    prompts = es.prompts[:6] if quick else es.prompts
    strengths = list(strengths or ([0.5, 1.0, 2.0] if quick else [0.5, 1.0, 1.5, 2.0, 3.0]))
    methods = list(methods or ["unsteered", "prompting", "search", "described", "examples"])
    gen = Generator(engine, tokens=TOKENS)  # quick or not: the length calibration judges fluency over
    d_model, n_layers = engine.info.d_model, engine.info.layers
    results: list[Result] = []
    search_top1: dict[str, str] = {}
    on_concept: dict[str, bool] = {}

    def evaluate(method: str, strength: float | None, rows: list[Row]) -> None:
        if not rows:  # nothing this method could steer (e.g. no concept could be built)
            log(f"{method:<22} {'' if strength is None else strength:>5} skipped: nothing to steer")
            return
        t0 = time.perf_counter()
        res = summarize(method, strength, rows, gen.run(rows))
        results.append(res)
        log(f"{method:<22} {'' if strength is None else strength:>5} hit {res.hit_rate:5.0%} "
            f"ppl {res.perplexity:5.2f} rep3 {res.rep3:.3f} ({time.perf_counter() - t0:.0f} s)")

    if "unsteered" in methods:
        evaluate("unsteered", None, [Row(c, p, p) for c in chosen for p in prompts])
    if "prompting" in methods:
        evaluate("prompting", None, [Row(c, PROMPTING_TEMPLATE.format(description=c.description) + p, p)
                                     for c in chosen for p in prompts])
    if "search" in methods or "feature" in methods:
        handles, leads = {}, {}
        for c in chosen:
            found = search_features(library, c.query, limit=1, model=engine)
            if found:  # the first answer: the best features as a group; the best one is judged on its own
                search_top1[c.name] = f"{found[0]['id']} {found[0].get('label', '')}"
                best = found[0].get("members", [found[0]["id"]])[0]
                on_concept[c.name] = feature_on_concept(show_feature(library, best), c.pattern())
                for method, ref, out in (("search", found[0]["id"], handles), ("feature", best, leads)):
                    if method in methods:  # "feature": the group's best feature alone
                        library.calibrated(ref)  # strength 1 as `steer add` gives it
                        out[c.name] = library.handles(ref)
        for method, chosen_handles in (("search", handles), ("feature", leads)):
            for s in strengths if chosen_handles else ():
                evaluate(method, s, [Row(c, p, p, pushes_of(chosen_handles[c.name], s),
                                         pushes_of(chosen_handles[c.name], s, True))
                                     for c in chosen if c.name in chosen_handles for p in prompts])
    if "described" in methods:
        concept_handles = {}
        for c in chosen:
            try:
                concept_handles[c.name] = library.handles(f"concept:{c.description}")
            except SteeringError as exc:
                log(f"described {c.name}: {exc}")
        for s in strengths:
            evaluate("described", s, [Row(c, p, p, pushes_of(concept_handles[c.name], s),
                                          pushes_of(concept_handles[c.name], s, True))
                                      for c in chosen if c.name in concept_handles for p in prompts])
    if "examples" in methods:
        layer = round(0.4 * n_layers)  # the reference DiffMean's layer in every earlier run (12 of 30)
        rows = []
        for c in chosen:
            if not c.examples:
                continue
            vec = vector_from_examples(f"eval-{c.name}", engine.model, engine.tokenizer, c.examples,
                                       NEUTRAL_CONTEXTS, layer)
            push = {layer: ADD_FRACTION * vec.meta["resid_norm"] * vec.direction}
            rows += [Row(c, p, p, push) for p in prompts]
        evaluate("examples", 1.0, rows)
    try:
        speed = measure_speed(engine, engine.resolve)
    except SteeringError as exc:  # the speed probe's concept cannot be built on this model
        log(f"speed: {exc}")
        speed = {}
    config = {"quick": quick, "concept_set": str(concept_set or "main"), "prompts": len(prompts),
              "concepts": [c.name for c in chosen], "tokens": gen.tokens, "strengths": strengths,
              "model": engine.info.model, "dtype": engine.info.dtype,
              "concept_layers": library.concept_layers, "feature_span": library.feature_span, "d_model": d_model}
    return EvalReport(results, speed, config, search_top1, time.perf_counter() - started, on_concept)
