"""GPU check: ezmia's torch backend (both passes, every statistic, every score) in bf16 on 1B-
and 8B-shaped random-init Llama models (128k vocabulary), against the paper's scoring path
(``baseline.py``) on the same GPU, MFU against the GPU's bf16 matmul peak measured beside each
timed run. Needs torch, transformers, peft, tokenizers and pyarrow; no Ray, no vLLM, no
network. Run through ``bash benchmarks/gpu_check.sh``.

Writes ``gpu_check.json`` and the GPU section of ``RESULTS.md`` (between the
``<!-- gpu-check -->`` markers, the rest of the file kept) in ``--out`` (default
``benchmarks/``), after each model, so a run cut short keeps what it finished.
``--smoke``: a tiny Llama (same 128k vocabulary) on CPU in fp32, written to a temp directory
unless ``--out`` is given: a check of the script itself, not a benchmark.

Models are random-init (no download, no training): speed does not depend on the weights.
The full fine-tune target is the base with 1% multiplicative noise on every weight; the LoRA
target an adapter (r=16 on q/k/v/o, random A and B) over the base. A model whose two copies
(the baseline holds two, a full target's ezmia path too) do not fit the GPU is skipped, with
the reason in the results.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks import fixtures, harness, report  # noqa: E402
from benchmarks.measure import MFU_PEAK, flop_params, hardware, machine_peaks  # noqa: E402
from ezmia.demo.train import save_checkpoint, set_adapter_base  # noqa: E402

LLAMA_3 = {"vocab_size": 128256, "num_key_value_heads": 8, "tie_word_embeddings": False}
SHAPES = {
    # Llama-3.2-1B
    "llama-1b": {**LLAMA_3, "hidden_size": 2048, "intermediate_size": 8192,
                 "num_hidden_layers": 16, "num_attention_heads": 32,
                 "tie_word_embeddings": True, "max_position_embeddings": 2048},
    # Llama-3-8B
    "llama-8b": {**LLAMA_3, "hidden_size": 4096, "intermediate_size": 14336,
                 "num_hidden_layers": 32, "num_attention_heads": 32,
                 "max_position_embeddings": 8192},
    # --smoke: the 128k vocabulary on a tiny body
    "llama-tiny": {**LLAMA_3, "hidden_size": 64, "intermediate_size": 128,
                   "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                   "max_position_embeddings": 256},
}  # fmt: skip
SEQUENCES = {"llama-1b": 2048, "llama-8b": 1024, "llama-tiny": 16}
LORA_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj"]
MARKERS = ("<!-- gpu-check -->", "<!-- /gpu-check -->")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny model on CPU, fp32")
    parser.add_argument("--models", default="llama-1b,llama-8b", help="comma-separated")
    parser.add_argument("--targets", default="full,lora")
    parser.add_argument("--batch-size", type=int, default=256, help="ezmia's batch size")
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=1, help="timed runs per path")
    parser.add_argument("--workdir", type=Path, help="checkpoints (default: a temp dir)")
    parser.add_argument("--out", type=Path, help="results dir (default: benchmarks/)")
    args = parser.parse_args(argv)
    args.models, args.targets = args.models.split(","), args.targets.split(",")
    args.device, args.dtype = ("cpu", "float32") if args.smoke else ("cuda", "bfloat16")
    if args.smoke:
        args.models, args.batch_size = ["llama-tiny"], 8
    return args


def log(message: str) -> None:
    print(f"[gpu-check] {message}", file=sys.stderr, flush=True)


def too_big(name: str, device: str) -> str | None:
    """Why the model cannot run here (two bf16 copies + a baseline batch's fp32 logits and
    log-softmax + 10% slack), or None when it can."""
    if device != "cuda":
        return None
    shape = SHAPES[name]
    hidden, vocab, layers = shape["hidden_size"], shape["vocab_size"], shape["num_hidden_layers"]
    body = layers * (4 * hidden * hidden + 3 * hidden * shape["intermediate_size"])
    params = body + vocab * hidden * (1 if shape["tie_word_embeddings"] else 2)
    need = 1.1 * (2 * 2 * params + 16 * 128 * vocab * 8)
    have = torch.cuda.get_device_properties(0).total_memory
    if need <= have:
        return None
    return f"needs ~{need / 2**30:.0f} GiB for two bf16 copies, the GPU has {have / 2**30:.0f}"


def build(name: str, workdir: Path, device: str, dtype: torch.dtype) -> fixtures.Fixture:
    """Random-init base, full target (noised base) and LoRA adapter under ``workdir/name``."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from ezmia.data.text import load_tokenizer

    root = workdir / name
    meta = root / "fixture.json"
    if meta.exists():
        return fixtures.Fixture.at(root, json.loads(meta.read_text())["flop_params"])
    tokenizer = fixtures.tokenizer_dir(workdir, fixtures.TOKENIZER_VOCAB)
    eos = load_tokenizer(tokenizer).eos_token_id
    config = LlamaConfig(**SHAPES[name], bos_token_id=eos, eos_token_id=eos, pad_token_id=eos)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM._from_config(config, dtype=dtype).eval().requires_grad_(False)
    save_checkpoint(model, tokenizer, root / "base")
    lora = LoraConfig(r=fixtures.LORA_RANK, lora_alpha=2 * fixtures.LORA_RANK,
                      target_modules=LORA_MODULES, init_lora_weights=False)  # fmt: skip
    adapted = get_peft_model(model, lora)
    save_checkpoint(adapted, tokenizer, root / "lora")
    set_adapter_base(root / "lora", root / "base")
    model = adapted.unload()
    for param in model.parameters():
        param.mul_(1 + 0.01 * torch.randn_like(param))
    save_checkpoint(model, tokenizer, root / "full")
    fixture = fixtures.Fixture.at(root, flop_params(model))
    meta.write_text(json.dumps({"flop_params": fixture.flop_params}))
    del model, adapted
    if device == "cuda":
        torch.cuda.empty_cache()
    return fixture


def bench(name: str, args: argparse.Namespace, workdir: Path) -> list[tuple[dict, int]]:
    """Both paths on each target of one model, alternating, ``--repeats`` rounds."""
    log(f"building {name}")
    fixture = build(name, workdir, args.device, getattr(torch, args.dtype))
    return harness.time_cases(name, fixture, SEQUENCES[name], args, workdir, oracle_sequences=0)


def section(results: dict) -> str:
    """The GPU section of ``RESULTS.md``."""
    hw = results["hardware"]
    skipped = "".join(f"\n- {name} skipped: {why}." for name, why in results["skipped"].items())
    return f"""{MARKERS[0]}
## GPU check (`bash benchmarks/gpu_check.sh`)

Date: {results["date"]}. {hw.get("gpu", hw["cpu"])}; torch {hw["torch"]}; {results["dtype"]}.
Random-init Llama shapes with a 128,256-token vocabulary, {results["max_length"]}-token texts
(stdlib docstrings); ezmia batch size {results["batch_size"]}. {results["mfu_peak"]} matmul
peak at the start: {results["peaks"][results["mfu_peak"]] / 1e12:,.3g} TFLOP/s; MFU is against
the peak measured beside each timed run.{skipped}

{report.table(results["cases"], report.CASE_COLUMNS)}

ezmia / the paper's scoring path (random-init models: score differences say nothing here):

{report.table(results["comparisons"], report.RATIO_COLUMNS)}
{MARKERS[1]}
"""


def write(results: dict, out: Path) -> None:
    """``gpu_check.json``, and the GPU section of ``RESULTS.md`` put in place of the last one."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.json").write_text(json.dumps(results, indent=2) + "\n")
    path = out / "RESULTS.md"
    text = path.read_text() if path.exists() else ""
    pattern = re.compile(re.escape(MARKERS[0]) + ".*?" + re.escape(MARKERS[1]) + "\n?", re.S)
    kept = pattern.sub("", text).rstrip("\n")
    path.write_text((kept + "\n\n" if kept else "") + section(results))
    log(f"wrote {out / 'gpu_check.json'} and the GPU section of {path}")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = torch.device(args.device)
    if args.smoke:
        out = args.out or Path(tempfile.mkdtemp(prefix="ezmia-gpu-check-smoke-"))
    else:
        out = args.out or REPO / "benchmarks"
    info = hardware(device)
    log("measuring the matmul peak")
    peaks = machine_peaks(device)
    runs: list[tuple[dict, int]] = []
    skipped: dict[str, str] = {}
    args.sequences = {name: SEQUENCES[name] for name in args.models}
    with tempfile.TemporaryDirectory(prefix="ezmia-gpu-check-") as tmp:
        workdir = args.workdir or Path(tmp)
        for name in args.models:
            skipped.update({name: why} if (why := too_big(name, args.device)) else {})
            if name in skipped:
                log(f"{name} skipped: {skipped[name]}")
                continue
            runs += bench(name, args, workdir)
            write(summarize(args, runs, peaks, info, skipped), out)
    results = summarize(args, runs, peaks, info, skipped)
    write(results, out)
    print(report.table(results["cases"], report.CASE_COLUMNS))
    print(report.table(results["comparisons"], report.RATIO_COLUMNS))


def summarize(
    args: argparse.Namespace, runs: list, peaks: dict, info: dict, skipped: dict[str, str]
) -> dict:
    """``harness.summarize``'s figures with this run's settings, hardware and skipped models."""
    return {
        **harness.summarize(args, runs, peaks),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "batch_size": args.batch_size,
        "mfu_peak": MFU_PEAK[args.device],
        "hardware": {**info, "load_average_end": list(os.getloadavg())},
        "skipped": skipped,
    }


if __name__ == "__main__":
    main()
