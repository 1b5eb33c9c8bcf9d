"""Inference at the scale of a test file, with the real Gemma 3 270M (the packaged GGUF):

    python scripts/bench_inference.py translate --rows 1000   # ko->en of 1,000 short sentences
    python scripts/bench_inference.py long-row                 # the tarr test file + one
                                                               # 10,000-character review

`translate` greedy-decodes the first --rows Korean sentences of ../shared/data/emoji_ko_en
(train.csv, then dev.csv) with the aihub-parallel prompt, up to --max-new-tokens each, through
`inference.predictions.generate` (prompts sorted by length, batches from the token budget).
`long-row` label-scores the review test file with one 10,000-character review added, through
`inference.predictions.classify` with the main job's sizes. Both print wall time, tokens and
the process's peak RSS as one JSON line; run each in its own process (peak RSS is per process).
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

PROJECT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT))

from kaggle_pipeline.checkpoints import load_checkpoint  # noqa: E402
from kaggle_pipeline.checkpoints.packaged import gemma3_270m_gguf  # noqa: E402
from kaggle_pipeline.data.chat_template import Turn, encode_prompt  # noqa: E402
from kaggle_pipeline.data.tasks import (  # noqa: E402
    Example,
    build_examples,
    get_task,
    load_records,
    render,
)
from kaggle_pipeline.data.tokenizer import Tokenizer  # noqa: E402
from kaggle_pipeline.inference import predictions  # noqa: E402
from kaggle_pipeline.model import Transformer  # noqa: E402

SHARED = PROJECT.parent / "shared" / "data"


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def korean_sentences(rows: int) -> list[str]:
    import polars as pl

    frames = [pl.read_csv(SHARED / "emoji_ko_en" / name) for name in ("train.csv", "dev.csv")]
    sentences = [s for f in frames for s in f["ko"].to_list()]
    if len(sentences) < rows:
        raise SystemExit(f"only {len(sentences)} sentences in {SHARED / 'emoji_ko_en'}")
    return sentences[:rows]


def translate(args, model, variables, tokenizer) -> dict:
    spec = get_task("aihub-parallel")
    examples = [Example(str(i), [Turn("user", spec.prompt.format(ko=text))])
                for i, text in enumerate(korean_sentences(args.rows))]
    lengths = [len(encode_prompt(tokenizer, e.prompt, spec.style)) for e in examples]
    start = time.perf_counter()
    answers = predictions.generate(model, variables, tokenizer, spec, examples,
                                   max_new_tokens=args.max_new_tokens,
                                   max_batch=args.max_batch)
    seconds = time.perf_counter() - start
    generated = sum(len(tokenizer.encode(t)) for t in answers.texts)
    return {"rows": len(examples), "seconds": seconds, "prompts_per_s": len(examples) / seconds,
            "answer_tokens": generated, "answer_tokens_per_s": generated / seconds,
            "prompt_tokens": {"min": min(lengths), "max": max(lengths)},
            "max_new_tokens": args.max_new_tokens, "max_batch": args.max_batch,
            "examples": [[e.prompt[0].text.split("\n")[-1], t]
                         for e, t in zip(examples[:5], answers.texts[:5], strict=True)]}


def long_row(args, model, variables, tokenizer) -> dict:
    spec = get_task("tarr-sentiment")
    frame = load_records(spec, PROJECT / "data" / "tarr" / "test.tsv", labelled=False).frame
    examples = build_examples(spec, frame, with_answers=False)
    review = " ".join(frame["comment"].to_list())
    while len(review) < 10_000:
        review += " " + review
    review = review[:10_000]
    prompt = [Turn("user", render(spec.prompt, {"comment": review}))]
    examples.append(Example("long", prompt))
    tokens = len(encode_prompt(tokenizer, prompt, spec.style))
    start = time.perf_counter()
    result = predictions.classify(model, variables, tokenizer, spec, examples, seq_len=128,
                                  batch_size=8, max_prompt_len=args.max_prompt_len)
    seconds = time.perf_counter() - start
    return {"rows": len(examples), "long_row_chars": len(review), "long_row_tokens": tokens,
            "max_prompt_len": args.max_prompt_len, "truncated": result.truncated,
            "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=("translate", "long-row"))
    parser.add_argument("--rows", type=int, default=1000)
    parser.add_argument("--max-new-tokens", type=int, default=predictions.MAX_NEW_TOKENS)
    parser.add_argument("--max-batch", type=int, default=predictions.MAX_BATCH)
    parser.add_argument("--max-prompt-len", type=int, default=predictions.MAX_PROMPT_LEN)
    parser.add_argument("--dtype", default="float32")
    args = parser.parse_args()
    started = time.perf_counter()
    gguf = gemma3_270m_gguf()
    config, params = load_checkpoint(gguf)
    tokenizer = Tokenizer.from_gguf(gguf)
    model = Transformer(config, dtype=args.dtype)
    load_s = time.perf_counter() - started
    run = translate if args.what == "translate" else long_row
    out = run(args, model, {"params": params}, tokenizer)
    out.update(what=args.what, dtype=args.dtype, load_s=load_s, peak_rss_mb=peak_rss_mb(),
               total_s=time.perf_counter() - started)
    print("RESULT " + json.dumps(out, ensure_ascii=False), flush=True)


if __name__ == "__main__":
    main()
