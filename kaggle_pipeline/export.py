"""`python -m kaggle_pipeline.export [--config run.toml] [section.key=value ...]
[--format peft,hf,orbax] [--dtype bfloat16|float16|float32] [--out DIR]`

Takes what a finished run trained (the same config as `train` and `predict`) out for other
libraries, into `<out>/` (default `<output.dir>/<output.name>/export/`):

- `peft/`: the LoRA adapter as `adapter_config.json` + `adapter_model.safetensors`, which
  `peft.PeftModel.from_pretrained(base, "peft/")` loads onto the transformers model of the base
  checkpoint (its `base_model_name_or_path` is the base checkpoint when it is a Hugging Face
  directory). LoRA runs only.
- `hf/`: the merged model (the adapter folded into the weights, or the fully fine-tuned model) as
  `config.json` + `model.safetensors` + `tokenizer.model`: `AutoModelForCausalLM.from_pretrained`
  loads it.
- `orbax/`: the merged model in the official Flax layout, as Kaggle's Gemma models ship it:
  `orbax/<output.name>/` (the checkpoint) beside `orbax/tokenizer.model`.

`--dtype` is the weights' dtype: bfloat16 by default for merged models (as the released ones),
float32 for the PEFT adapter. Each export directory is replaced whole, never left half-written.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp

from kaggle_pipeline import run_setup
from kaggle_pipeline.checkpoints.adapter import load_adapter
from kaggle_pipeline.checkpoints.orbax_format import save_orbax
from kaggle_pipeline.checkpoints.peft import export_merged, export_peft_adapter
from kaggle_pipeline.cli import log, run_command
from kaggle_pipeline.errors import UserError
from kaggle_pipeline.files import atomic_directory
from kaggle_pipeline.run_config import RunConfig, load_config

FORMATS = ("peft", "hf", "orbax")
DTYPES = ("bfloat16", "float16", "float32")


class ExportError(UserError):
    """An export that cannot be made from this run (e.g. a PEFT adapter of a full fine-tune)."""


def _formats(value: str | None, lora: bool) -> list[str]:
    if value is None:
        return list(FORMATS) if lora else ["hf", "orbax"]
    chosen = [f.strip() for f in value.split(",") if f.strip()]
    unknown = [f for f in chosen if f not in FORMATS]
    if unknown or not chosen:
        raise ExportError(f"--format {value!r}: expected a comma-separated list of "
                          f"{', '.join(FORMATS)}")
    if "peft" in chosen and not lora:
        raise ExportError("--format peft: this run fine-tuned every weight (lora.enabled = "
                          "false), there is no adapter; export hf or orbax")
    return list(dict.fromkeys(chosen))


def _base_name(cfg: RunConfig) -> str:
    """What PEFT records as the base model: the checkpoint when transformers can load it."""
    path = run_setup.checkpoint_path(cfg.model)
    return str(path) if path is not None and (path / "config.json").is_file() else ""


def export(cfg: RunConfig, formats: str | None = None, dtype: str | None = None,
           out: str | Path | None = None) -> Path:
    """Write the run's exports; returns their folder."""
    # Exports are per-layer files made on the host, whatever layout the run trained in.
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, scan_layers=False))
    spec = run_setup.task_spec(cfg)
    trained = run_setup.trained_path(cfg)
    run_setup.check_trained_from(cfg, spec)
    chosen = _formats(formats, cfg.lora.enabled)
    if dtype is not None and dtype not in DTYPES:
        raise ExportError(f"--dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    out = Path(out) if out else cfg.run_dir / "export"
    tokenizer = run_setup.load_tokenizer(cfg.model)
    merged_dtype = jnp.dtype(dtype or "bfloat16")

    if cfg.lora.enabled:
        log(f"loading {cfg.model.checkpoint or cfg.model.preset} and the adapter {trained}")
        config, params = run_setup.load_model(cfg.model, seed=cfg.train.seed)
        lora_tree, lora_cfg = load_adapter(trained, config)
        run_setup.check_tokenizer(tokenizer, config, spec.style)
        if "peft" in chosen:
            path = export_peft_adapter(lora_tree, lora_cfg, config, out / "peft",
                                       _base_name(cfg), dtype=jnp.dtype(dtype or "float32"))
            log(f"PEFT adapter: {path}")

        def merged(fmt: str, target: Path) -> Path:
            return export_merged(params, lora_tree, config, lora_cfg, target, fmt,
                                 dtype=merged_dtype)
    else:
        model, variables, _ = run_setup.load_trained(cfg, spec.style)
        config, params = model.config, variables["params"]
        run_setup.check_tokenizer(tokenizer, config, spec.style)

        def merged(fmt: str, target: Path) -> Path:
            if fmt == "hf":
                from kaggle_pipeline.checkpoints.hf_format import save_hf

                return Path(save_hf(jax.device_get(params), config, target, dtype=merged_dtype))
            return save_orbax(jax.device_get(params), target, dtype=merged_dtype)

    if "hf" in chosen:
        def fill_hf(tmp: Path) -> None:
            merged("hf", tmp)
            tokenizer.save(tmp / "tokenizer.model")

        log(f"merged Hugging Face checkpoint: {atomic_directory(out / 'hf', fill_hf)}")
    if "orbax" in chosen:
        def fill_orbax(tmp: Path) -> None:
            merged("orbax", tmp / cfg.output.name)
            tokenizer.save(tmp / "tokenizer.model")

        log(f"merged Orbax checkpoint: {atomic_directory(out / 'orbax', fill_orbax)}")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kaggle_pipeline.export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="TOML run config (default: the embedded main job)")
    parser.add_argument("--format", help=f"comma-separated, of {', '.join(FORMATS)} (default: "
                        "all that apply)")
    parser.add_argument("--dtype", help=f"weights' dtype: {', '.join(DTYPES)}")
    parser.add_argument("--out", type=Path, help="folder (default: <run dir>/export)")
    parser.add_argument("overrides", nargs="*", help="section.key=value")
    args = parser.parse_args(argv)

    def body() -> None:
        out = export(load_config(args.config, args.overrides), args.format, args.dtype,
                     args.out)
        print(f"exported to {out}")

    return run_command(body)


if __name__ == "__main__":
    raise SystemExit(main())
