"""Minimum Bayes risk decoding on the emoji dev pairs, from a trained run (RESULTS.md).

Greedy answers plus N sampled ones per dev name; the answer kept is the one with the highest
summed chrF against all the candidates. Prints greedy chrF, the mean chrF of one sample, the
MBR pick's chrF and BLEU, and the best-of-candidates (oracle) chrF, per temperature.

    .venv/bin/python scripts/emoji_mbr.py --samples 8 --temperatures 0.3,0.6,1.0 \
        output.dir=runs output.name=emoji-ko-en
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from sacrebleu.metrics import CHRF

from kaggle_pipeline import run_setup
from kaggle_pipeline.evaluation import validation
from kaggle_pipeline.inference.predictions import generate
from kaggle_pipeline.inference.sampler import SamplingConfig
from kaggle_pipeline.run_config import load_config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/emoji-ko-en.toml")
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--temperatures", default="0.3,0.6,1.0")
    parser.add_argument("overrides", nargs="*", help="section.key=value, e.g. output.dir=...")
    args = parser.parse_args()
    cfg = load_config(args.config, args.overrides)
    spec = run_setup.task_spec(cfg)
    _, dev = run_setup.read_examples(cfg, spec)
    dev = [e for e in dev if e.answer is not None]
    refs = [e.answer for e in dev]
    model, variables, tokenizer = run_setup.load_trained(cfg)
    budget = cfg.task.max_new_tokens or 16

    def answers(sampling: SamplingConfig, seed: int = 0) -> list[str]:
        return generate(model, variables, tokenizer, spec, dev, sampling=sampling,
                        seed=seed).texts

    def chrf(texts: list[str]) -> float:
        return validation.generation_metrics(texts, refs, spec.target_lang)["chrf"]

    greedy = answers(SamplingConfig(max_new_tokens=budget))
    print(f"greedy chrF {chrf(greedy):.2f}")
    sentence = CHRF()
    for temperature in (float(t) for t in args.temperatures.split(",")):
        started = time.time()
        pools = [greedy] + [answers(SamplingConfig(max_new_tokens=budget,
                                                   temperature=temperature), seed=1000 + s)
                            for s in range(args.samples)]
        seconds = time.time() - started
        picked, oracle = [], []
        for i, ref in enumerate(refs):
            pool = [texts[i] for texts in pools]
            utility = [sum(sentence.sentence_score(h, [other]).score for other in pool)
                       for h in pool]
            picked.append(pool[int(np.argmax(utility))])
            oracle.append(max(pool, key=lambda h, ref=ref: sentence.sentence_score(h, [ref])
                              .score))
        mbr = validation.generation_metrics(picked, refs, spec.target_lang)
        print(f"T={temperature}: one sample {np.mean([chrf(p) for p in pools[1:]]):.1f}, "
              f"MBR chrF {mbr['chrf']:.2f} BLEU {mbr['bleu']:.2f}, oracle {chrf(oracle):.1f}, "
              f"sampling {seconds:.0f} s")


if __name__ == "__main__":
    main()
