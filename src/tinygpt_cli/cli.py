"""The `tinygpt` command: a thin Typer + rich shell over the library.

This is the only module that imports typer/rich. Torch is imported inside commands, so `--help` is instant.
Errors have one boundary (`TinyGPTGroup.invoke`): a `TinyGPTError` becomes one red line on stderr and
exit code 1 (the traceback too with TINYGPT_DEBUG=1); usage errors exit 2.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from typer.core import TyperGroup

from tinygpt_cli import __version__
from tinygpt_cli.errors import TinyGPTError


def _stderr_console():
    from rich.console import Console

    return Console(stderr=True, highlight=False, soft_wrap=True)


def _stdout_console():
    from rich.console import Console

    return Console(highlight=False, soft_wrap=True)


class TinyGPTGroup(TyperGroup):
    """Turns library errors into one line and exit code 1, for `tinygpt` and for CliRunner alike."""

    def invoke(self, ctx):  # type: ignore[override]
        try:
            return super().invoke(ctx)
        except TinyGPTError as exc:
            if os.environ.get("TINYGPT_DEBUG"):
                import traceback

                traceback.print_exc()
            _stderr_console().print(f"[bold red]error:[/] {exc}", markup=True, soft_wrap=True)
            raise typer.Exit(1) from None


app = typer.Typer(
    name="tinygpt",
    cls=TinyGPTGroup,
    help="Train a GPT-2 from scratch: tokenize → train → generate, offline on the embedded corpus.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        print(f"tinygpt {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """Train a GPT-2 from scratch: tokenize → train → generate, offline on the embedded corpus.

    Everything lives under $TINYGPT_HOME (default: the current folder): data/<name>/ and runs/<name>/.
    """


# ----------------------------------------------------------------------------------------- shared options
SeedOpt = Annotated[int | None, typer.Option("--seed", help="Random seed (same seed → same result).")]
DeviceOpt = Annotated[str | None, typer.Option("--device", help="auto | cpu | cuda | mps.")]
RunOpt = Annotated[str | None, typer.Option("--run", help="Run name or folder (default: the latest run).")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout.")]


def _fmt_int(n: float) -> str:
    return f"{int(n):,}"


def _fmt_seconds(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


# ----------------------------------------------------------------------------------------- tokenize
@app.command(epilog="Examples:  tinygpt tokenize  ·  tinygpt tokenize books/ --name books  ·  "
             "tinygpt tokenize corpus.jsonl --text-field body --fraction 0.25")
def tokenize(
    source: Annotated[
        str | None,
        typer.Argument(help="'shakespeare' (embedded, the default) or a .txt/.jsonl/.parquet file, folder or glob."),
    ] = None,
    name: Annotated[str | None, typer.Option(help="Dataset name under data/ (default: from the source).")] = None,
    fraction: Annotated[float, typer.Option(help="Share of the documents to use, chosen by --seed.")] = 1.0,
    val_fraction: Annotated[float, typer.Option(help="Share of the used documents held out for validation.")] = 0.005,
    seed: Annotated[int, typer.Option(help="Seed of the document choice and the split.")] = 0,
    text_field: Annotated[str, typer.Option(help="Field/column holding the text in .jsonl/.parquet.")] = "text",
    workers: Annotated[int | None, typer.Option(help="Tokenizer threads (default: all cores).")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Tokenize a corpus with the GPT-2 BPE into data/<name>/{train,val}.bin + meta.json."""
    from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeRemainingColumn

    from tinygpt_cli import data

    err = _stderr_console()
    what = "the embedded Shakespeare corpus" if source in (None, data.EMBEDDED_NAME) else source
    progress = Progress(
        TextColumn("[progress.description]{task.description}"), BarColumn(), TaskProgressColumn(),
        TextColumn("{task.fields[rate]}"), TimeRemainingColumn(), console=err, transient=True,
    )
    task = None

    def on_event(event: data.TokenizeEvent) -> None:
        nonlocal task
        if event.kind == "plan":
            err.print(
                f"Tokenizing {what}: {_fmt_int(event.documents)} of {_fmt_int(event.total_documents)} documents, "
                f"{event.total_text_bytes / 1e6:.1f} MB of text, ~{_fmt_int(event.estimated_tokens)} tokens, "
                f"~{event.estimated_tokens * 2 / 1e6:.1f} MB on disk"
            )
            task = progress.add_task("documents", total=max(1, event.documents), rate="")
            progress.start()
        elif event.kind == "progress" and task is not None:
            elapsed = progress.tasks[task].elapsed or 1e-9
            rate = f"{event.tokens / elapsed / 1e6:.2f}M tok/s · {event.text_bytes / elapsed / 1e6:.1f} MB/s"
            progress.update(task, completed=event.documents, rate=rate)

    try:
        result = data.tokenize(source, name=name, fraction=fraction, val_fraction=val_fraction, seed=seed,
                               text_field=text_field, workers=workers, on_event=on_event)
    finally:
        progress.stop()
    meta = result.meta
    train, val = meta["splits"]["train"], meta["splits"]["val"]
    if result.skipped_empty or result.skipped_undecodable:
        err.print(f"Skipped {result.skipped_empty} empty document(s) and {len(result.skipped_undecodable)} "
                  f"non-UTF-8 file(s){': ' + result.skipped_undecodable[0] if result.skipped_undecodable else ''}")
    if as_json:
        print(json.dumps({"name": result.name, "path": str(result.path), "seconds": result.seconds, **meta}))
        return
    print(
        f"Wrote {result.path}: {_fmt_int(train['tokens'])} train tokens ({_fmt_int(train['documents'])} docs), "
        f"{_fmt_int(val['tokens'])} val tokens ({_fmt_int(val['documents'])} docs) in {result.seconds:.1f}s"
    )


# ----------------------------------------------------------------------------------------- train
@app.command(epilog="Examples:  tinygpt train --size micro  ·  tinygpt train --resume  ·  "
             "tinygpt train --size tiny --set train.lr=1e-3 --max-steps 2000")
def train(
    size: Annotated[str | None, typer.Option(help="Preset: micro, tiny, small (124M), medium, large, xl.")] = None,
    config: Annotated[Path | None, typer.Option("--config", help="YAML file with model/data/train sections.")] = None,
    overrides: Annotated[
        list[str] | None, typer.Option("--set", help="Override a key: --set train.lr=3e-4 (repeatable).")
    ] = None,
    data_name: Annotated[str | None, typer.Option("--data", help="Tokenized dataset (default: the last one).")] = None,
    name: Annotated[str | None, typer.Option("--name", help="Run name under runs/ (default: size-data-time).")] = None,
    resume: Annotated[bool, typer.Option(help="Continue --name (else the latest run) from its checkpoint.")] = False,
    max_steps: Annotated[int | None, typer.Option(help="Optimizer steps to train in all.")] = None,
    max_tokens: Annotated[int | None, typer.Option(help="Stop with a checkpoint after this many tokens.")] = None,
    max_minutes: Annotated[float | None, typer.Option(help="Stop with a checkpoint after this many minutes.")] = None,
    batch_size: Annotated[
        str | None, typer.Option(help="Sequences per micro-batch, or 'auto' (CUDA: the largest that fits).")
    ] = None,
    grad_accum: Annotated[int | None, typer.Option(help="Micro-batches per optimizer step.")] = None,
    lr: Annotated[float | None, typer.Option(help="Peak learning rate.")] = None,
    dropout: Annotated[float | None, typer.Option(help="Dropout (0 for pretraining; ~0.1 to fine-tune).")] = None,
    keep_last: Annotated[int | None, typer.Option(help="Checkpoints to keep (older ones are pruned).")] = None,
    device: DeviceOpt = None,
    dtype: Annotated[str | None, typer.Option(help="auto | fp32 | bf16 | fp16 (autocast).")] = None,
    compile_mode: Annotated[str | None, typer.Option("--compile", help="auto | on | off.")] = None,
    nproc: Annotated[int | None, typer.Option(help="Processes on this machine: re-runs itself under torchrun.")] = None,
    seed: SeedOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Train a GPT-2 on the last tokenized dataset (the embedded corpus if there is none), with checkpoints."""
    if nproc is not None and nproc > 1 and "WORLD_SIZE" not in os.environ:
        _exec_torchrun(nproc)
    from tinygpt_cli import checkpoint as ckpt
    from tinygpt_cli import dist
    from tinygpt_cli.config import resolve_config
    from tinygpt_cli.train import StopFlag, run_config_of
    from tinygpt_cli.train import train as run_training

    auto_batch = batch_size is not None and batch_size.strip().lower() == "auto"
    flags: dict[str, Any] = {
        "data.dataset": data_name, "train.max_steps": max_steps, "train.max_tokens": max_tokens,
        "train.max_minutes": max_minutes, "train.batch_size": None if auto_batch else batch_size,
        "train.auto_batch": True if auto_batch else None, "train.grad_accum": grad_accum, "train.lr": lr,
        "model.dropout": dropout, "train.keep_last": keep_last, "train.device": device, "train.dtype": dtype,
        "train.compile": compile_mode, "train.seed": seed,
    }
    run_name = name
    if resume:
        run_dir = ckpt.find_run(name)
        run_name = run_dir.name
        if size is not None or config is not None:
            raise TinyGPTError("--size and --config cannot change a resumed run: use --set for training keys")
        cfg = resolve_config(overrides=overrides or (), flags=flags, base=run_config_of(run_dir))
    else:
        cfg = resolve_config(size=size, config_file=config, overrides=overrides or (), flags=flags)

    is_main = dist.from_environment().is_main
    stop = StopFlag()
    view = _TrainView(_stderr_console())
    try:
        result = run_training(cfg, run_name=run_name, resume=resume, on_event=view.on_event, stop=stop)
    finally:
        view.close()
    if not is_main:
        return
    if as_json:
        print(json.dumps({k: (str(v) if isinstance(v, Path) else v) for k, v in vars(result).items()}))
        return
    out = _stdout_console()
    val = f"{result.final_val_loss:.4f}" if result.final_val_loss is not None else "n/a"
    out.print(
        f"Run {result.run_dir}: step {result.steps}, train loss {result.final_loss or float('nan'):.4f}, "
        f"val loss {val} (unigram baseline {result.unigram_val_loss:.4f}), "
        f"{_fmt_seconds(result.seconds)}, {_fmt_int(result.tokens_per_s)} tokens/s"
    )
    if result.stopped != "completed":
        why = {"interrupted": "Interrupted", "time_limit": "Reached --max-minutes",
               "token_limit": "Reached --max-tokens"}.get(result.stopped, "Stopped")
        out.print(f"{why}; checkpoint saved. Continue with: tinygpt train --resume --name {result.run_dir.name}")


def torchrun_command(nproc: int, argv: list[str]) -> list[str]:
    """The torchrun command line that re-runs `tinygpt <argv>` on `nproc` local processes (--nproc removed)."""
    args: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg == "--nproc":
            skip = True
            continue
        if arg.startswith("--nproc="):
            continue
        args.append(arg)
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            "-m", "tinygpt_cli", *args]


def _exec_torchrun(nproc: int) -> None:
    command = torchrun_command(nproc, sys.argv[1:])
    _stderr_console().print(f"Launching {nproc} processes: {' '.join(command[1:])}")
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(command[0], command)


class _TrainView:
    """Renders TrainEvents: a live progress line on stderr, one line per eval, info lines as they come."""

    def __init__(self, console) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.console = console
        self.progress = Progress(
            TextColumn("[bold]train[/]"), BarColumn(), MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]} · val {task.fields[val]} · {task.fields[rate]} tok/s"
                       "{task.fields[mfu]}"),
            TextColumn("ETA"), TimeRemainingColumn(), console=console, transient=False,
        )
        self.task = None

    def on_event(self, event) -> None:
        if event.kind == "info":
            self.console.print(event.message)
        elif event.kind == "start":
            info = event.data
            resumed = f", resumed from {info['resumed_from']}" if info["resumed_from"] else ""
            self.console.print(
                f"Training {info['parameters'] / 1e6:.1f}M parameters on {info['dataset']} "
                f"({_fmt_int(info['train_tokens'])} train tokens) · {info['device']} {info['dtype']} · "
                f"{_fmt_int(info['tokens_per_step'])} tokens/step → {info['run_dir']}{resumed}"
            )
            self.task = self.progress.add_task("train", total=event.max_steps, completed=event.step,
                                               loss="…", val="…", rate="…", mfu="")
            self.progress.start()
        elif event.kind == "step" and self.task is not None:
            mfu = f" · MFU {event.mfu:.0%}" if event.mfu is not None else ""
            self.progress.update(self.task, completed=event.step, loss=f"{event.loss:.3f}",
                                 rate=_fmt_int(event.tokens_per_s or 0), mfu=mfu)
        elif event.kind == "eval" and self.task is not None:
            self.progress.update(self.task, completed=event.step, val=f"{event.val_loss:.3f}")
            self.console.print(f"step {event.step}: val loss {event.val_loss:.4f}")

    def close(self) -> None:
        self.progress.stop()


# ----------------------------------------------------------------------------------------- generate
@app.command(epilog='Examples:  tinygpt generate "To be, or not to be"  ·  '
             "tinygpt generate \"ROMEO:\" --num-samples 3 --temperature 0.9 --seed 7")
def generate(
    prompt: Annotated[str, typer.Argument(help="Text to continue (empty: start a fresh document).")] = "",
    run: RunOpt = None,
    max_new_tokens: Annotated[int | None, typer.Option(help="Tokens to generate.")] = None,
    temperature: Annotated[float | None, typer.Option(help="Sampling temperature; 0 = greedy.")] = None,
    top_k: Annotated[int | None, typer.Option(help="Sample from the k most likely tokens (0 = all).")] = None,
    top_p: Annotated[float | None, typer.Option(help="Nucleus sampling mass (1 = off).")] = None,
    num_samples: Annotated[int, typer.Option(help="Independent samples, decoded as one batch.")] = 1,
    seed: SeedOpt = None,
    device: DeviceOpt = None,
) -> None:
    """Sample text from a trained run (the latest by default), streaming it to stdout."""
    import codecs

    from tinygpt_cli.checkpoint import load_checkpoint
    from tinygpt_cli.config import SampleConfig
    from tinygpt_cli.errors import GenerationError
    from tinygpt_cli.sample import generate as generate_tokens
    from tinygpt_cli.tokenizer import get_encoding
    from tinygpt_cli.train import resolve_device

    if num_samples < 1:
        raise GenerationError(f"--num-samples must be at least 1 (got {num_samples})")
    loaded = load_checkpoint(run, device=resolve_device(device or "auto"))
    defaults = loaded.run_config.sample if loaded.run_config else SampleConfig()
    settings = SampleConfig(
        max_new_tokens=max_new_tokens if max_new_tokens is not None else defaults.max_new_tokens,
        temperature=temperature if temperature is not None else defaults.temperature,
        top_k=top_k if top_k is not None else defaults.top_k,
        top_p=top_p if top_p is not None else defaults.top_p,
        seed=seed if seed is not None else defaults.seed,
    )
    _stderr_console().print(f"Sampling from {loaded.path} (step {loaded.state.get('step')})", soft_wrap=True)
    encoding = get_encoding()
    prompt_ids = encoding.encode_ordinary(prompt)
    stream = generate_tokens(
        loaded.model, prompt_ids, settings.max_new_tokens, temperature=settings.temperature,
        top_k=settings.top_k, top_p=settings.top_p, num_samples=num_samples, seed=settings.seed,
    )
    if num_samples == 1:
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        sys.stdout.write(prompt)
        for token in stream:
            sys.stdout.write(decoder.decode(encoding.decode_single_token_bytes(int(token[0]))))
            sys.stdout.flush()
        sys.stdout.write(decoder.decode(b"", final=True) + "\n")
        return
    samples: list[list[int]] = [[] for _ in range(num_samples)]
    for tokens in stream:
        for row, token in enumerate(tokens.tolist()):
            samples[row].append(token)
    for index, ids in enumerate(samples):
        if index:
            print(f"\n--- sample {index + 1} ---")
        print(prompt + encoding.decode(ids))


# ----------------------------------------------------------------------------------------- export
def _fmt_bytes(n: int) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


@app.command(epilog="Examples:  tinygpt export  ·  tinygpt export my-run --format gguf --dtype q8_0  ·  "
             "tinygpt export --format onnx --out model-onnx  ·  tinygpt export gpt2 --format gguf")
def export(
    source: Annotated[
        str | None,
        typer.Argument(help="Run name or folder, checkpoint folder, Hugging Face GPT-2 folder, or gpt2…gpt2-xl "
                       "(default: the latest run)."),
    ] = None,
    fmt: Annotated[str, typer.Option("--format", "-f", help="hf (transformers) | gguf (llama.cpp) | onnx.")] = "hf",
    out: Annotated[
        Path | None,
        typer.Option("--out", "-o", help="Output folder (gguf: a .gguf file or a folder; default: under exports/)."),
    ] = None,
    dtype: Annotated[str, typer.Option(help="fp32 | fp16 | bf16 (hf, gguf) | q8_0 (gguf).")] = "fp32",
    force: Annotated[bool, typer.Option("--force", help="Replace --out if it exists.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Export a model for Hugging Face transformers, llama.cpp (GGUF) or ONNX Runtime."""
    from tinygpt_cli.export import check_format, export_model

    check_format(fmt, dtype)  # before loading anything
    _stderr_console().print(f"Exporting {source or 'the latest run'} as {fmt} ({dtype})…", soft_wrap=True)
    result = export_model(source, fmt, out, dtype, force=force)
    if as_json:
        print(json.dumps({"path": str(result.path), "format": result.format, "dtype": result.dtype,
                          "source": str(result.source), "files": result.files, "bytes": result.total_bytes}))
        return
    print(f"Wrote {result.path} ({fmt}, {dtype}, {_fmt_bytes(result.total_bytes)}) from {result.source}")
    if len(result.files) > 1:
        width = max(len(name) for name in result.files)
        for name, size in result.files.items():
            print(f"  {name:<{width}}  {_fmt_bytes(size):>9}")


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
