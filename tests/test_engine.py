"""Engine tests: exact reuse, stop rules, cancellation, the window policy, cache budget."""

from __future__ import annotations

import pytest
import torch

from tinymorph.steering.context import ContextPolicy, select_window
from tinymorph.steering.engine import CompletionRequest, Engine
from tinymorph.steering.generate import CancelToken, GenerationOptions, cut_at_stop
from tinymorph.steering.llama import load_llama

PROSE = (
    "The harbour was quiet in the early morning. Fishing boats rocked gently against the pier, "
    "and gulls circled above the masts, calling to one another over the sound of the waves. "
) * 8


def test_plain_model_matches_transformers(default_model_dir):
    """Our forward pass equals transformers' LlamaForCausalLM on the real default model (fp32)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(default_model_dir)
    ids = tok(PROSE, add_special_tokens=False).input_ids[:120]
    hf = AutoModelForCausalLM.from_pretrained(default_model_dir, dtype=torch.float32)
    with torch.no_grad():
        reference = hf(torch.tensor([ids])).logits[0]
    ours = load_llama(default_model_dir, torch.float32)
    logits = ours(ids, ours.new_cache(), n_logits=len(ids))
    assert (logits - reference).abs().max().item() < 1e-3


def test_prefix_reuse_equals_cold_prefill(default_model_dir):
    """Logits after reusing a cached prefix equal a cold prefill.

    Tolerance: fp32 1e-4 absolute; bf16 0.5 absolute on logits of magnitude ~20-30 (a few bf16 ulps;
    chunking changes the summation order) and the same argmax.
    """
    for dtype, tol in ((torch.float32, 1e-4), (torch.bfloat16, 0.5)):
        model = load_llama(default_model_dir, dtype)
        ids = list(range(1000, 1300))
        cold = model(ids, model.new_cache())
        cache = model.new_cache(16)  # small capacity: exercises growth too
        model(ids[:200] + [5, 6, 7], cache)  # a divergent tail that must be discarded
        keep = cache.common_prefix(ids)
        assert keep == 200
        cache.truncate(keep)
        warm = model(ids[keep:], cache)
        assert (warm - cold).abs().max().item() < tol
        assert warm.argmax() == cold.argmax()


def test_bf16_close_to_fp32(default_model_dir):
    from tinymorph.steering.tokenizer import FastTokenizer

    ids = FastTokenizer(default_model_dir)(VARIED_TEXT)["input_ids"]  # real text: no near-ties on top
    f32 = load_llama(default_model_dir, torch.float32)
    b16 = load_llama(default_model_dir, torch.bfloat16)
    a, b = f32(ids, f32.new_cache()), b16(ids, b16.new_cache())
    top_a, top_b = set(a.topk(5).indices.tolist()), set(b.topk(5).indices.tolist())
    assert a.argmax() == b.argmax() and len(top_a & top_b) >= 4


def test_stop_rules():
    opts = lambda stop: GenerationOptions(stop=stop)  # noqa: E731
    assert cut_at_stop(" sat on the", opts("word")) == " sat"
    assert cut_at_stop(" sat", opts("word")) is None
    assert cut_at_stop(" the end. Then", opts("sentence")) == " the end."
    assert cut_at_stop(" pi is 3.14 and", opts("sentence")) is None
    assert cut_at_stop(" e.g. this", opts("sentence")) is None
    assert cut_at_stop(" one\ntwo", opts("line")) == " one"
    assert cut_at_stop("\nnext line\n", opts("line")) == "\nnext line"  # a leading break is text
    assert cut_at_stop(" a\n\nb", opts("paragraph")) == " a"
    assert cut_at_stop(" a\nb", opts("paragraph")) is None
    assert cut_at_stop(" x END y", GenerationOptions(stop="none", stop_strings=("END",))) == " x "


def test_engine_streams_reuses_and_cancels(tiny_model_dir):
    engine = Engine.load(str(tiny_model_dir), dtype="float32")
    options = GenerationOptions(max_tokens=8, stop="none")
    first = engine.complete(CompletionRequest(PROSE, "doc", options))
    assert first.timings.tokens_reused == 0 and first.timings.tokens_generated == 8
    streamed = []
    second = engine.complete(CompletionRequest(PROSE + "And", "doc", options), on_token=streamed.append)
    assert second.timings.tokens_reused > 0.9 * second.timings.tokens_prefilled + 50
    assert "".join(e.delta for e in streamed) == second.text
    # typing exactly what the model produced needs (almost) no prefill
    third = engine.complete(CompletionRequest(PROSE + "And" + second.text, "doc", options))
    assert third.timings.tokens_prefilled <= 3
    cancel = CancelToken()
    gen = engine.stream(CompletionRequest(PROSE + "Later", "doc", GenerationOptions(max_tokens=50, stop="none")),
                        cancel)
    next(gen, None)
    cancel.cancel()
    try:
        while True:
            next(gen)
    except StopIteration as done:
        assert done.value.stop_reason == "cancelled"
        assert done.value.timings.tokens_generated < 50


def test_window_start_is_stable_while_typing(tiny_model_dir):
    engine = Engine.load(str(tiny_model_dir), dtype="float32")
    policy = ContextPolicy(max_tokens=256, stride_chars=512)
    text = PROSE * 4
    starts, firsts = set(), set()
    for n in range(len(text) - 300, len(text)):
        window = select_window(text[:n], engine.tokenize, policy)
        assert len(window.ids) <= 256
        starts.add(window.start)
        firsts.add(tuple(window.ids[:8]))
    assert len(starts) <= 2 and len(firsts) <= 2  # the prompt's head moves at most once in 300 chars


def test_cache_budget_evicts_lru(tiny_model_dir):
    engine = Engine.load(str(tiny_model_dir), dtype="float32", cache_budget_mb=1)
    for i in range(6):
        engine.complete(CompletionRequest(PROSE * 3, f"doc{i}", GenerationOptions(max_tokens=2)))
    assert engine.caches.total_bytes() <= 2**20 or len(engine.caches) == 1
    assert engine.caches.stats.evictions > 0


def test_fast_tokenizer_matches_transformers(default_model_dir):
    """The engine's lightweight tokenizer gives the same ids and text as transformers' AutoTokenizer."""
    from tinymorph.steering.model import load_tokenizer
    from tinymorph.steering.tokenizer import FastTokenizer

    hf, fast = load_tokenizer(default_model_dir), FastTokenizer(default_model_dir)
    for text in ("The sea was calm.", "  two spaces\r\n\r\nCRLF and émojis 🎉", "def f(x):\n    return x**2",
                 "<|im_start|>user hi", "日本語のテキスト", ""):
        ids = hf(text, add_special_tokens=False)["input_ids"]
        assert fast(text)["input_ids"] == ids
        assert fast.decode(ids) == hf.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    assert (fast.bos_token_id, fast.eos_token_id, len(fast)) == (hf.bos_token_id, hf.eos_token_id, len(hf))


VARIED_TEXT = (
    "Dear Mrs. Alvarez, thank you for the seeds you sent in March. The tomatoes came up slowly at "
    "first, but after the storm in June they grew like weeds. My brother, who repairs bicycles in "
    "Leeds, says the secret is coffee grounds; I think it is luck. The library has moved to the old "
    "railway station, and on Thursdays a retired physicist explains the night sky to children. "
    "Last week she talked about Jupiter's moons, the price of telescopes, and why Pluto was demoted. "
    "I have enclosed a recipe for plum jam, a photograph of the garden, and two pressed violets."
)


def test_quantized_weights_keep_the_prediction(default_model_dir):
    """4-bit groups reproduce the GGUF's Q4_1 projections: on the decode path their next-token
    distributions are closer to the fp32 reference than 8-bit rows' (KL), at ~35 % of the bf16
    bytes; both keep the top prediction almost everywhere."""
    from tinymorph.steering.tokenizer import FastTokenizer

    ids = FastTokenizer(default_model_dir)(VARIED_TEXT)["input_ids"]
    ref = load_llama(default_model_dir, torch.float32)
    expected = ref(ids, ref.new_cache(), n_logits=len(ids) - 20).log_softmax(-1)
    bf16_bytes = load_llama(default_model_dir, torch.bfloat16).weight_bytes()
    kl = {}
    for mode, max_bytes in (("int8", 0.55), ("auto", 0.40)):
        model = load_llama(default_model_dir, torch.bfloat16, mode)
        cache = model.new_cache()
        model(ids[:20], cache)
        got = torch.stack([model(ids[i : i + 1], cache) for i in range(20, len(ids))]).log_softmax(-1)
        kl[mode] = (expected.exp() * (expected - got)).sum(-1).mean().item()
        assert (got.argmax(-1) == expected.argmax(-1)).float().mean() > 0.9
        assert model.weight_bytes() < max_bytes * bf16_bytes
    assert model.quantized == "int4+int8"  # auto: Q4_1 projections in 4 bits, the Q8_0 lm_head in 8
    assert kl["auto"] < kl["int8"], kl


def test_int4_linear_is_exact_on_4bit_weights():
    """`Int4Linear` unpacks PyTorch's int4 packing back to the codes it was given, holds 4-bit
    group weights exactly, and its kernel path (few rows) and dequantized path (many) agree
    with the dense matmul; `int4_fits` tells 4-bit weights from ordinary ones."""
    from tinymorph.steering import quant

    torch.manual_seed(0)
    n, k = 192, 128
    codes = torch.randint(0, 16, (n, k))
    codes[:, 0 :: quant.GROUP], codes[:, 1 :: quant.GROUP] = 0, 15  # each group spans its range, as in Q4_1
    scale = torch.rand(n, k // quant.GROUP, 1) * 0.01
    offset = -torch.rand(n, k // quant.GROUP, 1) * 0.05
    weight = (codes.view(n, k // quant.GROUP, quant.GROUP) * scale + offset).view(n, k)
    assert quant.int4_fits(weight) and not quant.int4_fits(torch.randn(n, k))
    assert not quant.int4_fits(torch.randn(96, k))  # rows not a multiple of the packing block
    layer = quant.Int4Linear(weight, None, torch.float32)
    assert torch.equal(layer.codes().long(), codes)
    assert torch.allclose(layer.dequantized(), weight, atol=1e-6)
    for rows in (1, 5, quant.INT4_KERNEL_MAX_ROWS + 8):
        x = torch.randn(rows, k)
        assert torch.allclose(layer(x), x @ weight.T, atol=1e-4)
    mixed = quant.quantized_linear(torch.randn(n, k), None, torch.float32, "auto")
    assert isinstance(mixed, quant.Int8Linear)
    assert isinstance(quant.quantized_linear(torch.randn(n, k), None, torch.float32, "int4"), quant.Int4Linear)


def test_token_healing_keeps_cache_consistent(tiny_model_dir):
    """Healing re-chooses the prompt's last token; whichever branch runs, the KV cache must hold
    exactly prompt[:-1] + generated[:-1] (the last sampled token is never fed)."""
    engine = Engine.load(str(tiny_model_dir), dtype="float32")
    for n, prompt in enumerate(["She opened the door and ", "The function returns a li", "Plain words here"]):
        ids = engine.tokenize(prompt)
        heal, mask = engine.healing(ids)
        assert heal and mask[ids[-1]], prompt  # the prompt's own token is always allowed
        result = engine.complete(CompletionRequest(prompt, f"heal{n}", GenerationOptions(max_tokens=6, stop="none")))
        cache = engine.caches.peek((f"heal{n}", "none"))
        assert cache.ids == ids[:-1] + result.token_ids[:-1]
        assert engine.vocab_text()[result.token_ids[0]].startswith(heal)
    assert engine.healing(engine.tokenize("A line\n")) == ("", None)


def test_healing_mask_is_every_token_starting_with_the_text(tiny_model_dir):
    """The mask found by bisecting the sorted vocabulary equals a scan of every token's text."""
    engine = Engine.load(str(tiny_model_dir), dtype="float32")
    texts = engine.vocab_text()
    for prompt in ("The function returns a li", "She opened the door and ", "So Th", "un café"):
        ids = engine.tokenize(prompt)
        heal, mask = engine.healing(ids)
        scan = torch.tensor([t.startswith(heal) for t in texts])
        assert heal and torch.equal(mask, scan), prompt


def test_a_one_token_edit_runs_one_token_and_heals_as_a_fresh_cache(tiny_model_dir):
    """Typing that changes only the last token runs that token alone (the logits before it, which
    healing needs, come from the cache) and continues exactly as a cold request for the same text."""
    engine = Engine.load(str(tiny_model_dir), dtype="float32")
    opts = GenerationOptions(max_tokens=6, stop="none")
    first = "The harbour was quiet in the early morning and the bo"
    typed = first + "at"
    assert engine.tokenize(first)[:-1] == engine.tokenize(typed)[:-1]
    engine.complete(CompletionRequest(first, "typing", opts))
    warm = engine.complete(CompletionRequest(typed, "typing", opts))
    cold = engine.complete(CompletionRequest(typed, "fresh", opts))
    assert warm.timings.tokens_prefilled == 1 and cold.timings.tokens_prefilled == len(engine.tokenize(typed))
    assert warm.token_ids == cold.token_ids and warm.text == cold.text
    # a document the cache has no logits for re-runs the token before the healed one
    engine.caches.peek(("typing", "none")).logits_after.clear()
    again = engine.complete(CompletionRequest(typed + "s", "typing", opts))
    assert again.timings.tokens_prefilled == 2
    assert again.token_ids == engine.complete(CompletionRequest(typed + "s", "fresh2", opts)).token_ids


def test_ttft_counts_tokenizing_and_healing(tiny_model_dir):
    """TTFT is what the user waits for: from the request to the first token, preparation included."""
    engine = Engine.load(str(tiny_model_dir), dtype="float32")
    t = engine.complete(CompletionRequest(PROSE + "The gu", "ttft", GenerationOptions(max_tokens=2))).timings
    assert t.prepare_ms > 0 and t.ttft_ms >= t.prepare_ms + t.prefill_ms


def test_typing_tokenizer_gives_the_tokens_of_the_whole_text(tiny_model_dir):
    """Re-tokenizing only the end gives the full tokenization through typing, deletions and edits far
    back; a tokenizer that cutting would change (it adds a prefix space) is never cut."""
    import random

    from tinymorph.steering.tokenizer import TypingTokenizer

    engine = Engine.load(str(tiny_model_dir), dtype="float32")
    typing = TypingTokenizer(engine.tokenize, margin=64)
    assert typing.exact
    rng = random.Random(0)
    text = ""
    for step in range(400):
        roll = rng.random()
        if roll < 0.8:
            text += rng.choice(["a", "e", " ", "th", ".", "\n", "é", " the", "9", "'s"])
        elif roll < 0.95:
            text = text[:-rng.randint(1, 5)]
        else:  # an edit far from the end
            at = rng.randrange(len(text) + 1)
            text = text[:at] + "X" + text[at:]
        assert typing("doc", text) == engine.tokenize(text), step
    prefix_space = TypingTokenizer(lambda s: engine.tokenize(" " + s))
    assert not prefix_space.exact
    assert prefix_space("doc", PROSE) == engine.tokenize(" " + PROSE)


def test_token_healing_both_branches(tiny_model_dir):
    """Force the model to keep (mask = own token) or replace (mask without it) the healed token."""
    engine = Engine.load(str(tiny_model_dir), dtype="float32")
    prompt = "The function returns a li"
    ids = engine.tokenize(prompt)
    heal, mask = Engine.healing(engine, ids)
    only_own = torch.zeros_like(mask)
    only_own[ids[-1]] = True
    others = mask.clone()
    others[ids[-1]] = False
    assert others.any()
    for n, forced in enumerate((only_own, others)):
        engine.healing = lambda _ids, forced=forced: (heal, forced)
        result = engine.complete(CompletionRequest(prompt, f"b{n}", GenerationOptions(max_tokens=4, stop="none")))
        assert (result.token_ids[0] == ids[-1]) == (n == 0)
        assert engine.caches.peek((f"b{n}", "none")).ids == ids[:-1] + result.token_ids[:-1]
        assert result.timings.tokens_prefilled == len(ids)


def test_sampling_edge_cases_never_fail():
    """Tiny top_p keeps the best token; tiny temperatures are greedy (found by schemathesis)."""
    from tinymorph.steering.generate import sample

    logits = torch.tensor([1.0, 3.0, 2.0])
    assert sample(logits, GenerationOptions(temperature=1.0, top_p=5e-324), None) == 1
    assert sample(logits, GenerationOptions(temperature=1e-40), None) == 1
    rng = torch.Generator().manual_seed(0)
    picks = {sample(logits, GenerationOptions(temperature=1.0, top_p=1.0), rng) for _ in range(200)}
    assert picks == {0, 1, 2}


def test_prompt_lookup_drafts_what_followed_the_last_ngram():
    from tinymorph.steering.generate import PromptLookup

    lookup = PromptLookup([1, 2, 3, 4, 5, 9, 2, 3])
    assert lookup.draft(2) == [4, 5]  # "2 3" was followed by "4 5"
    lookup.append(7)
    assert lookup.draft(3) == []  # "3 7" and "7" never occurred before
    lookup.append(4)
    assert lookup.draft(0) == []
    assert PromptLookup([5, 6, 5, 6, 5]).draft(4) == [6, 5]  # the latest occurrence wins


def test_speculative_decoding_gives_the_same_tokens(default_model_dir):
    """Prompt-lookup drafts change how many forward passes decode takes, not which tokens come out,
    and leave the same KV cache (prompt + generated tokens but the last).

    Tolerance: fp32 and the default int8+bf16 must give identical token ids on this prompt (a draft
    is only kept when it equals the model's own greedy choice from the multi-token pass; the pass
    differs from one-token passes only in summation order)."""
    prompt = PROSE[:-70]
    for dtype in ("float32", "auto"):
        engine = Engine.load(str(default_model_dir), dtype=dtype)
        runs = {}
        for draft in (0, 3):
            engine.draft_tokens = draft
            engine.forget("doc")
            result = engine.complete(CompletionRequest(prompt, "doc", GenerationOptions(max_tokens=20, stop="none")))
            runs[draft] = result
            assert engine.caches.peek(("doc", "none")).ids[-19:] == result.token_ids[:-1]
        assert runs[3].token_ids == runs[0].token_ids, dtype
        assert runs[3].timings.drafts_accepted >= 5 and runs[0].timings.drafts_accepted == 0  # it did speculate


def test_thread_policy_yields_cores_to_busy_processes():
    """Beside a CPU-bound process a forward pass gets fewer threads than on an idle machine."""
    import subprocess
    import sys
    import time

    from tinymorph.steering.threads import ThreadPolicy

    policy = ThreadPolicy(max_threads=2)
    if policy.cores < 2:
        return  # nothing to give back on one core
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.1)
        policy.update()  # start a window while the competitor runs
        time.sleep(0.6)
        assert policy.update() == 1 and policy.others_busy > 0.5
    finally:
        busy.kill()
        busy.wait()
    assert ThreadPolicy(max_threads=2, adaptive=False).update() == 2


def test_bench_columns_and_contention(tiny_model_dir):
    """The bench measures quiet and contended keystrokes and decode; the llama.cpp column is there
    exactly when llama-cpp-python is installed (an optional extra that CI does not build)."""
    import importlib.util

    from tinymorph.steering.bench import BenchConfig, format_table, run_bench

    engine = Engine.load(str(tiny_model_dir), dtype="float32", threads=1)
    cfg = BenchConfig(sizes=(32,), keystrokes=3, cold_repeats=1, decode_tokens=4, baselines=False,
                      steering=False, contention=True)
    logged: list[str] = []
    result = run_bench(engine, cfg, log=logged.append)
    backends = {(r["backend"], r["load"]) for r in result.rows}
    assert {("tinymorph", "quiet"), ("tinymorph", "contention")} <= backends
    assert result.contention["tinymorph"]["tokens_per_s"] > 0
    has_llama_cpp = importlib.util.find_spec("llama_cpp") is not None
    assert (("llama.cpp", "quiet") in backends) == has_llama_cpp
    if has_llama_cpp:
        assert result.decode["llama.cpp"]["tokens_per_s"] > 0 and "llama.cpp / tinymorph" in format_table(result)
    else:
        assert any("llama.cpp: not installed" in line for line in logged)
    table = format_table(result)
    assert "+busy" in table and "bandwidth achieved" in table


def test_steering_applies_on_the_decode_paths(tiny_model_dir):
    """Steering hooks edit every one-token decode step over a long cache and every speculative
    multi-token pass: both give the same steered tokens, which differ from the unsteered ones."""
    from tinymorph.steering.steering import LayerEdit

    engine = Engine.load(str(tiny_model_dir), dtype="float32")
    model = engine.model
    torch.manual_seed(1)
    plan = {1: LayerEdit(add=torch.randn(model.cfg.dim) * 8)}
    prompt = engine.tokenize(PROSE * 2)[:600]

    def greedy(plan, n=12, draft=()):
        cache = model.new_cache(700)
        with engine.hooks.active(plan):
            token = int(model(prompt, cache).argmax())
            out = [token]
            for _ in range(n):
                logits = model([token, *draft], cache, 1 + len(draft))
                token = int((logits[0] if draft else logits).argmax())
                cache.truncate(cache.length - len(draft))
                out.append(token)
        return out

    fast = greedy(plan)
    with_drafts = greedy(plan, draft=(11, 12))  # multi-token passes whose extra tokens are dropped
    assert fast == with_drafts
    assert fast != greedy(None)


def test_batched_decoding_is_the_engines(default_model_dir):
    """`steer eval` and calibration continue prompts in batches (`BatchRunner`): with the engine's
    default options (greedy + its repetition penalty over the last 64 tokens) the rows must read as
    the editor's suggestions do, or the eval would judge a decoding no user gets. The prompts are
    made to loop without the penalty ("I got it. I got it. ...")."""
    from tinymorph.steering.batch import BatchRunner

    engine = Engine.load(str(default_model_dir), dtype="float32")
    prompts = ["I got home a little after six and", "The old man looked out of the window and said",
               "My favourite thing about the weekend is"]
    runner = BatchRunner(engine.model, engine.hooks, engine.special_ids)
    batched = runner.generate([engine.tokenize(p) for p in prompts], 24)
    for i, prompt in enumerate(prompts):
        one = engine.complete(CompletionRequest(prompt, f"doc{i}", GenerationOptions(max_tokens=24, stop="none")))
        # the engine may spend a token of its budget re-choosing the prompt's last one (token healing)
        assert len(one.text) > 60 and engine.detokenize(batched[i]).startswith(one.text), (prompt, batched[i], one)
    unpenalized = runner.generate([engine.tokenize(p) for p in prompts], 24,
                                  options=GenerationOptions(repetition_penalty=1.0))
    assert unpenalized != batched


def test_reading_activations_beside_a_completion_disturbs_neither(tiny_model_dir):
    """Feature search reads a layer with a hook that stops the forward there; hooks fire in every
    thread's forward, so without care an editor's completion running beside a search was stopped by
    it (`_Stop`, 46 failed completions during 4 searches on the real model) and the search read the
    completion's residual."""
    import threading

    from tinymorph.steering.vectors import layers_activations

    engine = Engine.load(str(tiny_model_dir), dtype="float32")
    ids = engine.tokenize("The sea was calm and the boats were out.")
    expected = layers_activations(engine.model, ids, [0])[0]
    errors: list[BaseException] = []
    done = threading.Event()

    def complete() -> None:
        n = 0
        while not done.is_set():
            try:
                engine.complete(CompletionRequest(f"Once upon a time {n}", "doc", GenerationOptions(max_tokens=4,
                                                                                                stop="none")))
            except BaseException as exc:  # noqa: BLE001 - what the test looks for
                errors.append(exc)
            n += 1

    thread = threading.Thread(target=complete)
    thread.start()
    try:
        for _ in range(200):
            got = layers_activations(engine.model, ids, [0])[0]
            assert got.shape == expected.shape and torch.allclose(got, expected, atol=1e-5)
    finally:
        done.set()
        thread.join()
    assert not errors, errors[:3]


def test_a_search_restarts_from_the_layers_it_does_not_push(tiny_model_dir):
    """A fit pushes only at later layers, so it runs the earlier ones once (`BatchRunner.prefix`):
    what it sees at every step must be what the whole model gives, gradients included."""
    from tinymorph.steering.batch import BatchRunner
    from tinymorph.steering.steering import LayerEdit

    engine = Engine.load(str(tiny_model_dir), dtype="float32")
    runner = BatchRunner(engine.model, special_ids=engine.special_ids)
    rows = [engine.tokenize(t) for t in ("The sea was calm that morning.", "We left early.")]
    layer = engine.info.layers - 1
    grads = []
    for start in (None, runner.prefix(rows, layer)):
        push = torch.full((engine.model.cfg.dim,), 0.5, requires_grad=True)
        with torch.enable_grad():
            plan = {layer: LayerEdit(add=push)}
            x, _ = runner.hidden(rows, plan) if start is None else runner.hidden_from(start, plan)
            x.float().pow(2).mean().backward()
        grads.append((x.detach(), push.grad))
    assert torch.allclose(grads[0][0], grads[1][0]) and torch.allclose(grads[0][1], grads[1][1])
    assert float(grads[0][1].abs().sum()) > 0
    with pytest.raises(ValueError, match="run up to layer"):
        runner.hidden_from(runner.prefix(rows, layer), {layer - 1: LayerEdit(add=push)})


def test_concept_distillation_runs_in_any_grad_mode(tiny_model_dir):
    """Building a described concept trains by gradient; a caller inside `torch.inference_mode()`
    (a server thread, a notebook) must still get a vector, capped at the push it was trained for."""
    from tinymorph.steering.concepts import build_concept, concept_layers
    from tinymorph.steering.distill import CAP

    engine = Engine.load(str(tiny_model_dir), dtype="float32")
    layers = concept_layers(engine.info.layers)
    with torch.inference_mode():
        vec = build_concept(engine.model, engine.tokenizer, "about the sea", layers, engine.special_ids)
    assert sorted(vec.directions) == layers
    norms = [float(d.norm()) for d in vec.directions.values()]
    assert all(0.0 < n <= 1.0 + 1e-4 for n in norms), norms  # a share of the cap, never more
    pushes = vec.pushes(CAP)
    assert all(float(p.norm()) <= CAP * vec.resid_norms[la] / len(layers) * (1 + 1e-4) for la, p in pushes.items())


def test_fitted_weights_move_plain_text_toward_the_prompted_model(tiny_model_dir):
    """`fit_weights` (how a search group's members share its push) gives non-negative weights whose
    push stays within its budget and lowers KL(prompted ‖ steered) below the unsteered one, in any
    grad mode."""
    from tinymorph.steering.concepts import NEUTRAL_CONTEXTS, neutral_norms
    from tinymorph.steering.distill import fit_weights, kl_to_prompted

    engine = Engine.load(str(tiny_model_dir), dtype="float32")
    texts = [engine.tokenize(t) for t in NEUTRAL_CONTEXTS[:4]]
    budget = 0.3 * neutral_norms(engine.model, engine.tokenizer, [0])[0]
    gen = torch.Generator().manual_seed(0)
    d = torch.randn(2, engine.info.d_model, generator=gen)
    d = d / d.norm(dim=-1, keepdim=True)
    directions = torch.cat([d, -d])  # each with its opposite: one of the two always leads downhill
    layers = [0, 1]
    with torch.inference_mode():
        w, losses = fit_weights(engine.model, engine.tokenizer, "about the sea", texts, directions, layers, budget,
                                penalty=0.0, word_bonus=0.0)  # the plain prompted teacher (no word asked for)
    assert w.shape == (4,) and bool((w >= 0).all()) and float(w.max()) > 0
    push = w @ directions
    assert float(push.norm()) <= budget * (1 + 1e-5)
    before = kl_to_prompted(engine.model, engine.tokenizer, "about the sea", texts)
    after = kl_to_prompted(engine.model, engine.tokenizer, "about the sea", texts,
                           dict.fromkeys(layers, push / len(layers)))
    assert after < before and len(losses) > 1 and losses[0] == pytest.approx(before, rel=1e-3)
    asked = []  # a search overtaken by a newer one stops its fit between steps, with no weights
    stopped, _ = fit_weights(engine.model, engine.tokenizer, "about the sea", texts, directions, layers, budget,
                             stop=lambda: asked.append(1) or len(asked) > 2)
    assert stopped is None and len(asked) == 3


def test_calibration_stops_where_the_fitted_perplexity_ratio_meets_the_budget():
    """Strength 1 is where perplexity, fitted over the pushes tried, reaches `MAX_PPL_RATIO` of
    unsteered: not the strongest grid point under it (half a grid step short on average), never past
    the strongest push that keeps repetition down and raises presence, and the floor when none does."""
    import math

    from tinymorph.steering.calibration import MAX_PPL_RATIO, REP_MARGIN, _fitted_multiplier

    def stats(ratios, rep3=None, presence=None):
        out = {0.0: {"ppl": 4.0, "rep3": 0.0, "presence": 0.0}}
        for i, (m, r) in enumerate(ratios.items()):
            out[m] = {"ppl": 4.0 * r, "rep3": (rep3 or {}).get(m, 0.0), "presence": (presence or [1.0] * 9)[i]}
        return out

    # log ratio exactly linear in the push, 0.6 per unit: the budget is met at ln(1.5) / 0.6
    linear = {m: math.exp(0.6 * m) for m in (0.5, 0.75, 1.0, 1.25)}
    crossing = math.log(MAX_PPL_RATIO) / 0.6
    assert _fitted_multiplier(stats(linear), 0.5) == pytest.approx(crossing)
    assert 0.5 < crossing < 0.75  # between grid points: the old rule would have stopped at 0.5
    # noise around the line moves the answer a little, not to a grid point
    noisy = {m: r * f for (m, r), f in zip(linear.items(), (1.03, 0.97, 1.02, 0.99), strict=True)}
    assert abs(_fitted_multiplier(stats(noisy), 0.5) - crossing) < 0.08
    # a ratio that grows faster than linearly (as measured): the curve's crossing, not a line's
    convex = {m: math.exp(0.2 * m + 0.8 * m * m) for m in (0.25, 0.5, 0.75, 1.0, 1.25, 1.5)}
    root = (-0.2 + math.sqrt(0.04 + 3.2 * math.log(MAX_PPL_RATIO))) / 1.6
    assert _fitted_multiplier(stats(convex), 0.25) == pytest.approx(root)
    # looping from 0.75 on caps it at the strongest push without the loop, even under the budget
    flat = {m: 1.0 + 0.1 * m for m in (0.5, 0.75, 1.0, 1.25)}
    looping = {0.75: REP_MARGIN * 2, 1.0: REP_MARGIN * 2, 1.25: REP_MARGIN * 2}
    assert _fitted_multiplier(stats(flat, rep3=looping), 0.5) == 0.5
    assert _fitted_multiplier(stats(flat), 0.5) == 1.25  # perplexity barely moves: the strongest tried
    # a push that never makes the concept more present is no concept push: the floor
    assert _fitted_multiplier(stats(linear, presence=[-1.0] * 4), 0.5) == 0.5


def test_written_tokens_get_the_written_push_and_are_not_reused_as_read_text(tiny_model_dir):
    """A plan may push the tokens the model writes otherwise than the text it reads (an SAE feature's
    `WRITTEN_SHARE`): the first token (read from the prompt) is the same as with the read push
    everywhere, the written ones are not; and once the writer accepts the suggestion the next one is
    what a fresh document gives: the prefix cache never serves written tokens' KV as read text."""
    from tinymorph.steering.steering import LayerEdit, SteeringEntry, SteeringPlan

    engine = Engine.load(str(tiny_model_dir), dtype="float32")
    torch.manual_seed(3)
    layer = 0  # the first layer's output is what the next layer's keys and values are made of
    add = torch.randn(engine.info.d_model) * 6
    plans = {"same": {layer: LayerEdit(add=add, written=add)}, "less": {layer: LayerEdit(add=add, written=-add)}}
    chosen = {"plan": plans["same"]}
    engine.set_steering_resolver(lambda plan: chosen["plan"])
    steer = SteeringPlan((SteeringEntry("tiny:1", 1.0),))
    opts = GenerationOptions(max_tokens=10, stop="none")

    def complete(text: str, doc: str, which: str):
        chosen["plan"] = plans[which]
        return engine.complete(CompletionRequest(text, doc, opts, steering=steer))

    prompt = PROSE.rstrip()  # ends with ".": no token healing, the suggestion follows the prompt's tokens
    same, less = complete(prompt, "a", "same"), complete(prompt, "b", "less")
    assert same.token_ids[0] == less.token_ids[0] and same.token_ids != less.token_ids
    accepted = prompt + less.text
    assert engine.tokenize(accepted)[:len(engine.tokenize(prompt)) + 4] == engine.tokenize(prompt) + less.token_ids[:4]
    again, fresh = complete(accepted, "b", "less"), complete(accepted, "fresh", "less")
    assert again.timings.tokens_reused >= len(engine.tokenize(prompt))  # the prompt's KV was kept
    assert again.token_ids == fresh.token_ids
    n = len(engine.tokenize(accepted))  # the keys the next layer read the accepted text by: as a fresh read's
    kept, read = (engine.caches.peek((doc, steer.cache_key())) for doc in ("b", "fresh"))
    assert torch.allclose(kept.k[1, :, :, :n], read.k[1, :, :, :n], atol=1e-4)
