#!/usr/bin/env python3
"""Write modern everyday prose with the default model itself, for SAE training and labelling.

Why: the machines that train the shipped SAE reach only package registries, and the text Debian and
PyPI carry is mostly documentation, dictionaries and old literature. People write stories, letters,
notes, reviews and essays about everyday things; the instruct model writes such text on request,
and its own text is in-distribution for the activations the SAE must explain. Topics x forms are
crossed so that every everyday concept appears in several registers.

Usage: python scripts/generate_prose.py --out /work/corpus/text/generated.txt --samples 3000
       [--topics-file nouns.txt] [--device cuda --batch 1024]

`--topics-file` adds one topic per line (e.g. the commonest WordNet nouns) to the curated list, half
of the prompts drawing from each, so the corpus covers more concepts than the curated list names.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

TOPICS = """gardening; the sea and sailing; cooking dinner; baking bread; music and concerts; a rainy day;
a thunderstorm; winter and snow; summer at the beach; football; basketball; running a marathon;
the night sky and stars; space travel; a pet dog; a cat; birds in the garden; a farm; horses;
money and saving; a job interview; a new job; starting a business; a hospital visit; a cold and fever;
healthy eating; a road trip; an airport; a train journey; a hotel; a war veteran; a soldier's letter;
falling in love; a wedding; a breakup; a birthday party; a funeral; grandparents; a newborn baby;
school exams; a teacher; university life; learning a language; a library; writing a novel; painting;
photography; a museum; a smartphone; computers and programming; the internet; video games; a car
breaking down; traffic; a bicycle; a forest walk; mountains and hiking; a river; a lake; camping;
fishing; a city at night; a small village; moving house; cleaning the kitchen; a neighbour; a
police investigation; a court case; a robbery; politics and elections; climate change; recycling;
a fire; a flood; an earthquake; a doctor; a nurse; medicine; the dentist; coffee; tea; wine; a
restaurant; a market; shopping for clothes; fashion; a haircut; a church; prayer and faith; a
holiday at Christmas; Halloween; a ghost story; a dragon; a castle; a king and queen; a pirate ship;
a detective; a spaceship crew; robots; a science experiment; chemistry; biology and cells; the
human brain; sleep and dreams; anger; sadness and grief; happiness; fear; loneliness; friendship;
an argument with a friend; a surprise gift; a lost wallet; a job promotion; retirement; an old
house; furniture; a broken window; the weather forecast; autumn leaves; spring flowers; insects and
bees; the ocean and whales; sharks; a volcano; the desert; a jungle; an island; a lighthouse; a
harbour; trains and railways; airplanes; a factory; farming and harvest; bread and cheese; chocolate;
a recipe for soup; a dinner party; a chess game; a tennis match; swimming; yoga; a gym; a marathon;
the stock market; taxes; a bank loan; a phone call; an email from a boss; a meeting at work; a
deadline; a conference; a newspaper; a radio show; a film; a theatre play; a song; a guitar; a piano;
an orchestra; dancing; a festival; a wedding speech; a letter of complaint; a thank-you note""".split(";")
FORMS = ["a short story about", "a letter to a friend about", "a diary entry about", "an email to a colleague about",
         "a short essay about", "a news report about", "a product review related to", "a blog post about",
         "a few paragraphs of notes about", "a formal letter about", "a casual message to a friend about",
         "a description of", "a speech about", "a children's story about", "a travel note about",
         "an opinion piece about", "a scene from a novel about", "a poem about"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--samples", type=int, default=3000)
    ap.add_argument("--batch", type=int, default=48)
    ap.add_argument("--max-new-tokens", type=int, default=220)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1, help="1 survives a busy machine far better than 2")
    ap.add_argument("--topics-file", type=Path, default=None, help="more topics, one per line")
    ap.add_argument("--device", default="cpu", help="torch device (cuda writes ~100x faster)")
    args = ap.parse_args(argv)

    import torch

    from tinymorph.steering.model import load_hf_model

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    model, tok = load_hf_model("default", dtype=torch.bfloat16)
    model = model.to(args.device)
    tok.padding_side = "left"
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    topics = [t.strip() for t in TOPICS if t.strip()]
    extra = args.topics_file.read_text().split("\n") if args.topics_file else []
    extra = [t.strip() for t in extra if t.strip()]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    done = 0
    t0 = time.time()
    n_tok = 0
    with open(args.out, "a", encoding="utf-8") as out:
        while done < args.samples:
            prompts = []
            for _ in range(args.batch):
                topic = rng.choice(extra if extra and rng.random() < 0.5 else topics)
                msg = f"Write {rng.choice(FORMS)} {topic}."
                prompts.append(tok.apply_chat_template([{"role": "user", "content": msg}], tokenize=False,
                                                       add_generation_prompt=True))
            enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(args.device)
            with torch.no_grad():
                gen = model.generate(**enc, do_sample=True, temperature=0.8, top_p=0.95,
                                     max_new_tokens=args.max_new_tokens, repetition_penalty=1.1,
                                     pad_token_id=tok.pad_token_id)
            for row in gen[:, enc["input_ids"].shape[1]:]:
                ids = [i for i in row.tolist() if i not in (tok.pad_token_id, tok.eos_token_id)]
                text = tok.decode(ids, skip_special_tokens=True).strip()
                n_tok += len(ids)
                if len(text) > 200:
                    out.write(text.replace("\r", "") + "\n\n")
            out.flush()
            done += args.batch
            rate = n_tok / (time.time() - t0)
            print(f"{done}/{args.samples} samples, {n_tok} tokens, {rate:.0f} tok/s", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
